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
starts its own session escapes the group kill; what catches it depends on the ``Sandbox``:

* With bubblewrap (``bwrap`` on PATH, found once by ``default_sandbox``), the argv is
  wrapped: own PID, network, IPC, UTS and cgroup namespaces (and a user namespace when
  the node is not root), ``--die-with-parent``, ``--new-session``, ``--cap-drop ALL``,
  a read-only view of the system directories only (``/etc/shadow`` and ``/etc/gshadow``
  masked), the bundle read-only, the scratch directory read-write, a private ``/tmp``,
  and nothing of the node's data_dir or of $HOME. Killing bwrap ends the PID namespace
  and everything in it. For a bare ``python3`` the node's interpreter is bound read-only:
  its installation (``sys.base_prefix``) and the node's virtualenv, if it has one.
* Without it, ``default_sandbox`` logs one loud warning, and the node (``issc-node``
  only, ``enable_orphan_reaping``) becomes a child subreaper: an orphan of a run is
  reparented to the node, and after each run every process reparented to the node that
  is not one of its own task processes is killed (``sweep_orphans``).

When the node runs as root, task code runs as ``nobody``/``nogroup`` (65534) with no
supplementary groups: with bubblewrap through ``setpriv`` inside the sandbox (which also
clears the bounding set and sets no_new_privs), without it through Popen's user/group.
The scratch directory is chowned to that uid, and RLIMIT_NPROC (``MAX_PROCESSES``,
counted per uid: over all runs of the node together) bounds its processes. Without
bubblewrap ``nobody`` must be able to start the node's interpreter: with ``sandbox: auto``
the node checks that once, at start (``interpreter_unreachable``), and refuses to start,
naming the ways out, where it cannot (a pyenv under /root, mode 0700).
docs/security.md says what this protects and what it does not.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
MAX_PROCESSES = 512  # RLIMIT_NPROC of the task uid, when the node runs as root
NOBODY = (65534, 65534)  # nobody/nogroup on Debian: the uid/gid of task code under root
# System directories a sandboxed program sees, read-only (those that exist).
_SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_MASKED_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")
REDUCED_ISOLATION_WARNING = (
    "bubblewrap (bwrap) not found: task code runs without network, filesystem and PID "
    "isolation; install the 'bubblewrap' package"
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sandbox:
    """How task processes are confined beyond rlimits and a scrubbed environment.

    ``Sandbox()`` (no bubblewrap, the node's own uid) is what the executors use unless
    told otherwise; the node uses ``default_sandbox()``.
    """

    bwrap: str | None = None  # path of bwrap; None: no namespaces
    run_as: tuple[int, int] | None = None  # (uid, gid) of task code; None: the node's own
    setpriv: str | None = None  # path of setpriv, used inside bwrap to become run_as


@functools.cache
def default_sandbox() -> Sandbox:
    """The node's sandbox, detected once: bubblewrap if ``bwrap`` is on PATH and works,
    ``nobody`` as the task uid if the node runs as root. Warns once without bubblewrap."""
    run_as = NOBODY if os.geteuid() == 0 else None
    setpriv = shutil.which("setpriv") if run_as is not None else None
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        candidate = Sandbox(bwrap=bwrap, run_as=run_as, setpriv=setpriv)
        problem = _probe(candidate)
        if problem is None:
            if run_as is not None and setpriv is None:
                log.warning("setpriv not found: task code runs as root inside bubblewrap")
            return candidate
        log.warning("bubblewrap (%s) does not work here (%s)", bwrap, problem)
    log.warning("!" * 20 + " %s " + "!" * 20, REDUCED_ISOLATION_WARNING)
    return Sandbox(run_as=run_as)


def sandbox_for(setting: str) -> Sandbox:
    """The sandbox for the node config's ``sandbox`` key: auto, bubblewrap or none.

    Raises ExecutionError for ``bubblewrap`` where it is not usable, for ``auto`` on a
    root node without usable bubblewrap whose interpreter ``nobody`` cannot run (every
    task would fail with "Permission denied"; the message names the ways out), or for an
    unknown setting.
    """
    if setting == "none":
        _warn_unsandboxed()
        return Sandbox()
    sandbox = default_sandbox()
    if setting == "auto":
        owner = task_owner(sandbox)
        if sandbox.bwrap is None and owner is not None:
            problem = interpreter_unreachable(owner)
            if problem is not None:
                raise ExecutionError(unreachable_interpreter_message(owner, problem))
        return sandbox
    if setting == "bubblewrap":
        if sandbox.bwrap is None:
            raise ExecutionError("sandbox: bubblewrap, but bwrap is not installed or not usable")
        return sandbox
    raise ExecutionError(f"unknown sandbox setting {setting!r}")


def unreachable_interpreter_message(owner: tuple[int, int], problem: str) -> str:
    """The one line a root node without bubblewrap refuses to start with (``sandbox:
    auto``), naming the cause and the three ways out."""
    return (
        f"sandbox: auto: bubblewrap is not usable and this node runs as root, so task code "
        f"would run as uid {owner[0]} (nobody), which cannot run this node's Python "
        f"({problem}); install bubblewrap (the 'bubblewrap' package), or set 'sandbox: none' "
        f"in the node config to accept reduced isolation, or install Python where uid "
        f"{owner[0]} can reach it"
    )


@functools.cache
def interpreter_unreachable(owner: tuple[int, int]) -> str | None:
    """None if ``owner`` (uid, gid), with no supplementary groups, can start the node's own
    interpreter as a task would (``python3`` entrypoints); else why not. Checked by doing
    it, once: a Python under /root (pyenv, mode 0700) is the usual reason it cannot."""
    argv = [sys.executable, *_PYTHON_FLAGS, "-c", "pass"]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=30,
            check=False,
            cwd="/",
            env={"PATH": SANDBOX_PATH, "LANG": "C.UTF-8"},
            user=owner[0],
            group=owner[1],
            extra_groups=[],
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{sys.executable}: {getattr(exc, 'strerror', None) or exc}"
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        return f"{sys.executable}: " + (detail[-1] if detail else f"exit {done.returncode}")
    return None


@functools.cache
def _warn_unsandboxed() -> None:
    log.warning("sandbox: none: task code runs as this node's user, without isolation")


def _probe(sandbox: Sandbox) -> str | None:
    """None if bwrap can start a program with the options of a run; else why not."""
    import tempfile

    here = Path(tempfile.mkdtemp(prefix="issc-bwrap-probe-"))
    try:
        argv = bwrap_argv(sandbox, ("/bin/true",), {}, here, here)
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        remove_tree(here)
    if done.returncode != 0:
        return done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
    return None


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one task process: what to exec, with which env, where."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path


def build_launch(
    entrypoint: Sequence[str],
    bundle_dir: Path,
    scratch: Path,
    task_id: str | None,
    sandbox: Sandbox | None = None,
) -> Launch:
    """Build the argv, environment and cwd of a task process.

    Raises ExecutionError if the entrypoint is empty or its program cannot be found.
    """
    sandbox = sandbox or Sandbox()
    env = scrubbed_env(scratch, bundle_dir, task_id)
    argv = resolve_argv(entrypoint, bundle_dir)
    if sandbox.bwrap is not None:
        return Launch(argv=bwrap_argv(sandbox, argv, env, bundle_dir, scratch), env={}, cwd=scratch)
    return Launch(argv=argv, env=env, cwd=scratch)


def bwrap_argv(
    sandbox: Sandbox, argv: Sequence[str], env: Mapping[str, str], bundle_dir: Path, scratch: Path
) -> tuple[str, ...]:
    """``argv`` wrapped in bubblewrap, by the rules in the module docstring."""
    assert sandbox.bwrap is not None
    as_root = os.geteuid() == 0
    drop = as_root and sandbox.run_as is not None and sandbox.setpriv is not None
    out: list[str] = [sandbox.bwrap]
    if as_root:
        # No user namespace: setpriv must switch to a real unprivileged uid, not a mapped one.
        out += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        out += ["--unshare-cgroup-try"]
    else:
        out += ["--unshare-all"]
    # --as-pid-1: no bwrap init in between, so the program's rusage reaches the node
    # (bwrap's monitor reaps it); when it ends, the namespace and all in it go too.
    out += ["--as-pid-1", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if drop:  # setpriv needs these for a moment; it clears them all before the exec
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
            out += ["--cap-add", cap]
    bound: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            out += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            out += ["--ro-bind", path, path]
            bound.append(path)
    for secret in _MASKED_FILES:
        if os.path.isfile(secret):
            out += ["--ro-bind", "/dev/null", secret]
    out += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    bound.append("/tmp")
    extra = [(str(bundle_dir.resolve()), "--ro-bind")]
    extra += [(path, "--ro-bind") for path in _program_paths(argv)]
    extra.append((str(scratch.resolve()), "--bind"))
    for source, how in extra:
        visible = any(_under(source, done) for done in bound)
        if visible and how == "--ro-bind" and not _under(source, "/tmp"):
            continue  # already visible, read-only
        out += _parents(source, bound)
        out += [how, source, source]
        bound.append(source)
    out += ["--chdir", str(scratch.resolve()), "--clearenv"]
    for key, value in env.items():
        out += ["--setenv", key, value]
    if drop:
        assert sandbox.run_as is not None and sandbox.setpriv is not None
        uid, gid = sandbox.run_as
        out += [sandbox.setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        out += ["--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]
    else:
        out.append("--")
    return (*out, *argv)


def _program_paths(argv: Sequence[str]) -> list[str]:
    """What must be visible for ``argv[0]`` to run: the node's interpreter (its
    installation prefix and the node's virtualenv, if any), or the program file itself;
    those in a system directory are visible anyway."""
    if argv[0] == sys.executable:
        paths = [os.path.realpath(sys.base_prefix)]
        program = os.path.realpath(sys.executable)
        if not _under(program, paths[0]):
            paths.append(os.path.dirname(program))
        if sys.prefix != sys.base_prefix:  # a virtualenv: its pyvenv.cfg and packages
            paths.append(os.path.abspath(sys.prefix))
        return paths
    return [os.path.realpath(argv[0])]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _parents(path: str, bound: list[str]) -> list[str]:
    """``--dir`` options (mode 0755) for the ancestors of ``path`` that are not visible
    yet: bwrap makes missing ones mode 0700, which an unprivileged task cannot cross."""
    out: list[str] = []
    parts = Path(path).parts[1:-1]
    current = ""
    for part in parts:
        current += "/" + part
        if any(_under(current, done) and done != "/tmp" for done in bound):
            continue
        if current == "/tmp":
            continue
        out += ["--perms", "0755", "--dir", current]
    return out


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


@dataclass(frozen=True, slots=True)
class Identity:
    """Popen's ``user``, ``group`` and ``extra_groups`` for a task process."""

    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None


def popen_identity(sandbox: Sandbox) -> Identity:
    """Who Popen makes the task process: the task uid when the node is root and
    bubblewrap does not switch uid itself (see ``bwrap_argv``); else the node's own."""
    owner = task_owner(sandbox)
    if owner is None or (sandbox.bwrap is not None and sandbox.setpriv is not None):
        return Identity()
    return Identity(user=owner[0], group=owner[1], extra_groups=[])


def task_owner(sandbox: Sandbox) -> tuple[int, int] | None:
    """(uid, gid) that must own what task code writes to, or None: the node's own."""
    return sandbox.run_as if sandbox.run_as is not None and os.geteuid() == 0 else None


def give_to_task(scratch: Path, sandbox: Sandbox, *names: str) -> None:
    """chown the scratch dir (or its entries ``names``) to the task uid, if there is one.

    Raises OSError if that fails.
    """
    owner = task_owner(sandbox)
    if owner is None:
        return
    uid, gid = owner
    for path in [scratch / name for name in names] if names else [scratch]:
        os.chown(path, uid, gid)
    if "." in names:
        # bwrap, still root but without capabilities, must be able to chdir into it.
        os.chmod(scratch, 0o711)


def limit_setter(
    limits: Limits, *, limit_cpu: bool, sandbox: Sandbox | None = None
) -> Callable[[], None]:
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
    if sandbox is not None and sandbox.run_as is not None and os.geteuid() == 0:
        # Counted per uid: only meaningful for a uid of its own (the node's user has its
        # desktop session on it, and root is exempt anyway).
        wanted.append((resource.RLIMIT_NPROC, MAX_PROCESSES))

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


# ------------------------------------------------------------ orphans without bwrap

PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>
_reaping = False
_own_children: set[int] = set()
_spawning = 0
_sweep_lock = threading.Lock()


def enable_orphan_reaping() -> bool:
    """Make this process a child subreaper, so that orphans of its runs are reparented
    to it and ``sweep_orphans`` can kill them. Only for the node process itself: every
    child of this process not registered with ``spawning`` is fair game afterwards.
    False where the kernel does not offer it."""
    global _reaping
    libc = _libc()
    if libc is None or libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return False
    _reaping = True
    return True


@contextlib.contextmanager
def spawning() -> Iterator[Callable[[int], None]]:
    """Around the start of a task process: yields a function to register its pid.

    Sweeps do not kill while a start is under way, nor any registered pid.
    """
    global _spawning
    _spawning += 1
    try:
        yield _own_children.add
    finally:
        _spawning -= 1


def forget_child(pid: int) -> None:
    """A registered task process was reaped."""
    _own_children.discard(pid)


def sweep_orphans() -> int:
    """Kill and reap the processes reparented to this (subreaper) node that are not its
    own task processes; returns how many. A no-op unless ``enable_orphan_reaping`` ran.
    Blocking (it reaps): call it from a worker thread."""
    if not _reaping:
        return 0
    me = os.getpid()
    candidates = [pid for pid in _children_of(me) if pid not in _own_children]
    killed: list[int] = []
    with _sweep_lock:
        for pid in candidates:
            if _spawning or pid in _own_children:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    for pid in killed:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    return len(killed)


def _children_of(parent: int) -> list[int]:
    """Pids whose parent is ``parent``, from /proc."""
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(parent).encode():
            found.append(int(name))
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of a live process and its live descendants (a task under bwrap runs two
    levels below the process the executor started). None if ``pid`` is gone.

    Called once per task of a persistent worker, on the event loop: it reads /proc with
    plain os calls (no pathlib), per process its stat file and, as most have one thread,
    that thread's children file (all threads' only for a multi-threaded process).
    """
    usage = _cpu_and_threads(pid)
    if usage is None:
        return None
    total = usage[0]
    pending = _children_of_threads(pid, usage[1])
    seen = {pid}
    while pending:
        child = pending.pop()
        if child in seen:
            continue
        seen.add(child)
        usage = _cpu_and_threads(child)
        if usage is not None:
            total += usage[0]
            pending.extend(_children_of_threads(child, usage[1]))
    return total


def _children_of_threads(pid: int, threads: int) -> list[int]:
    """The children of ``pid``; with one thread, read from that thread's file alone."""
    if threads != 1:
        return _direct_children(pid)
    try:
        return [int(word) for word in _read_proc(f"/proc/{pid}/task/{pid}/children").split()]
    except (OSError, ValueError):
        return []


def _direct_children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError):
            found.extend(
                int(word) for word in _read_proc(f"/proc/{pid}/task/{tid}/children").split()
            )
    return found


def _read_proc(path: str) -> bytes:
    """The whole of a small /proc file, read with plain os calls. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@functools.cache
def _clock_ticks() -> int:
    """Clock ticks per second, the unit of /proc/<pid>/stat's times. Raises ValueError."""
    return os.sysconf("SC_CLK_TCK")


NAMESPACE_RECORD = ".namespace-"  # + pid: in an executor's scratch root, see record_namespace
_NAMESPACE_WAIT = 2.0  # seconds to wait for bwrap to make its namespace's PID 1


def record_namespace(scratch_root: Path, bwrap_pid: int) -> Path | None:
    """Write down the PID 1 of the namespace ``bwrap_pid`` makes (its direct child), with
    its start time, in ``scratch_root/.namespace-<pid>``; the record's path, or None if
    bwrap ended first. The caller removes the record when bwrap has ended.

    Why: a node killed by SIGKILL cannot kill its runs, and under a root node their PID 1
    (``nobody``) does not get bwrap's die-with-parent signal (kill_group says why), so the
    namespace would outlive the node. The node restarted on the same data_dir ends such
    survivors (kill_recorded_namespaces). Blocking (it polls /proc): call from a thread.
    """
    deadline = time.monotonic() + _NAMESPACE_WAIT
    while not (children := _direct_children(bwrap_pid)):
        if time.monotonic() > deadline or _ended(bwrap_pid):
            return None
        time.sleep(0.002)
    pid = children[0]
    started = _start_time(pid)
    if started is None:
        return None
    try:
        record = scratch_root / f"{NAMESPACE_RECORD}{pid}"
        record.write_text(str(started), encoding="ascii")
    except OSError as exc:
        log.warning("sandbox: cannot record the namespace of pid %d: %s", pid, exc)
        return None
    return record


def kill_recorded_namespaces(scratch_root: Path) -> int:
    """SIGKILL every recorded namespace PID 1 still running (the same pid *and* start
    time: a reused pid is left alone) and forget every record; how many were killed."""
    killed = 0
    for record in scratch_root.glob(f"{NAMESPACE_RECORD}*"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(record.name.removeprefix(NAMESPACE_RECORD))
            started = int(record.read_text(encoding="ascii"))
            if _start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)
                killed += 1
        record.unlink(missing_ok=True)
    if killed:
        log.warning("sandbox: killed %d task sandbox(es) left running by a killed node", killed)
    return killed


def _ended(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (it exited, not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[:1] == [b"Z"]


def _start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def kill_group(pid: int) -> None:
    """SIGKILL the process group that ``pid`` leads, ``pid`` itself, and its direct
    children with the groups they lead.

    The children matter under bubblewrap as root: the task runs as pid 1 of its own
    namespace in its own session, and bwrap's die-with-parent signal never reaches it
    once it is nobody (the monitor, root without CAP_KILL, may not signal another uid).
    The node may, and SIGKILL to a namespace's pid 1 ends everything in it. ``pid`` is
    stopped first: a stopped parent cannot reap, so its children's pids stay theirs.
    A group or process that is already gone is fine.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGSTOP)
    for child in _direct_children(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def fresh_scratch(path: Path, sandbox: Sandbox | None = None) -> None:
    """Create an empty scratch directory with ``tmp/``, ``in/`` and ``out/``, replacing
    leftovers, owned by the sandbox's task uid if it has one.

    Raises OSError if the directory cannot be created.
    """
    remove_tree(path)  # a leftover from a crashed node must not leak into a new run
    path.mkdir(mode=0o700)
    (path / "tmp").mkdir(mode=0o700)
    (path / "in").mkdir(mode=0o700)
    (path / "out").mkdir(mode=0o700)
    if sandbox is not None:
        give_to_task(path, sandbox, ".", "tmp", "in", "out")


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
    usage = _cpu_and_threads(pid)
    return None if usage is None else usage[0]


def _cpu_and_threads(pid: int) -> tuple[float, int] | None:
    """(CPU seconds with reaped children, number of threads) of a live process, from
    /proc/<pid>/stat; None where /proc is unavailable or the process is gone."""
    try:
        stat = _read_proc(f"/proc/{pid}/stat")
        ticks = _clock_ticks()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    # Fields 14-17 are utime, stime, cutime, cstime, field 20 num_threads; index 0 is field 3.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return sum(int(value) for value in fields[11:15]) / ticks, int(fields[17])
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
