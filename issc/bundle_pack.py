"""The packing side of ``issc.bundle``: find and hash a project's files, write the archive.

``issc.bundle.pack_bundle`` is the entry point; it owns the bundle layout (member names,
their order, the signature) and the bounds, and hands this module the pieces to write:

* ``collect_sources`` walks the project directory, refusing symlinks, special files and
  unsafe names, and hashes every file once for the manifest;
* ``write_archive`` writes a reproducible gzip'd POSIX PAX tar (mtime 0, owner 0, fixed
  modes), re-hashing each file as it is written so that a file changed meanwhile is caught;
* ``write_atomically`` puts the result in place through a temp file and ``os.replace``.

Reading bundles back never uses ``tarfile``: see ``issc.tarstream``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from issc.errors import BundleError
from issc.manifest import FileEntry, unsafe_path_reason

_CHUNK = 1024 * 1024
_FILE_MODE = 0o644
_EXEC_MODE = 0o755


@dataclass(frozen=True, slots=True)
class Source:
    """A file found under the project directory, hashed once for the manifest."""

    disk_path: Path
    entry: FileEntry


def collect_sources(
    src_dir: Path, skip: Path, max_files: int, max_total_bytes: int
) -> list[Source]:
    """Find and hash every file to pack, sorted by bundle path.

    Skips dot-files and dot-dirs, ``__pycache__``, ``*.pyc`` and the output file itself.

    Raises:
        BundleError: ``src_dir`` unreadable, a symlink or special file, an unsafe path, or
            more than ``max_files`` files or ``max_total_bytes`` in total.
    """
    if not src_dir.is_dir():
        raise BundleError(f"{src_dir}: not a directory")
    skip_resolved = skip.resolve()
    sources: list[Source] = []
    total = 0
    for disk_path in _walk(src_dir):
        if disk_path.resolve() == skip_resolved:
            continue  # an earlier bundle written into the project directory
        rel = disk_path.relative_to(src_dir).as_posix()
        reason = unsafe_path_reason(rel)
        if reason is not None:
            raise BundleError(f"{disk_path}: cannot be packed: {reason}")
        source = _hash_source(disk_path, rel)
        total += source.entry.size
        sources.append(source)
        if len(sources) > max_files:
            raise BundleError(f"{src_dir}: more than {max_files} files")
        if total > max_total_bytes:
            raise BundleError(f"{src_dir}: files exceed {max_total_bytes} bytes in total")
    return sorted(sources, key=lambda s: s.entry.path)


def _walk(directory: Path) -> Iterator[Path]:
    """Yield regular files under ``directory``, recursively, never following symlinks.

    Raises:
        BundleError: a symlink or special file (names it), or a directory cannot be listed.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise BundleError(f"{directory}: cannot list: {exc.strerror}") from exc
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            raise BundleError(f"{path}: symbolic links cannot be packed")
        if entry.is_dir(follow_symlinks=False):
            if entry.name != "__pycache__":
                yield from _walk(path)
        elif entry.is_file(follow_symlinks=False):
            if not entry.name.endswith(".pyc"):
                yield path
        else:
            raise BundleError(f"{path}: not a regular file; special files cannot be packed")


def _hash_source(disk_path: Path, rel: str) -> Source:
    """Hash one file for the manifest.

    Raises:
        BundleError: the file cannot be read.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        with disk_path.open("rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise BundleError(f"{disk_path}: cannot read: {exc.strerror}") from exc
    entry = FileEntry(
        path=rel, size=size, sha256=digest.hexdigest(), executable=bool(mode & stat.S_IXUSR)
    )
    return Source(disk_path=disk_path, entry=entry)


def refuse_private_key(sources: list[Source], key_path: Path) -> None:
    """Refuse to publish the signing key by packing it along with the project.

    Raises:
        BundleError: ``key_path`` is one of the files about to be packed.
    """
    key_resolved = key_path.resolve()
    for source in sources:
        if source.disk_path.resolve() == key_resolved:
            raise BundleError(
                f"{key_path}: the private key lies inside the project directory and would be "
                "published in the bundle; move it elsewhere"
            )


def write_archive(
    fh: BinaryIO, head: Iterable[tuple[str, bytes]], files_prefix: str, sources: list[Source]
) -> None:
    """Write the deterministic gzip'd tar: the in-memory ``head`` members in order, then each
    source as ``files_prefix + path``; mtime 0, owner 0, fixed modes.

    Raises:
        BundleError: a file changed or vanished between hashing and packing.
        OSError: the output cannot be written (the caller names the file).
    """
    # filename="" keeps the temp file's name out of the gzip header; mtime=0 keeps time out.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, data in head:
            _add_bytes(tar, name, data)
        for source in sources:
            _add_source(tar, files_prefix, source)


def _tar_info(name: str, size: int, executable: bool) -> tarfile.TarInfo:
    """A TarInfo with every metadata field fixed, so packing is reproducible."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = _EXEC_MODE if executable else _FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add an in-memory member."""
    tar.addfile(_tar_info(name, len(data), executable=False), io.BytesIO(data))


def _add_source(tar: tarfile.TarFile, files_prefix: str, source: Source) -> None:
    """Add one project file, re-hashing what is actually written.

    Raises:
        BundleError: the file's content no longer matches the manifest.
    """
    entry = source.entry
    info = _tar_info(files_prefix + entry.path, entry.size, entry.executable)
    try:
        with source.disk_path.open("rb") as fh:
            reader = _HashingReader(fh)
            tar.addfile(info, reader)
    except OSError as exc:
        raise BundleError(f"{source.disk_path}: changed while packing ({exc})") from exc
    if reader.hexdigest() != entry.sha256:
        raise BundleError(f"{source.disk_path}: changed while packing")


class _HashingReader:
    """Wraps a binary file and hashes every byte read through it."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._digest.update(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def write_atomically(out: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``out`` through a hidden temp file in the same directory, then os.replace it.

    Raises:
        BundleError: the file cannot be written (names ``out``), or whatever ``write`` raises.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise BundleError(f"{out}: cannot create: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)  # a bundle is public; mkstemp made it 0600
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"{out}: cannot write: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
