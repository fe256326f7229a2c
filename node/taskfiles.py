"""A task's files in its scratch directory: inputs copied into ``in/``, outputs taken from ``out/``.

Both executors use this module (docs/design.md, "Input and output files"):

* Before a run, each input file is **copied** (not linked: a task that changes its copy
  cannot corrupt the node's cache) to ``in/NAME``, mode 0444, and ``in/`` itself is made
  read-only.
* After a successful run, what the program left in ``out/`` must be at most 64 regular
  files with plain names, together at most ``limits.output_mb`` MiB; anything else fails
  the task with a reason. The files are copied into the run's output directory (in the
  node's spool) through descriptors opened with ``O_NOFOLLOW``, hashing them on the way:
  a task (or a persistent worker still running) that swaps a file for a symlink cannot
  make the node read anything outside ``out/``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from issc.fsutil import fsync_dir
from issc.names import PLAIN_NAME_RE
from node.sandbox import MIB, remove_tree

IN_DIR = "in"
OUT_DIR = "out"
MAX_FILES = 64  # input files per task, output files per result

_COPY_BLOCK = MIB


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One output file of a run, moved out of the scratch directory."""

    name: str
    path: Path
    size: int
    sha256: str


def stage_inputs(scratch: Path, inputs: Mapping[str, Path]) -> None:
    """Copy each input to ``<scratch>/in/NAME`` (0444) and make ``in/`` read-only.

    ``in/`` must exist and be empty (``fresh_scratch`` or ``reset_task_dirs`` made it).

    Raises:
        ValueError: a name is not a plain file name.
        OSError: a copy failed (the disk is full, the cached file vanished).
    """
    target = scratch / IN_DIR
    for name, source in inputs.items():
        if not PLAIN_NAME_RE.match(name):
            raise ValueError(f"input file name {name!r} is not a plain file name")
        dest = target / name
        shutil.copyfile(source, dest)
        dest.chmod(0o444)
    target.chmod(0o555)


def reset_task_dirs(scratch: Path, owner: tuple[int, int] | None = None) -> None:
    """Empty ``in/`` and ``out/`` of a scratch directory (between two tasks of one worker),
    owned by ``owner`` (uid, gid: the task uid of a root node) if given.

    Raises OSError if they cannot be made again.
    """
    for name in (IN_DIR, OUT_DIR):
        if _fresh(os.path.join(scratch, name), owner):
            continue  # most tasks leave both empty: no need to remove and make them again
        remove_tree(scratch / name)
        (scratch / name).mkdir(mode=0o700)
        if owner is not None:
            os.chown(scratch / name, *owner)


def task_dirs_fresh(scratch: Path, owner: tuple[int, int] | None = None) -> bool:
    """Whether ``in/`` and ``out/`` of a scratch directory are already as reset_task_dirs
    leaves them (empty, mode 0700, of ``owner``): then there is nothing to collect from
    ``out/`` and nothing to empty. Two lstat and two scandir calls on a directory of the
    node's own, cheap enough for the event loop: the usual persistent task, with no
    files in or out, needs no thread hop for its files. Never raises."""
    return _fresh(os.path.join(scratch, IN_DIR), owner) and _fresh(
        os.path.join(scratch, OUT_DIR), owner
    )


def _fresh(path: str, owner: tuple[int, int] | None) -> bool:
    """Whether ``path`` is already as reset_task_dirs would make it: a directory (not a
    link), mode 0700 with no special bits, of ``owner``, and empty."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o700:
            return False
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            return False
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def collect_outputs(scratch: Path, dest: Path, output_mb: int) -> tuple[OutputFile, ...]:
    """Check ``<scratch>/out/`` and copy its files into ``dest`` (made afresh).

    Returns the files, sorted by name; an empty ``out/`` gives () and no ``dest``.

    Raises:
        ValueError: the output breaks a rule (the message is the task's error): an entry
            that is not a regular file, a name that is not plain, too many files, or more
            than ``output_mb`` MiB together. ``dest`` is then removed.
        OSError: the files cannot be copied (``dest`` is removed).
    """
    out = scratch / OUT_DIR
    entries = sorted(os.scandir(out), key=lambda entry: entry.name)
    if len(entries) > MAX_FILES:
        raise ValueError(f"out/ holds {len(entries)} entries; at most {MAX_FILES} output files")
    sizes: dict[str, int] = {}
    for entry in entries:
        if not PLAIN_NAME_RE.match(entry.name):
            raise ValueError(
                f"out/{entry.name[:200]!r}: output file names must be 1-128 letters, digits, "
                "'_', '.', '-', not starting with '.' or '-'"
            )
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"out/{entry.name}: output entries must be plain files")
        sizes[entry.name] = info.st_size
    total = sum(sizes.values())
    if total > output_mb * MIB:
        raise ValueError(
            f"output files total {total} bytes, over the output_mb limit of {output_mb} MiB"
        )
    if not sizes:
        return ()
    remove_tree(dest)
    dest.mkdir(parents=True, mode=0o700)
    try:
        files = tuple(_copy_out(out / name, dest / name, size) for name, size in sizes.items())
        with contextlib.suppress(OSError):  # best effort: the spool record is what counts
            fsync_dir(dest)
    except BaseException:
        remove_tree(dest)
        raise
    return files


def output_limit_reached(scratch: Path, output_mb: int) -> str | None:
    """Why a failed run's ``out/`` says it ran into ``limits.output_mb``, or None.

    The sandbox caps each file a task writes at ``output_mb`` MiB (RLIMIT_FSIZE), so a
    write past it fails: most runtimes (Python among them) ignore SIGXFSZ and see EFBIG,
    "File too large", which names no limit. A file in ``out/`` that reached the cap, or
    files over it together, tell what happened. Never raises.
    """
    limit = output_mb * MIB
    total = 0
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(scratch / OUT_DIR), key=lambda e: e.name):
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue
                if info.st_size >= limit:
                    return f"out/{entry.name[:200]} reached the output_mb limit of {output_mb} MiB"
                total += info.st_size
    if total > limit:
        return f"output files total {total} bytes, over the output_mb limit of {output_mb} MiB"
    return None


def _copy_out(source: Path, target: Path, size: int) -> OutputFile:
    """Copy at most ``size`` bytes (what was checked) of a regular file, hashing them.

    Raises ValueError if ``source`` is no longer a regular file, OSError on I/O errors.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(source, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symlink since it was checked
            raise ValueError(f"out/{source.name}: output entries must be plain files") from None
        raise
    digest = hashlib.sha256()
    copied = 0
    with os.fdopen(fd, "rb") as reader:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            raise ValueError(f"out/{source.name}: output entries must be plain files")
        with open(target, "xb") as writer:
            while copied < size and (block := reader.read(min(_COPY_BLOCK, size - copied))):
                writer.write(block)
                digest.update(block)
                copied += len(block)
            writer.flush()
            os.fsync(writer.fileno())  # the spool record naming it is written next
    return OutputFile(source.name, target, copied, digest.hexdigest())
