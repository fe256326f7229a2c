"""End-to-end harness: real hub and node processes, real sockets on 127.0.0.1, real signals.

Everything a test starts goes through the ``cluster`` fixture, which

* writes configs under the test's ``tmp_path`` and starts ``issc-hub`` / ``issc-node`` from
  the virtualenv that runs pytest, each with its log in ``<name>.log`` beside its config;
* on teardown kills every process it started, and then every process whose command line
  names a path under ``tmp_path`` (task processes of a node that was killed with SIGKILL
  are orphans, and their argv holds the bundle path under the node's data_dir), so nothing
  outlives the test, whatever the test did to it;
* prints the tail of every log when the test failed.

Timings are tight on purpose (heartbeat 0.5 s x 3 misses) so the whole suite stays short.
Helpers poll for conditions (``wait_until``) and never sleep as an assertion; a negative
claim ("this never happens") is checked by ``holds_for`` over a stated window.

How state is read:

* ``Hub.query(command, **args)``: the hub's control socket, directly (fast; for polling).
* ``Hub.tasks(project)`` / ``Hub.task_detail(project, id)``: ``issc-ctl --json tasks`` /
  ``task`` where ``hub/ctl.py`` exists, else the same question over the control socket.
* ``Hub.sql(...)``: the SQLite database, read-only, for what no command shows yet (the
  lease history of a task, exact hub-side timestamps).
* ``read_results(outbox, project)``: the outbox's results.jsonl, the owner's view.

Projects: the sample projects in examples/ (session fixtures ``primes_bundle``,
``mandelbrot_bundle``), and tiny ones written by ``write_project``; ``gate_program`` is a
task that waits at a gate file the test opens, so "a task is running" is a state a test
waits for rather than a guess about timing.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from issc.errors import KeyFormatError
from node.identity import node_id_in
from node.spool import read_journal

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
T = TypeVar("T")

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_MISSES = 3
LEASE_WINDOW = HEARTBEAT_INTERVAL * HEARTBEAT_MISSES
START_TIMEOUT = 20.0


def tool(name: str) -> str:
    """A console script of the venv that runs the tests (fallback: the repo's .venv)."""
    for directory in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        if (directory / name).exists():
            return str(directory / name)
    raise RuntimeError(f"console script {name} not found; is the package installed?")


def ctl_available() -> bool:
    """issc-ctl can run: its module exists (it may be written after this harness)."""
    return importlib.util.find_spec("hub.ctl") is not None


def run_tool(
    *argv: str, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc


# ---- polling ---------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that. Raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def holds_for(
    predicate: Callable[[], object], duration: float, interval: float = 0.05, what: str = ""
) -> None:
    """Assert that ``predicate`` stays truthy for ``duration`` seconds (a negative claim)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert predicate(), f"no longer true: {what or predicate}"
        time.sleep(interval)
    assert predicate(), f"no longer true: {what or predicate}"


def free_port() -> int:
    """A TCP port that was free a moment ago (for a hub that must keep its port on restart)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the owner's side: keys, bundles, task files, results -----------------------------------


@dataclass(frozen=True)
class OwnerKey:
    path: Path
    public: str  # "ed25519:..."


def make_key(path: Path) -> OwnerKey:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = run_tool("issc-project", "keygen", "--out", str(path))
    return OwnerKey(path, out.stdout.strip().splitlines()[-1])


def pack(project_dir: Path, key: OwnerKey, out: Path) -> Path:
    run_tool("issc-project", "pack", str(project_dir), "--key", str(key.path), "--out", str(out))
    return out


def write_project(
    directory: Path,
    name: str,
    program: str,
    *,
    mode: str = "process",
    version: int = 1,
    wall_seconds: int = 60,
    output_mb: int = 1,
) -> Path:
    """A tiny project: ``project.yaml`` and ``main.py`` holding ``program``."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": name,
        "version": version,
        "entrypoint": ["python3", "main.py"],
        "mode": mode,
        "limits": {"wall_seconds": wall_seconds, "memory_mb": 256, "output_mb": output_mb},
        "quorum": 1,
    }
    (directory / "project.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    (directory / "main.py").write_text(program)
    return directory


def write_tasks(path: Path, project: str, tasks: Iterable[tuple[str, Any]]) -> Path:
    """A task file, JSONL or YAML by the suffix of ``path``; ``tasks`` is (id, input) pairs."""
    items = [{"id": task_id, "input": value} for task_id, value in tasks]
    if path.suffix == ".jsonl":
        text = "".join(json.dumps({"project": project, **item}) + "\n" for item in items)
    else:
        text = yaml.safe_dump({"project": project, "tasks": items}, sort_keys=False)
    path.write_text(text)
    return path


def read_results(outbox: Path, project: str) -> list[dict[str, Any]]:
    """The complete lines of ``outbox/<project>/results.jsonl`` (none if it does not exist)."""
    path = outbox / project / "results.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # a line still being written has no newline yet
    return [json.loads(line) for line in lines if line.strip()]


def rewrite_bundle(source: Path, out: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """Copy a bundle member by member, in order, passing each member's data through
    ``change(name, data)``; the signed manifest and the signature travel unchanged."""
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    with tarfile.open(source, "r:gz") as tar:
        for member in tar:
            stream = tar.extractfile(member)
            data = stream.read() if stream is not None else b""
            members.append((member, data))
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for member, data in members:
            new = change(member.name, data)
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))
    out.write_bytes(buffer.getvalue())
    return out


def flip_byte(data: bytes, index: int = -2) -> bytes:
    """``data`` with one byte changed (same length, so only the hash can tell)."""
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


# ---- processes ------------------------------------------------------------------------------


class Proc:
    """One hub or node process, started from a YAML config, logging to a file."""

    kind = "proc"

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.config_path = root / f"{name}.yaml"
        self.log_path = root / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def argv(self) -> list[str]:
        return [tool(f"issc-{self.kind}"), "--config", str(self.config_path)]

    def start(self) -> Proc:
        assert not self.alive, f"{self.name} is already running"
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        with open(self.log_path, "ab") as log:
            log.write(f"==== start {' '.join(self.argv())}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; for SIGKILL also wait until the process is gone."""
        assert self.popen is not None
        os.kill(self.popen.pid, sig)
        if sig == signal.SIGKILL:
            self.popen.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; the exit status. Raises if it does not exit in time."""
        assert self.popen is not None
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s of SIGTERM"
            ) from None

    def force_stop(self) -> None:
        """Teardown: whatever state it is in (even SIGSTOPped), make it gone."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Hub(Proc):
    kind = "hub"

    def __init__(
        self,
        root: Path,
        name: str = "hub",
        *,
        port: int = 0,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        heartbeat_misses: int = HEARTBEAT_MISSES,
        offer_timeout: float = 5.0,
        max_attempts: int = 5,
        **extra: Any,
    ) -> None:
        super().__init__(root, name)
        self.data_dir = root / "data"
        self.settings: dict[str, Any] = {
            "listen": f"127.0.0.1:{port}",
            "data_dir": str(self.data_dir),
            "heartbeat_interval": heartbeat_interval,
            "heartbeat_misses": heartbeat_misses,
            "offer_timeout": offer_timeout,
            "max_attempts": max_attempts,
            **extra,
        }
        self._addr: str | None = None

    def config(self) -> dict[str, Any]:
        return self.settings

    @property
    def inbox(self) -> Path:
        return self.data_dir / "inbox"

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def addr_file(self) -> Path:
        return self.data_dir / "hub.addr"

    @property
    def control_socket(self) -> Path:
        configured = self.settings.get("control_socket")
        return Path(configured) if configured else self.data_dir / "control.sock"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hub.db"

    @property
    def addr(self) -> str:
        assert self._addr is not None, "hub not started"
        return self._addr

    def start(self) -> Hub:
        # A hub killed with SIGKILL leaves hub.addr behind: only a fresh one says "ready".
        self.addr_file.unlink(missing_ok=True)
        super().start()

        def ready() -> str | None:
            if not self.alive:
                raise AssertionError(f"{self.name} exited at start-up:\n{self.tail()}")
            with contextlib.suppress(FileNotFoundError):
                text = self.addr_file.read_text().strip()
                if text and self.control_socket.exists():
                    return text
            return None

        self._addr = wait_until(ready, START_TIMEOUT, what=f"{self.name} to write hub.addr")
        return self

    def restart(self) -> Hub:
        if self.alive:
            self.stop()
        return self.start()

    # ---- the owner's interface ----

    def submit(self, *files: Path) -> None:
        """``issc-project submit`` (atomic drop into the inbox)."""
        run_tool("issc-project", "submit", *map(str, files), "--inbox", str(self.inbox))

    def drop(self, name: str, data: bytes) -> None:
        """Put any file into the inbox atomically (hidden name, then rename): for names that
        ``issc-project submit`` would refuse to carry."""
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.inbox / name)

    def wait_ingested(self, name: str, timeout: float = 10.0) -> str:
        """Wait until the inbox has read ``name``; 'accepted' or 'rejected'."""
        wait_until(
            lambda: not (self.inbox / name).exists(), timeout, what=f"the hub to read {name}"
        )
        if (self.inbox / "rejected" / name).exists():
            return "rejected"
        assert (self.inbox / "accepted" / name).exists(), f"{name}: neither accepted nor rejected"
        return "accepted"

    def ingest(self, *files: Path) -> None:
        """Submit files and wait until each is accepted (fails with the hub's reason)."""
        self.submit(*files)
        for path in files:
            if self.wait_ingested(path.name) != "accepted":
                error = (self.inbox / "rejected" / f"{path.name}.error.txt").read_text()
                raise AssertionError(f"the hub rejected {path.name}: {error}")

    def results(self, project: str) -> list[dict[str, Any]]:
        return read_results(self.outbox, project)

    def wait_results(self, project: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            results = self.results(project)
            return results if len(results) >= count else None

        return wait_until(enough, timeout, what=f"{count} result lines for {project}")

    # ---- the admin's interface ----

    def query(self, command: str, **args: Any) -> Any:
        """One request on the control socket; the reply's data. Raises on an error reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.control_socket))
            sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
        if not reply.get("ok"):
            raise AssertionError(f"control {command}: {reply.get('error')}")
        return reply["data"]

    def ctl(self, *argv: str) -> Any:
        """``issc-ctl --socket ... --json ARGV``, parsed."""
        out = run_tool("issc-ctl", "--socket", str(self.control_socket), "--json", *argv)
        return json.loads(out.stdout)

    def tasks(self, project: str) -> list[dict[str, Any]]:
        """``[{"id", "state", "node", "attempts"}]``: issc-ctl where it exists."""
        if ctl_available():
            return list(self.ctl("tasks", project))
        return list(self.query("tasks", project=project))

    def task_detail(self, project: str, task_id: str) -> dict[str, Any]:
        """``issc-ctl --json task PROJECT ID``: the task with its lease ``history``."""
        if ctl_available():
            return dict(self.ctl("task", project, task_id))
        return dict(self.query("task", project=project, id=task_id))

    def task(self, project: str, task_id: str) -> dict[str, Any]:
        found = [t for t in self.query("tasks", project=project) if t["id"] == task_id]
        assert found, f"no task {task_id} in {project}"
        return dict(found[0])

    def connected_nodes(self) -> set[str]:
        return {n["node"] for n in self.query("nodes")}

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the hub's SQLite database (read-only; WAL lets us read while it writes)."""
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    def lease_history(self, project: str, task_id: str) -> list[dict[str, Any]]:
        """The leases of one task, oldest first (the hub's task history)."""
        rows = self.sql(
            "SELECT l.id, l.node_id, l.offered_at, l.accepted_at, l.ended_at, l.outcome, l.detail"
            " FROM leases l JOIN tasks t ON t.id = l.task_id JOIN projects p"
            " ON p.id = t.project_id WHERE p.name = ? AND t.name = ? ORDER BY l.id",
            project,
            task_id,
        )
        keys = ("id", "node", "offered_at", "accepted_at", "ended_at", "outcome", "detail")
        return [dict(zip(keys, row, strict=True)) for row in rows]


class Node(Proc):
    kind = "node"

    def __init__(
        self,
        root: Path,
        name: str,
        hub: str | Sequence[str],
        *,
        trusted_keys: dict[str, str],
        projects: Sequence[str] | None = None,
        volunteer: str = "alice",
        slots: int = 2,
        **extra: Any,
    ) -> None:
        super().__init__(root, name)
        self.data_dir = root / f"{name}-data"
        self.settings: dict[str, Any] = {
            "hub": hub if isinstance(hub, str) else list(hub),
            "volunteer": volunteer,
            "data_dir": str(self.data_dir),
            "projects": list(projects if projects is not None else trusted_keys),
            "trusted_keys": dict(trusted_keys),
            "slots": slots,
            # The gate program talks to its test through files outside its scratch dir
            # and reports its pid: it needs the node unsandboxed. Tests of real projects
            # pass sandbox="auto" (bubblewrap where installed, as a volunteer's node).
            "sandbox": "none",
            **extra,
        }

    def config(self) -> dict[str, Any]:
        return self.settings

    @property
    def node_id(self) -> str | None:
        """This node's id: it follows from the key the node makes on its first start."""
        try:
            return node_id_in(self.data_dir)
        except KeyFormatError:  # caught while the node is still writing its new key
            return None

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    def spooled(self) -> list[int]:
        """Leases whose results wait in the spool for the hub's acknowledgement."""
        if not self.spool.is_dir():
            return []
        return sorted(read_journal(self.spool).records)

    def wait_joined(self, hub: Hub, timeout: float = START_TIMEOUT) -> str:
        """Wait until the hub lists this node as connected; its node id."""

        def joined() -> str | None:
            if not self.alive:
                raise AssertionError(f"{self.name} exited:\n{self.tail()}")
            node_id = self.node_id
            return node_id if node_id and node_id in hub.connected_nodes() else None

        return wait_until(joined, timeout, what=f"{self.name} to join {hub.name}")


# ---- process sweeping --------------------------------------------------------------------------


def processes_naming(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ")
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and stat[stat.rfind(b")") + 2 :][:1] != b"Z":
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"


class Cluster:
    """Starts hubs and nodes for one test and makes sure none of them outlives it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []

    def hub(self, name: str = "hub", *, start: bool = True, **settings: Any) -> Hub:
        hub = Hub(self.root / name, name, **settings)
        self.procs.append(hub)
        return hub.start() if start else hub

    def node(
        self,
        hub: Hub | str | Sequence[str],
        name: str | None = None,
        *,
        start: bool = True,
        **settings: Any,
    ) -> Node:
        name = name or f"node{sum(isinstance(p, Node) for p in self.procs) + 1}"
        address = hub.addr if isinstance(hub, Hub) else hub
        node = Node(self.root / "nodes", name, address, **settings)
        self.procs.append(node)
        if start:
            node.start()
        return node

    def sweep(self) -> list[int]:
        """Kill every process started for this test, and any orphan naming its directory."""
        for proc in self.procs:
            proc.force_stop()
        marker = str(self.root) + os.sep
        leftovers = processes_naming(marker)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not processes_naming(marker), 5, what="orphans to die")
        return leftovers

    def report(self) -> str:
        parts = []
        for proc in self.procs:
            parts.append(f"----- {proc.name} ({proc.log_path}) -----\n{proc.tail(80)}")
        return "\n".join(parts)


GATE_PROGRAM = """\
import json, os, sys, time
from pathlib import Path

MODE = "@MODE@"
# <node data_dir>/bundles/<digest>/main.py: the node's name, as the harness named it.
NODE = Path(__file__).resolve().parents[2].name.removesuffix("-data")


def run(task, name):
    marks = Path(task["marks"])
    (marks / f"started.{NODE}.{name}.{os.getpid()}").write_text("")
    gates = [marks / "gate", marks / f"gate.{NODE}"]
    deadline = time.monotonic() + task.get("wait", 60)
    while not any(gate.exists() for gate in gates):
        if time.monotonic() > deadline:
            raise SystemExit("the gate never opened")
        time.sleep(0.02)
    return {"task": name, "node": NODE, "value": task.get("value")}


if MODE == "persistent":
    for line in sys.stdin:
        message = json.loads(line)
        result = run(message["input"], message["id"])
        print(json.dumps({"id": message["id"], "result": result}), flush=True)
else:
    print(json.dumps(run(json.load(sys.stdin), os.environ.get("ISSC_TASK_ID", "task"))))
"""


def gate_program(mode: str = "process") -> str:
    """A task that waits at a gate, for ``mode`` process or persistent.

    It records that it started (``marks/started.<node>.<task>.<pid>``), waits until
    ``marks/gate`` or ``marks/gate.<node>`` exists, and answers ``{"task", "node", "value"}``.
    Tests hold tasks "running" for as long as they need and release them at once, so no
    test waits for a fixed sleep to end.
    """
    return GATE_PROGRAM.replace("@MODE@", mode)


@dataclass(frozen=True)
class GateRun:
    node: str  # the harness name of the node that ran it
    task: str
    pid: int


@dataclass
class GateProject:
    name: str
    bundle: Path
    marks: Path

    def started(self) -> list[GateRun]:
        """Every run that has started so far."""
        out = []
        for path in self.marks.glob("started.*"):
            node, _, rest = path.name.removeprefix("started.").partition(".")
            task_id, _, pid = rest.rpartition(".")
            out.append(GateRun(node, task_id, int(pid)))
        return out

    def open_gate(self, node: str | None = None) -> None:
        """Let every waiting run finish, or only those on the node named ``node``."""
        (self.marks / ("gate" if node is None else f"gate.{node}")).write_text("")

    def task_input(self, value: Any = None) -> dict[str, Any]:
        return {"marks": str(self.marks), "value": value}


def run_example(example: str, script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run an owner-side script of a sample project (make_tasks.py, assemble.py...)."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / example / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
