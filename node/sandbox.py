"""How a task's process is launched: argv, environment, resource limits, process group.

Entrypoint resolution (``entrypoint`` from project.yaml, a list of strings):

* A bare ``python3`` or ``python`` as the first element runs the node's own interpreter
  (``sys.executable``) with ``-s -E -B``: no user site-packages, no ``PYTHON*`` variables,
  no bytecode written into the bundle. The scrubbed PATH may hold no usable python3 on a
  volunteer's machine (pyenv shims live under $HOME), and the node's interpreter is known
  to work.
* Otherwise, if the first element names a file inside the bundle, that file is run by its
  absolute path (it must be executable).
* Otherwise it is looked up with ``shutil.which`` on the node's own PATH.
* Every later element that names an existing file inside the bundle is replaced by that
  file's absolute path, because the task's cwd is its scratch directory, not the bundle:
  ``[python3, main.py]`` runs ``<bundle>/main.py``. Other elements pass unchanged. A name
  that leads out of the bundle (``..``, an absolute path, a symlink pointing out) is
  never rewritten.

Environment: nothing is inherited from the node. A task sees only PATH, HOME (its
scratch directory), TMPDIR (``<scratch>/tmp``), LANG, ISSC_BUNDLE_DIR and, in process
mode, ISSC_TASK_ID (a persistent process serves many tasks; each task's id is in its
input line instead).

Limits, set in the child between fork and exec, soft and hard alike so the program
cannot raise them again: RLIMIT_AS (memory_mb; skipped where it cannot be set),
RLIMIT_FSIZE (output_mb), RLIMIT_CORE 0, RLIMIT_NOFILE 256 and, in process mode only,
RLIMIT_CPU (wall_seconds + 1; CPU time adds up over a process's life, so a long-lived
persistent process relies on the executor's wall limit instead).

Every task process leads a new session and process group; the executor kills the whole
group with SIGKILL when a run ends, so background children die with it. A child that
starts its own session escapes this; bubblewrap (``--die-with-parent``, a PID namespace)
will close that gap. ``build_launch`` is the seam where bubblewrap will wrap the argv.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from issc.errors import ExecutionError
from issc.manifest import Limits

MIB = 1024 * 1024
STDERR_TAIL_BYTES = 2048
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_OPEN_FILES = 256
_PYTHON_NAMES = frozenset({"python", "python3"})
_PYTHON_FLAGS = ("-s", "-E", "-B")


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one task process: what to exec, with which env, where."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path


def build_launch(
    entrypoint: Sequence[str], bundle_dir: Path, scratch: Path, task_id: str | None
) -> Launch:
    """Build the argv, environment and cwd of a task process.

    Raises ExecutionError if the entrypoint is empty or its program cannot be found.
    """
    return Launch(
        argv=resolve_argv(entrypoint, bundle_dir),
        env=scrubbed_env(scratch, bundle_dir, task_id),
        cwd=scratch,
    )


def resolve_argv(entrypoint: Sequence[str], bundle_dir: Path) -> tuple[str, ...]:
    """Turn a project's entrypoint into an argv, by the rules in the module docstring.

    Raises ExecutionError if the entrypoint is empty or its program cannot be found.
    """
    if not entrypoint:
        raise ExecutionError("the entrypoint is empty")
    program, *args = entrypoint
    head: tuple[str, ...]
    if program in _PYTHON_NAMES:
        head = (sys.executable, *_PYTHON_FLAGS)
    elif (in_bundle := bundle_file(bundle_dir, program)) is not None:
        head = (str(in_bundle),)
    elif (found := shutil.which(program)) is not None:
        head = (found,)
    else:
        raise ExecutionError(f"entrypoint program {program!r} not found in the bundle or on PATH")
    rewritten = (str(path) if (path := bundle_file(bundle_dir, arg)) else arg for arg in args)
    return (*head, *rewritten)


def bundle_file(bundle_dir: Path, name: str) -> Path | None:
    """The absolute path of the regular file ``name`` inside the bundle, or None."""
    if not name or "\x00" in name:
        return None
    try:
        root = bundle_dir.resolve()
        candidate = (root / name).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return None
    if candidate == root or not candidate.is_relative_to(root):
        return None
    return candidate if candidate.is_file() else None


def scrubbed_env(scratch: Path, bundle_dir: Path, task_id: str | None) -> dict[str, str]:
    """The whole environment of a task process; nothing comes from the node's own."""
    env = {
        "PATH": SANDBOX_PATH,
        "HOME": str(scratch),
        "TMPDIR": str(scratch / "tmp"),
        "LANG": "C.UTF-8",
        "ISSC_BUNDLE_DIR": str(bundle_dir.resolve()),
    }
    if task_id is not None:
        env["ISSC_TASK_ID"] = task_id
    return env


def limit_setter(limits: Limits, *, limit_cpu: bool) -> Callable[[], None]:
    """A function for Popen's ``preexec_fn`` that lowers the child's rlimits.

    It never raises: a limit the system refuses is skipped, because an exception there
    would only surface as an obscure SubprocessError in the parent.
    """
    wanted = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
        (resource.RLIMIT_FSIZE, limits.output_mb * MIB),
        (resource.RLIMIT_AS, limits.memory_mb * MIB),
    ]
    if limit_cpu:
        wanted.append((resource.RLIMIT_CPU, math.ceil(limits.wall_seconds) + 1))

    parent = os.getpid()
    libc = _libc()

    def apply() -> None:
        _die_with(parent, libc)
        for which, value in wanted:
            _lower_rlimit(which, value)

    return apply


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _libc() -> ctypes.CDLL | None:
    """libc, loaded in the parent: the child between fork and exec should not dlopen."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _die_with(parent: int, libc: ctypes.CDLL | None) -> None:
    """Ask the kernel to SIGKILL this child when the node dies, even by SIGKILL.

    The signal follows the thread that forked, so tasks must be started from the node's
    event-loop thread (they are). Not available off Linux: then this does nothing.
    """
    if libc is None:
        return
    with contextlib.suppress(AttributeError, OSError):
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the node died before the request took effect
        os._exit(1)


def _lower_rlimit(which: int, value: int) -> None:
    """Set soft and hard limit to ``value``, never above the current hard limit."""
    try:
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # skipped on purpose: see limit_setter


def kill_group(pid: int) -> None:
    """SIGKILL the process group that ``pid`` leads, and ``pid`` itself.

    A group or process that is already gone is fine. The direct kill is a safety net
    for a process that somehow does not lead its group.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def fresh_scratch(path: Path) -> None:
    """Create an empty scratch directory with ``tmp/``, ``in/`` and ``out/``, replacing
    leftovers.

    Raises OSError if the directory cannot be created.
    """
    remove_tree(path)  # a leftover from a crashed node must not leak into a new run
    path.mkdir(mode=0o700)
    (path / "tmp").mkdir(mode=0o700)
    (path / "in").mkdir(mode=0o700)
    (path / "out").mkdir(mode=0o700)


def remove_tree(path: Path) -> None:
    """Remove a scratch directory even if the task made parts of it unwritable.

    Never follows symlinks the task left behind, and never raises.
    """
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
        return
    if not path.is_dir():
        return
    _make_dirs_writable(path)
    shutil.rmtree(path, ignore_errors=True)


def _make_dirs_writable(root: Path) -> None:
    """chmod 0700 every real directory under ``root`` so that rmtree can empty it."""
    with contextlib.suppress(OSError):
        os.chmod(root, 0o700)
    for parent, dirnames, _files in os.walk(root):
        for name in dirnames:
            child = os.path.join(parent, name)
            # os.chmod follows symlinks, and a symlink may point anywhere on the node.
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, with reaped children) of a live process, from /proc.

    None where /proc is unavailable or the process is gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    # Fields 14-17 are utime, stime, cutime, cstime; index 0 here is field 3.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return sum(int(value) for value in fields[11:15]) / ticks
    except (ValueError, IndexError):
        return None


def describe_exit(returncode: int, limits: Limits) -> str:
    """A short human reason for a process's exit: its status, or the signal and its cause."""
    if returncode >= 0:
        return f"exit status {returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    causes: dict[int, str] = {
        signal.SIGXCPU: "cpu time limit exceeded",
        signal.SIGXFSZ: f"output limit of {limits.output_mb} MiB exceeded",
    }
    cause = causes.get(number)
    return f"killed by {name}" + (f" ({cause})" if cause else "")
