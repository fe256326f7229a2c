"""Chaos harness, Jepsen style: a hub and nodes on 127.0.0.1 work through thousands of
tasks while a scheduler of faults acts on them; then every promise is checked.

    python bench/chaos.py [--tasks N] [--nodes K] [--duration S] [--seed X]
                          [--faults KIND,...] [--fault-count N] [--keep] [--report FILE]

What runs: a real ``issc-hub`` (SQLite) with its data_dir on a size-capped tmpfs where
root may mount one, and K real ``issc-node`` processes that reach the hub only through
``chaosproxy.ChaosProxy``, a TCP proxy in this process that can cut connections inside
a frame. Two projects this script writes and signs: ``chaosp`` (persistent mode) and
``chaosf`` (process mode; each task reads an input file and writes an output file); both
bundles carry ``--payload-mb`` of random bytes so that a bundle download is long enough
to be cut half way. Every result is a function of the task's input (SHA-256 of a salt
and the task's number; ``chaosf`` also the input file's digest), so a wrong result is
found by computing it again. Task files go into the inbox one after another during the
first half of the run, so ingestion happens under faults too.

Faults (``--faults``, default all), at times drawn from ``--seed``:

  hub_kill         kill -9 of the hub, restarted on the same port and data_dir
  hub_kill_commit  kill -9 of the hub, restarted with a failpoint (hub/faults.py,
                   ISSC_HUB_FAULTS) that SIGKILLs it inside its K-th group commit, after
                   the batch's statements and before the commit; then restarted again
  hub_kill_unacked the same at runtime.after_commit: a batch committed, none of its
                   messages (result acks, offers, cancels) sent
  hub_kill_export  the same at outbox.after_fsync: result lines appended and fsynced,
                   their length not recorded in the store
  hub_kill_upload  the same at upload.after_fsync: an output chunk durable, not acknowledged
  node_kill        kill -9 of a node and its task processes; restarted on its data_dir
  node_gone        kill -9 of a node, never restarted; a fresh node takes its place
  node_stop        SIGSTOP of a node and its tasks for longer than the lease window,
                   then SIGCONT
  conn_cut         some or all node connections cut inside a frame, in either direction
  bundle_cut       a new version of a project's bundle; the first download of it that
                   crosses the proxy is cut half way (the node must resume it)
  disk_full        the hub's filesystem filled to the last byte for a few seconds, then
                   freed (needs root and tmpfs; skipped with the reason otherwise); a
                   hub killed meanwhile is restarted on the full disk, as a supervisor
                   would, and each start that fails is counted

The hub kinds after hub_kill confirm each kill from the hub's log (one CRITICAL line per
failpoint kill) and count them by point: "kills inside a commit" is hub_kill_commit's.

After ``--duration`` seconds no new fault starts, every fault in progress is undone
(SIGCONT, disk freed, hub and nodes restarted), and the run drains: it waits until
every task is in the outbox. Then it reads the outbox, the hub's database (read-only)
and the control socket (``issc-ctl --json``), prints the figures and exits 1 if any
invariant is broken: lost, duplicated in the outbox, completed twice in the store, wrong
results, results accepted from a stale lease, tasks stuck in TA/A with no live node.

Everything it started is killed when it ends, on failure, Ctrl-C, SIGTERM and at the
hard deadline (``--deadline``) too; the tmpfs is always unmounted. ``--keep`` keeps the
work directory (logs, configs, a copy of the hub's data).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import heapq
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from chaosproxy import ChaosProxy, Cut
from cluster import BenchError, machine, terminate_as_interrupt

from node.spool import read_journal

BIN = Path(sys.executable).parent
MIB = 1024 * 1024
KINDS = (
    "hub_kill",
    "hub_kill_commit",
    "hub_kill_unacked",
    "hub_kill_export",
    "hub_kill_upload",
    "node_kill",
    "node_gone",
    "node_stop",
    "conn_cut",
    "bundle_cut",
    "disk_full",
)
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_MISSES = 3
LEASE_WINDOW = HEARTBEAT_INTERVAL * HEARTBEAT_MISSES
OFFER_TIMEOUT = 5.0
MAX_ATTEMPTS = 10
# Faults the hub injects itself (hub/faults.py): the kind, the failpoint its restarted hub
# is armed with, and the range K is drawn from (kill@K: the K-th time the point is
# reached after the restart; small, so that it fires within seconds).
FAILPOINTS = {
    "hub_kill_commit": ("store.before_commit", (2, 25)),
    "hub_kill_unacked": ("runtime.after_commit", (2, 25)),
    "hub_kill_export": ("outbox.after_fsync", (1, 4)),
    "hub_kill_upload": ("upload.after_fsync", (1, 3)),
}
# Beyond the one of each kind, faults are drawn with these weights (1 if not named): each
# failpoint fault kills the hub twice (from outside, then at its failpoint), so the kinds
# that kill the hub weigh about as much together as one other, or the hub would be down
# most of the run; most of their weight is on the kill inside a commit.
WEIGHTS = {
    "hub_kill": 0.3,
    "hub_kill_commit": 0.5,
    "hub_kill_unacked": 0.15,
    "hub_kill_export": 0.15,
    "hub_kill_upload": 0.15,
}
FAILPOINT_WAIT = 20.0  # seconds an armed hub that is up may take to reach its failpoint
POSTPONE_LIMIT = 15.0  # seconds a fault may wait for its target (a hub that is up, a node)
# Faults that kill the hub wait for each other (one failpoint armed at a time): longer.
HUB_POSTPONE_LIMIT = 30.0
# A connection cut needs a node connected; after a run of hub restarts every node may be
# in its reconnect back-off, which is up to 30 s (node/client.py BACKOFF_CAP): longer.
CONN_POSTPONE_LIMIT = 45.0
TICK = 0.05  # the main loop's longest sleep
PROJECTS = ("chaosp", "chaosf")
# Outcomes of a lease that must never be the one whose result a task kept: the lease
# ended because the task finished elsewhere, was cancelled, or was given back.
STALE_OUTCOMES = {"superseded", "cancelled", "declined", "code_error", "bundle_refused"}
# A result from a lease that ended this way may still win while its task is unfinished.
LATE_OUTCOMES = {"lost", "offer_expired"}

PERSISTENT_PY = '''\
"""chaosp: persistent mode; the result is a function of the input."""
import hashlib, json, sys, time
for line in sys.stdin:
    message = json.loads(line)
    x = message["input"]
    time.sleep(x["ms"] / 1000)
    digest = hashlib.sha256(f"{x['salt']}:{x['n']}".encode()).hexdigest()
    print(json.dumps({"id": message["id"], "result": {"n": x["n"], "h": digest}}), flush=True)
'''

PROCESS_PY = '''\
"""chaosf: process mode; reads in/data, writes out/digest.txt."""
import hashlib, json, os, sys, time
x = json.load(sys.stdin)
time.sleep(x["ms"] / 1000)
with open("in/data", "rb") as f:
    data_digest = hashlib.sha256(f.read()).hexdigest()
os.makedirs("out", exist_ok=True)
with open("out/digest.txt", "w") as f:
    f.write(f"{x['n']} {data_digest}\\n")
digest = hashlib.sha256(f"{x['salt']}:{x['n']}".encode()).hexdigest()
print(json.dumps({"n": x["n"], "h": digest, "in": data_digest}))
'''


class DeadlineExceeded(Exception):
    """The run's hard deadline passed."""


# ---- processes ----------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        table[int(entry.name)] = (int(rest[1]), rest[0].decode())
    return table


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children...)."""
    children: dict[int, list[int]] = defaultdict(list)
    for child, (parent, _state) in _proc_table().items():
        children[parent].append(child)
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def become_subreaper() -> bool:
    """Orphans of killed nodes (their task processes) become our children, so that we can
    find and end them by parentage, never by name."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


class Proc:
    """One hub or node process with its log file."""

    def __init__(self, name: str, program: str, config: Path, log: Path) -> None:
        self.name = name
        self.program = program
        self.config = config
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopped_pids: list[int] = []

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start it; ``env``: variables to add to this one start's environment."""
        with open(self.log, "ab") as log:
            extra = "".join(f" {k}={v}" for k, v in (env or {}).items())
            log.write(f"==== chaos: start {self.name} at {time.time():.3f}{extra}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                [str(BIN / self.program), "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env} if env else None,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> int:
        """SIGKILL the process and everything below it (a machine that dies); how many
        processes were killed."""
        if self.popen is None or self.popen.poll() is not None:
            return 0
        tree = descendants(self.popen.pid)
        self.popen.kill()  # first, so that it starts nothing more
        signal_all(tree, signal.SIGKILL)
        self.popen.wait(10)
        self.stopped_pids = []
        return 1 + len(tree)

    def sigstop(self) -> int:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGSTOP)
        self.stopped_pids = [self.popen.pid, *descendants(self.popen.pid)]
        signal_all(self.stopped_pids[1:], signal.SIGSTOP)
        return len(self.stopped_pids)

    def sigcont(self) -> None:
        signal_all(list(reversed(self.stopped_pids)), signal.SIGCONT)
        self.stopped_pids = []

    def terminate(self, timeout: float) -> None:
        """SIGTERM (after SIGCONT, should it be stopped), then SIGKILL of whatever remains."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.sigcont()
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill9()

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class NodeSlot:
    """A volunteer machine: its process and what the harness has done to it."""

    name: str
    proc: Proc
    data_dir: Path
    state: str = "up"  # up, stopped, down (killed, to be restarted), gone (for good)
    stopped_at: float = 0.0

    def spooled(self) -> int:
        """Results waiting in the node's spool for the hub's acknowledgement."""
        try:
            return len(read_journal(self.data_dir / "spool").records)
        except OSError:
            return 0


# ---- the workload -------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    project: str
    task_id: str
    n: int
    ms: int
    data: bytes | None  # chaosf: the input file's content

    def input(self, salt: str) -> dict[str, Any]:
        return {"n": self.n, "salt": salt, "ms": self.ms}

    def expected(self, salt: str) -> dict[str, Any]:
        digest = hashlib.sha256(f"{salt}:{self.n}".encode()).hexdigest()
        if self.data is None:
            return {"n": self.n, "h": digest}
        return {"n": self.n, "h": digest, "in": hashlib.sha256(self.data).hexdigest()}

    def expected_output(self) -> bytes:
        assert self.data is not None
        return f"{self.n} {hashlib.sha256(self.data).hexdigest()}\n".encode()


def make_workload(
    tasks: int, file_every: int, task_ms: tuple[int, int], rng: random.Random
) -> list[TaskSpec]:
    specs = []
    for n in range(tasks):
        ms = rng.randint(*task_ms)
        if file_every > 0 and n % file_every == file_every - 1:
            data = rng.randbytes(rng.randint(512, 8192))
            specs.append(TaskSpec("chaosf", f"f-{n}", n, ms, data))
        else:
            specs.append(TaskSpec("chaosp", f"p-{n}", n, ms, None))
    return specs


# ---- faults -------------------------------------------------------------------------------


@dataclass
class FaultCtx:
    index: int
    kind: str
    planned_at: float  # seconds from the start of the run
    rng: random.Random
    step: int = 0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(order=True)
class Action:
    at: float
    seq: int
    fn: Callable[[], float | None] = field(compare=False)
    what: str = field(compare=False)
    recovery: bool = field(compare=False, default=False)  # undoes a fault: run it at the end


# Kinds that need work flowing (results in flight, tasks waiting for a node) are planned
# in the first part of the fault period, while the task files still feed the queue.
NEED_WORK = {*FAILPOINTS, "bundle_cut"}


def plan_faults(
    kinds: list[str], count: int, start: float, end: float, seed: int
) -> list[FaultCtx]:
    """Every kind at least once (if ``count`` allows), the rest drawn at random (WEIGHTS);
    times uniform in [start, end] ([start, 0.6 end] for NEED_WORK kinds). The same seed
    gives the same plan."""
    rng = random.Random(f"plan-{seed}")
    sequence = list(kinds)
    rng.shuffle(sequence)
    weights = [WEIGHTS.get(kind, 1.0) for kind in kinds]
    while len(sequence) < count:
        sequence.append(rng.choices(kinds, weights)[0])
    sequence = sequence[:count]
    timed = sorted(
        (rng.uniform(start, max(start, end * 0.6) if kind in NEED_WORK else end), kind)
        for kind in sequence
    )
    return [
        FaultCtx(i, kind, at, random.Random(f"fault-{seed}-{i}"))
        for i, (at, kind) in enumerate(timed)
    ]


def tmpfs_problem(mount: Path, size_mb: int) -> str | None:
    """Mount a ``size_mb`` tmpfs at ``mount``; None if it worked, else why not."""
    if os.geteuid() != 0:
        return "needs root to mount a size-capped tmpfs for the hub's data_dir"
    if shutil.which("mount") is None:
        return "needs the mount command"
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if done.returncode != 0:
        return f"mount -t tmpfs failed: {(done.stderr or done.stdout).strip()}"
    return None


def unmount(mount: Path) -> None:
    for args in (["umount", str(mount)], ["umount", "-l", str(mount)]):
        done = subprocess.run(args, capture_output=True, text=True, timeout=20)
        if done.returncode == 0:
            return
    print(f"chaos: could not unmount {mount}", file=sys.stderr)


def fill_disk(path: Path) -> int:
    """Write ``path`` until the filesystem has no byte left; the bytes written."""
    written = 0
    block = b"\0" * MIB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (MIB, 64 * 1024, 4096, 512, 1):
            chunk = block[:size]
            while True:
                try:
                    n = os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < size:
                    break
    finally:
        os.close(fd)
    return written


# ---- the harness --------------------------------------------------------------------------


@dataclass
class Options:
    tasks: int = 2000
    nodes: int = 3
    slots: int = 2
    duration: float = 120.0
    seed: int = 0
    faults: list[str] = field(default_factory=lambda: list(KINDS))
    fault_count: int = 0  # 0: one per 5 s of duration, at least one per kind
    task_ms: tuple[int, int] | None = None
    file_every: int = 5
    payload_mb: float = 3.0
    disk_mb: int = 256
    task_files: int = 0  # 0: about one per 250 tasks, at least 4
    drain: float = 120.0
    deadline: float = 0.0  # 0: duration + drain + 180
    keep: bool = False
    directory: Path | None = None
    report: Path | None = None
    quiet: bool = False


class Chaos:
    def __init__(self, opts: Options, work: Path) -> None:
        self.opts = opts
        self.work = work
        self.salt = f"salt-{opts.seed}"
        self.rng = random.Random(f"run-{opts.seed}")
        self.t0 = time.monotonic()
        self.timeline: list[str] = []
        self.timeline_file = open(work / "timeline.log", "a", encoding="utf-8")  # noqa: SIM115
        self.actions: list[Action] = []
        self.seq = 0
        # faults
        self.scheduled: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()
        self.not_fired: dict[str, list[str]] = defaultdict(list)
        self.skipped_kinds: dict[str, str] = {}
        self.fault_notes: dict[str, list[str]] = defaultdict(list)
        # events noticed, not injected
        self.anomalies: list[str] = []
        self.hub_deaths: list[str] = []  # exits nobody asked for
        self.hub_start_failures = 0
        self.start_failure_reasons: Counter[str] = Counter()
        self.hub_restarts = 0
        self.node_deaths: list[str] = []
        self.submit_retries = 0
        # the pieces
        self.mount = work / "hubfs"
        self.disk_problem: str | None = None
        self.hub_data = work / "hub-data"
        self.hub: Proc | None = None
        self.hub_state = "down"  # up, starting, down (by us: restart pending), dead
        self.hub_serial = 0  # hub starts so far
        # A failpoint fault whose armed hub has not killed itself yet, and the spec every
        # hub start gets meanwhile (ISSC_HUB_FAULTS).
        self.armed: FaultCtx | None = None
        self.hub_faults: str | None = None
        self.failpoint_kills: Counter[str] = Counter()  # by point, confirmed from the log
        self.failpoint_record: list[dict[str, Any]] = []
        self.outages_seen: list[int] = []  # per hub start: the most `outages` status showed
        self.degraded_seen = 0  # status polls that found the hub degraded
        self.next_status = 0.0
        self.hub_port = 0
        self.proxy: ChaosProxy | None = None
        self.nodes: list[NodeSlot] = []
        self.node_serial = 0
        self.public_key = ""
        self.versions = dict.fromkeys(PROJECTS, 1)
        self.bundle_sizes: dict[str, int] = {}
        self.disk_full = False
        self.filler: Path | None = None
        self.specs: list[TaskSpec] = []
        self.task_files: list[tuple[float, list[Path], list[TaskSpec]]] = []
        self.submitted: dict[str, TaskSpec] = {}  # by "project/id"
        self.outbox_seen = 0
        self.last_progress = 0.0
        self.started_work = 0.0
        self.drained_at: float | None = None
        self.settled_after = 0.0
        self.next_reap = 0.0

    # ---- bookkeeping --------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        line = f"[{self.now():7.2f}s] {text}"
        self.timeline.append(line)
        self.timeline_file.write(line + "\n")
        self.timeline_file.flush()
        if not self.opts.quiet:
            print(line, flush=True)

    def schedule(
        self, at: float, fn: Callable[[], float | None], what: str, recovery: bool = False
    ) -> None:
        self.seq += 1
        heapq.heappush(self.actions, Action(at, self.seq, fn, what, recovery))

    def run_due(self, until: float) -> None:
        while self.actions and self.actions[0].at <= until:
            action = heapq.heappop(self.actions)
            again = action.fn()
            if again is not None:
                self.seq += 1
                heapq.heappush(
                    self.actions,
                    Action(again, self.seq, action.fn, action.what, action.recovery),
                )

    # ---- set-up --------------------------------------------------------------------------

    def tool(self, *args: str | Path) -> str:
        command = [str(BIN / "issc-project"), *map(str, args)]
        done = subprocess.run(command, cwd=self.work, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command)} failed:\n{done.stderr}{done.stdout}")
        return done.stdout.strip()

    def pack(self, project: str, version: int) -> Path:
        directory = self.work / "src" / f"{project}-{version}"
        directory.mkdir(parents=True)
        entry, source, mode = (
            ("worker.py", PERSISTENT_PY, "persistent")
            if project == "chaosp"
            else ("main.py", PROCESS_PY, "process")
        )
        (directory / entry).write_text(source, encoding="utf-8")
        payload = random.Random(f"payload-{self.opts.seed}-{project}").randbytes(
            int(self.opts.payload_mb * MIB)
        )
        (directory / "payload.bin").write_bytes(payload)
        (directory / "project.yaml").write_text(
            f"name: {project}\nversion: {version}\nentrypoint: [python3, {entry}]\n"
            f"mode: {mode}\nlimits: {{wall_seconds: 60, memory_mb: 256, output_mb: 1}}\n"
            "quorum: 1\n",
            encoding="utf-8",
        )
        bundle = self.work / "bundles" / f"{project}-{version}.issc"
        bundle.parent.mkdir(exist_ok=True)
        self.tool("pack", directory, "--key", "owner.key", "--out", bundle)
        self.bundle_sizes[project] = bundle.stat().st_size
        return bundle

    def submit(self, *paths: Path) -> bool:
        """``issc-project submit`` into the hub's inbox; False if it failed (disk full)."""
        command = [str(BIN / "issc-project"), "submit", *map(str, paths), "--inbox"]
        command.append(str(self.hub_data / "inbox"))
        done = subprocess.run(command, cwd=self.work, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            self.submit_retries += 1
            self.say(f"submit of {paths[-1].name} failed, will retry: {done.stderr.strip()[-200:]}")
            return False
        return True

    def setup(self) -> None:
        opts = self.opts
        if "disk_full" in opts.faults:
            self.disk_problem = tmpfs_problem(self.mount, opts.disk_mb)
            if self.disk_problem is None:
                self.hub_data = self.mount / "data"
            else:
                self.skipped_kinds["disk_full"] = self.disk_problem
                self.say(f"disk_full skipped: {self.disk_problem}")
        self.hub_data.mkdir(mode=0o755, parents=True, exist_ok=True)
        (self.hub_data / "inbox").mkdir(exist_ok=True)
        self.public_key = self.tool("keygen", "--out", "owner.key").split()[-1]
        bundles = [self.pack(p, 1) for p in PROJECTS]

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.hub_port = probe.getsockname()[1]
        (self.work / "hub.yaml").write_text(
            f"listen: 127.0.0.1:{self.hub_port}\ndata_dir: {self.hub_data}\n"
            f"heartbeat_interval: {HEARTBEAT_INTERVAL}\nheartbeat_misses: {HEARTBEAT_MISSES}\n"
            f"offer_timeout: {OFFER_TIMEOUT}\nmax_attempts: {MAX_ATTEMPTS}\n",
            encoding="utf-8",
        )
        self.hub = Proc("hub", "issc-hub", self.work / "hub.yaml", self.work / "hub.log")
        self.start_hub()
        deadline = time.monotonic() + 30
        while self.hub_state != "up":
            self.run_due(self.now())
            if time.monotonic() > deadline:
                raise BenchError(f"the hub did not start:\n{self.hub.tail()}")
            time.sleep(0.02)
        self.proxy = ChaosProxy("127.0.0.1", self.hub_port)
        self.proxy.start()
        self.proxy.on_cut = self.on_cut
        for _ in range(opts.nodes):
            self.add_node()
        while not self.submit(*bundles):
            time.sleep(0.5)
        self.wait(
            lambda: {p["name"] for p in self.control("projects")} >= set(PROJECTS),
            30,
            "both projects registered",
        )
        self.wait(
            lambda: self.control("status")["nodes"]["connected"] >= opts.nodes,
            30,
            f"{opts.nodes} nodes connected",
        )
        # The workload, cut into task files dropped one after another in the first half.
        if opts.task_ms is None:
            slots = opts.nodes * opts.slots
            mean = max(10, min(2000, int(600 * opts.duration * slots / max(1, opts.tasks))))
            opts.task_ms = (mean // 2, mean * 3 // 2)
        self.specs = make_workload(opts.tasks, opts.file_every, opts.task_ms, self.rng)
        files = opts.task_files or max(4, opts.tasks // 250)
        files = min(files, max(1, opts.tasks))
        tasks_dir = self.work / "tasks"
        (tasks_dir / "inputs").mkdir(parents=True)
        for i in range(files):
            part = self.specs[i::files]
            if not part:
                continue
            at = opts.duration * 0.5 * i / files
            paths = []
            for project in PROJECTS:  # a task file holds the tasks of one project
                ours = [spec for spec in part if spec.project == project]
                if not ours:
                    continue
                path = tasks_dir / f"tasks-{i:03d}-{project}.jsonl"
                with path.open("w", encoding="utf-8") as out:
                    for spec in ours:
                        line: dict[str, Any] = {
                            "project": spec.project,
                            "id": spec.task_id,
                            "input": spec.input(self.salt),
                        }
                        if spec.data is not None:
                            name = f"inputs/data-{spec.n}.bin"
                            (tasks_dir / name).write_bytes(spec.data)
                            line["files"] = {"data": name}
                        out.write(json.dumps(line) + "\n")
                paths.append(path)
            self.task_files.append((at, paths, part))

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.run_due(self.now())
            try:
                if ready():
                    return
            except Exception as exc:  # the hub is not up yet, say
                last = exc
            time.sleep(0.05)
        raise BenchError(f"no {what} after {timeout:g} s ({last or 'no error'})")

    def control(self, command: str, timeout: float = 5, **args: Any) -> Any:
        from hub.ctl import request

        return request(self.hub_data / "control.sock", command, args, timeout=timeout)

    def ctl_json(self, *argv: str) -> Any:
        """``issc-ctl --json ...``, the admin's interface, for the final checks."""
        command = [str(BIN / "issc-ctl"), "--socket", str(self.hub_data / "control.sock")]
        done = subprocess.run(
            [*command, "--json", *argv], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise BenchError(f"issc-ctl {' '.join(argv)}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    # ---- the hub ---------------------------------------------------------------------------

    def start_hub(self) -> None:
        assert self.hub is not None
        (self.hub_data / "hub.addr").unlink(missing_ok=True)
        self.hub.start({"ISSC_HUB_FAULTS": self.hub_faults} if self.hub_faults else None)
        self.hub_state = "starting"
        self.hub_serial += 1
        self.outages_seen.append(0)
        serial = self.hub_serial
        started = time.monotonic()

        def ready() -> float | None:
            assert self.hub is not None
            if serial != self.hub_serial or self.hub_state != "starting":
                return None  # killed at its failpoint while starting: restarted already
            if not self.hub.alive:
                if self.check_failpoint():
                    return None
                self.hub_start_failures += 1
                why = self.hub.tail(3).replace("\n", " | ")
                said = [line for line in self.hub.tail(6).splitlines() if "error:" in line]
                reason = said[-1][:200] if said else self.hub.tail(1)[:200]
                self.start_failure_reasons[
                    f"{reason} ({'disk full' if self.disk_full else 'disk not full'})"
                ] += 1
                self.say(f"hub exited while starting (status {self.hub.popen.returncode}): {why}")  # type: ignore[union-attr]
                self.hub_state = "dead"
                self.schedule(self.now() + 1.0, self.restart_hub_when_possible, "hub restart", True)
                return None
            if (self.hub_data / "hub.addr").exists():
                with contextlib.suppress(Exception):
                    self.control("status")
                    self.hub_state = "up"
                    return None
            if time.monotonic() - started > 30:
                self.anomalies.append("hub did not become ready within 30 s of a start")
                self.hub.kill9()
                self.hub_state = "dead"
                self.schedule(self.now() + 1.0, self.restart_hub_when_possible, "hub restart", True)
                return None
            return self.now() + 0.02

        self.schedule(self.now(), ready, "hub ready?", True)

    def restart_hub_when_possible(self) -> float | None:
        """Start the hub again, as a supervisor would: also on a full disk, where a start
        that fails is counted and tried again a second later (``ready``)."""
        if self.hub_state in ("up", "starting"):
            return None
        self.hub_restarts += 1
        self.start_hub()
        return None

    def check_hub(self) -> None:
        """A hub that exited without being killed by us: record why, restart it."""
        assert self.hub is not None
        if self.check_failpoint():
            return
        if self.hub_state != "up" or self.hub.alive:
            return
        status = self.hub.popen.returncode if self.hub.popen else None
        lines = [
            line
            for line in self.hub.tail(40).splitlines()
            if " ERROR " in line or "Error" in line or "error:" in line
        ]
        why = lines[-1][:300] if lines else self.hub.tail(1)[:300]
        context = " during disk_full" if self.disk_full else ""
        record = f"hub exited with status {status}{context} at {self.now():.1f} s: {why}"
        self.hub_deaths.append(record)
        self.say(record)
        self.hub_state = "dead"
        self.schedule(self.now() + 0.5, self.restart_hub_when_possible, "hub restart", True)

    def hub_log_size(self) -> int:
        try:
            return (self.work / "hub.log").stat().st_size
        except FileNotFoundError:
            return 0

    def failpoint_lines(self, offset: int = 0) -> list[str]:
        """The hub's CRITICAL lines of failpoint kills (hub/faults.py), from ``offset``."""
        try:
            with open(self.work / "hub.log", "rb") as log:
                log.seek(offset)
                text = log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [
            line
            for line in text.splitlines()
            if " CRITICAL hub.faults: failpoint " in line and "killing the process" in line
        ]

    def check_failpoint(self) -> bool:
        """True if the hub exited because its armed failpoint fired: SIGKILLed, and its log
        says so in one CRITICAL line; the fault is then done and a clean hub restarts."""
        ctx = self.armed
        if ctx is None or self.hub is None or self.hub.popen is None or self.hub.alive:
            return False
        point = ctx.data["point"]
        lines = [
            line
            for line in self.failpoint_lines(ctx.data["log_offset"])
            if f"failpoint {point} reached" in line
        ]
        if not lines or self.hub.popen.returncode != -signal.SIGKILL:
            return False  # it died of something else: check_hub or ready() see to it
        self.failpoint_kills[point] += 1
        self.armed = None
        self.hub_faults = None
        ctx.data["done"] = True
        self.hub_state = "down"
        up_at = ctx.data.get("up_at")
        after = (
            f"{self.now() - up_at:.2f} s after the armed hub was up"
            if up_at is not None
            else "while the armed hub was starting"
        )
        self.failpoint_record.append(
            {
                "kind": ctx.kind,
                "point": point,
                "k": ctx.data["k"],
                "seconds_up": round(self.now() - up_at, 2) if up_at is not None else None,
                "unacknowledged_at_first_kill": ctx.data["in_flight"],
            }
        )
        delay = ctx.rng.uniform(0.3, 2.0)
        self.fire(
            ctx,
            f"the hub killed itself at {point} (kill@{ctx.data['k']}), {after}; "
            f"restart in {delay:.1f} s",
        )
        self.schedule(self.now() + delay, self.restart_hub_when_possible, "hub restart", True)
        return True

    def poll_status(self) -> None:
        """Once a second: the hub's `outages` (since its start) and whether it is degraded."""
        if self.hub_state != "up" or self.now() < self.next_status:
            return
        self.next_status = self.now() + 1.0
        with contextlib.suppress(Exception):
            status = self.control("status", timeout=1)
            self.outages_seen[-1] = max(self.outages_seen[-1], int(status.get("outages") or 0))
            if status.get("degraded"):
                self.degraded_seen += 1

    # ---- nodes ------------------------------------------------------------------------------

    def add_node(self) -> NodeSlot:
        assert self.proxy is not None
        name = f"node-{self.node_serial}"
        self.node_serial += 1
        data_dir = self.work / "nodes" / name
        data_dir.parent.mkdir(exist_ok=True)
        keys = "".join(f'  {p}: "{self.public_key}"\n' for p in PROJECTS)
        config = self.work / "nodes" / f"{name}.yaml"
        config.write_text(
            f"hub: 127.0.0.1:{self.proxy.port}\nvolunteer: vol-{name}\ndata_dir: {data_dir}\n"
            f"projects: [{', '.join(PROJECTS)}]\nslots: {self.opts.slots}\n"
            f"trusted_keys:\n{keys}",
            encoding="utf-8",
        )
        slot = NodeSlot(
            name, Proc(name, "issc-node", config, self.work / "nodes" / f"{name}.log"), data_dir
        )
        slot.proc.start()
        self.nodes.append(slot)
        return slot

    def check_nodes(self) -> None:
        for slot in self.nodes:
            if slot.state in ("up", "stopped") and not slot.proc.alive:
                status = slot.proc.popen.returncode if slot.proc.popen else None
                record = f"{slot.name} exited with status {status}: " + slot.proc.tail(2).replace(
                    "\n", " | "
                )
                self.node_deaths.append(record)
                self.say(record)
                slot.state = "down"
                self.schedule(self.now() + 1.0, self._restart_node(slot), "node restart", True)

    def _restart_node(self, slot: NodeSlot) -> Callable[[], float | None]:
        def restart() -> float | None:
            if slot.state == "down":
                slot.proc.start()
                slot.state = "up"
            return None

        return restart

    def live_nodes(self, *states: str) -> list[NodeSlot]:
        return [s for s in self.nodes if s.state in (states or ("up",))]

    # ---- faults ------------------------------------------------------------------------------

    def fire(self, ctx: FaultCtx, detail: str) -> None:
        self.fired[ctx.kind] += 1
        self.say(f"FAULT {ctx.index} {ctx.kind}: {detail}")

    def postpone(self, ctx: FaultCtx, reason: str) -> float | None:
        if ctx.kind in {"hub_kill", *FAILPOINTS}:
            limit = HUB_POSTPONE_LIMIT
        elif ctx.kind == "conn_cut":
            limit = CONN_POSTPONE_LIMIT
        else:
            limit = POSTPONE_LIMIT
        if self.now() - ctx.planned_at > limit:
            self.not_fired[ctx.kind].append(reason)
            self.say(f"fault {ctx.index} {ctx.kind} not fired: {reason}")
            return None
        return self.now() + 0.1

    def fault_action(self, ctx: FaultCtx) -> Callable[[], float | None]:
        name = "f_failpoint" if ctx.kind in FAILPOINTS else f"f_{ctx.kind}"
        handler: Callable[[FaultCtx], float | None] = getattr(self, name)
        return lambda: handler(ctx)

    def f_hub_kill(self, ctx: FaultCtx) -> float | None:
        assert self.hub is not None
        if self.armed is not None:
            return self.postpone(ctx, f"a failpoint is armed ({self.armed.kind})")
        if self.hub_state != "up":
            return self.postpone(ctx, f"the hub is {self.hub_state}")
        in_flight = sum(s.spooled() for s in self.live_nodes())
        self.hub.kill9()
        self.hub_state = "down"
        delay = ctx.rng.uniform(0.3, 2.5)
        self.fire(
            ctx, f"kill -9 hub ({in_flight} results unacknowledged); restart in {delay:.1f} s"
        )
        self.schedule(self.now() + delay, self.restart_hub_when_possible, "hub restart", True)
        return None

    def f_failpoint(self, ctx: FaultCtx) -> float | None:
        """kill -9 of the hub, restarted with ISSC_HUB_FAULTS=POINT=kill@K: the restarted hub
        SIGKILLs itself the K-th time it reaches POINT (hub/faults.py), which the hub's log
        confirms (check_failpoint); then a hub without failpoints is started."""
        assert self.hub is not None
        point, (low, high) = FAILPOINTS[ctx.kind]
        if ctx.step == 0:
            if self.armed is not None:
                return self.postpone(ctx, f"another failpoint is armed ({self.armed.kind})")
            if self.hub_state != "up":
                return self.postpone(ctx, f"the hub is {self.hub_state}")
            if point == "upload.after_fsync" and not self.waiting_in("chaosf"):
                return self.postpone(ctx, "no chaosf task waiting: nothing would upload")
            k = ctx.rng.randint(low, high)
            in_flight = sum(s.spooled() for s in self.live_nodes())
            ctx.data.update(
                point=point,
                k=k,
                in_flight=in_flight,
                log_offset=self.hub_log_size(),
                armed_at=self.now(),
            )
            self.hub.kill9()
            self.hub_state = "down"
            self.armed = ctx
            self.hub_faults = f"{point}=kill@{k}"
            delay = ctx.rng.uniform(0.2, 1.0)
            self.say(
                f"fault {ctx.index} {ctx.kind}: kill -9 hub ({in_flight} results "
                f"unacknowledged); restart in {delay:.1f} s with ISSC_HUB_FAULTS={self.hub_faults}"
            )
            self.schedule(self.now() + delay, self.restart_hub_when_possible, "hub restart", True)
            ctx.step = 1
            return self.now() + 0.05
        if ctx.data.get("done"):
            return None
        if self.hub_state == "up" and "up_at" not in ctx.data:
            ctx.data["up_at"] = self.now()
        up_at = ctx.data.get("up_at")
        waited = self.now() - up_at if up_at is not None else 0.0
        if waited < FAILPOINT_WAIT and self.now() - ctx.data["armed_at"] < 3 * FAILPOINT_WAIT:
            return self.now() + 0.02
        # Not reached in time (no work flowing?): a hub without the failpoint takes over.
        reason = f"{point} not reached {ctx.data['k']} times in {waited:.0f} s of the armed hub"
        self.not_fired[ctx.kind].append(reason)
        self.say(f"fault {ctx.index} {ctx.kind} not fired: {reason}; restarting the hub")
        self.armed = None
        self.hub_faults = None
        if self.hub.alive:
            self.hub.terminate(10)
        if self.hub_state in ("up", "starting"):
            self.hub_state = "down"
            self.schedule(self.now(), self.restart_hub_when_possible, "hub restart", True)
        return None

    def waiting_in(self, project: str) -> int:
        """Unfinished tasks of ``project`` (NA, TA, A), as the hub says; 0 if it cannot."""
        try:
            for entry in self.control("projects", timeout=1):
                if entry["name"] == project:
                    return sum(entry["tasks"].get(state, 0) for state in ("NA", "TA", "A"))
        except Exception:
            pass
        return 0

    def f_node_kill(self, ctx: FaultCtx) -> float | None:
        targets = self.live_nodes("up", "stopped")
        if not targets:
            return self.postpone(ctx, "no node alive")
        slot = ctx.rng.choice(targets)
        spooled = slot.spooled()
        killed = slot.proc.kill9()
        slot.state = "down"
        delay = ctx.rng.uniform(0.5, 3.0)
        self.fire(
            ctx,
            f"kill -9 {slot.name} ({killed} processes, {spooled} results spooled); "
            f"restart in {delay:.1f} s",
        )
        self.schedule(self.now() + delay, self._restart_node(slot), "node restart", True)
        return None

    def f_node_gone(self, ctx: FaultCtx) -> float | None:
        targets = self.live_nodes("up", "stopped")
        if not targets:
            return self.postpone(ctx, "no node alive")
        slot = ctx.rng.choice(targets)
        spooled = slot.spooled()
        killed = slot.proc.kill9()
        slot.state = "gone"
        delay = ctx.rng.uniform(0.5, 3.0)
        self.fire(
            ctx,
            f"kill -9 {slot.name} for good ({killed} processes, {spooled} results spooled "
            f"abandoned); a fresh node in {delay:.1f} s",
        )

        def replace() -> float | None:
            fresh = self.add_node()
            self.say(f"{fresh.name} started in place of {slot.name}")
            return None

        self.schedule(self.now() + delay, replace, "fresh node", True)
        return None

    def f_node_stop(self, ctx: FaultCtx) -> float | None:
        targets = self.live_nodes("up")
        if not targets:
            return self.postpone(ctx, "no running node")
        slot = ctx.rng.choice(targets)
        seconds = ctx.rng.uniform(LEASE_WINDOW + 0.5, LEASE_WINDOW * 2.5)
        stopped = slot.proc.sigstop()
        slot.state = "stopped"
        self.fire(ctx, f"SIGSTOP {slot.name} ({stopped} processes) for {seconds:.1f} s")

        def cont() -> float | None:
            if slot.state == "stopped":
                slot.proc.sigcont()
                slot.state = "up"
                self.say(f"SIGCONT {slot.name}")
            return None

        self.schedule(self.now() + seconds, cont, "SIGCONT", True)
        return None

    def f_conn_cut(self, ctx: FaultCtx) -> float | None:
        assert self.proxy is not None
        if ctx.step == 0:
            if self.proxy.connections() == 0:
                return self.postpone(ctx, "no connection open")
            fraction = ctx.rng.choice((0.34, 0.5, 1.0))
            ctx.data["cuts_before"] = len(self.proxy.cuts)
            ctx.data["armed"] = self.proxy.cut_connections(fraction, ctx.rng)
            ctx.data["since"] = self.now()
            ctx.step = 1
        cuts = [c for c in self.proxy.cuts[ctx.data["cuts_before"] :] if c.kind == "mid_frame"]
        if len(cuts) < ctx.data["armed"] and self.now() - ctx.data["since"] < 3:
            return self.now() + 0.02
        if not cuts:
            # The armed connections were quiet (a stopped node's, say): try others.
            self.proxy.disarm_connections()
            ctx.step = 0
            return self.postpone(ctx, "no frame crossed the armed connections in 3 s")
        where = ", ".join(f"{c.direction} {c.frame_offset}/{c.frame_size} B" for c in cuts)
        self.fire(
            ctx, f"{len(cuts)} of {ctx.data['armed']} armed connections cut mid-frame ({where})"
        )
        return None

    def f_bundle_cut(self, ctx: FaultCtx) -> float | None:
        assert self.proxy is not None
        if ctx.step == 0:
            if self.hub_state != "up":
                return self.postpone(ctx, f"the hub is {self.hub_state}")
            if self.proxy.transfer_cut_armed():
                return self.postpone(ctx, "another bundle cut is armed")
            try:
                waiting = {
                    p["name"]: p["tasks"].get("NA", 0) + p["tasks"].get("TA", 0)
                    for p in self.control("projects")
                }
            except Exception:
                return self.now() + 0.2
            candidates = [p for p in PROJECTS if waiting.get(p, 0) > 0]
            if not candidates:
                return self.postpone(ctx, "no waiting task: nobody would fetch a new bundle")
            project = max(candidates, key=lambda p: waiting[p])
            version = self.versions[project] + 1
            bundle = self.pack(project, version)
            ctx.data.update(project=project, version=version, bundle=bundle)
            ctx.data["threshold"] = self.bundle_sizes[project] // 2
            ctx.data["cuts_before"] = len(self.proxy.cuts)
            ctx.step = 1
        if ctx.step == 1:
            self.proxy.arm_transfer_cut(ctx.data["threshold"])
            if not self.submit(ctx.data["bundle"]):
                self.proxy.disarm_transfer_cut()
                return self.now() + 0.5
            self.versions[ctx.data["project"]] = ctx.data["version"]
            ctx.data["since"] = self.now()
            ctx.step = 2
        cuts = [c for c in self.proxy.cuts[ctx.data["cuts_before"] :] if c.kind == "transfer"]
        if not cuts:
            if self.now() - ctx.data["since"] < 30:
                return self.now() + 0.05
            self.proxy.disarm_transfer_cut()
            self.not_fired[ctx.kind].append("no bundle download crossed the proxy in 30 s")
            self.say(f"fault {ctx.index} bundle_cut not fired: no download in 30 s")
            return None
        cut = cuts[0]
        self.fire(
            ctx,
            f"{ctx.data['project']} version {ctx.data['version']} "
            f"({self.bundle_sizes[ctx.data['project']]:,} B): a download cut after "
            f"{ctx.data['threshold']:,} B, {cut.frame_offset:,} B into a "
            f"{cut.frame_size:,} B chunk frame",
        )
        return None

    def f_disk_full(self, ctx: FaultCtx) -> float | None:
        if self.disk_full:
            return self.postpone(ctx, "the disk is full already")
        if self.armed is not None:
            return self.postpone(ctx, f"a failpoint is armed ({self.armed.kind})")
        self.filler = self.mount / "filler"
        written = fill_disk(self.filler)
        self.disk_full = True
        seconds = ctx.rng.uniform(2.0, 5.0)
        self.fire(
            ctx, f"hub's filesystem full ({written / MIB:.1f} MiB of filler) for {seconds:.1f} s"
        )

        def free() -> float | None:
            self.release_disk()
            return None

        self.schedule(self.now() + seconds, free, "disk freed", True)
        return None

    def release_disk(self) -> None:
        if not self.disk_full:
            return
        assert self.filler is not None
        self.filler.unlink(missing_ok=True)
        self.disk_full = False
        hub_alive = self.hub is not None and self.hub.alive
        self.say(f"disk freed; the hub {'is up' if hub_alive else 'is not running'}")
        if self.hub_state == "dead":
            self.schedule(self.now(), self.restart_hub_when_possible, "hub restart", True)

    def on_cut(self, cut: Cut) -> None:
        pass  # counted from proxy.cuts; the hook is here for debugging

    # ---- the run ------------------------------------------------------------------------------

    def submissions(self) -> None:
        while self.task_files and self.task_files[0][0] <= self.now() - self.started_work:
            _at, paths, part = self.task_files[0]
            if not self.submit(*paths):
                return  # disk full: try again on the next round
            self.task_files.pop(0)
            for spec in part:
                self.submitted[f"{spec.project}/{spec.task_id}"] = spec
            names = ", ".join(p.name for p in paths)
            self.say(f"submitted {names} ({len(part)} tasks; {len(self.submitted)} in all)")

    def outbox_lines(self) -> int:
        total = 0
        for project in PROJECTS:
            path = self.hub_data / "outbox" / project / "results.jsonl"
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                total += f.read().count(b"\n")
        return total

    def progress(self) -> None:
        if self.now() - self.last_progress < 5:
            return
        self.last_progress = self.now()
        if self.opts.quiet:
            return
        assert self.proxy is not None
        lines = self.outbox_lines()
        print(
            f"[{self.now():7.2f}s] progress: {lines}/{self.opts.tasks} results, "
            f"{len(self.submitted)} submitted, hub {self.hub_state}, "
            f"nodes {' '.join(f'{s.name}:{s.state}' for s in self.nodes if s.state != 'gone')}, "
            f"faults fired {sum(self.fired.values())}, proxy cuts {len(self.proxy.cuts)}",
            flush=True,
        )

    def step(self) -> None:
        self.reap_orphans()
        self.check_hub()
        self.check_nodes()
        self.poll_status()
        self.run_due(self.now())
        self.progress()
        wake = self.actions[0].at - self.now() if self.actions else TICK
        time.sleep(max(0.0, min(TICK, wake)))

    def reap_orphans(self) -> None:
        """Task processes of killed nodes were re-parented to us: reap those that ended
        (once a second: it reads the whole process table)."""
        if self.now() < self.next_reap:
            return
        self.next_reap = self.now() + 1.0
        me = os.getpid()
        ours = {s.proc.pid for s in self.nodes if s.proc.popen is not None}
        if self.hub is not None and self.hub.popen is not None:
            ours.add(self.hub.pid)
        for pid, (parent, state) in _proc_table().items():
            if parent == me and state == "Z" and pid not in ours:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def run(self) -> dict[str, Any]:
        opts = self.opts
        plan = [f for f in self.plan() if f.kind not in self.skipped_kinds]
        for ctx in plan:
            self.scheduled[ctx.kind] += 1
        self.started_work = self.now()
        for ctx in plan:
            self.schedule(self.started_work + ctx.planned_at, self.fault_action(ctx), ctx.kind)
            ctx.planned_at += self.started_work
        self.say(
            f"work starts: {opts.tasks} tasks in {len(self.task_files)} files, "
            f"{len(plan)} faults over {opts.duration:g} s, task time {opts.task_ms} ms"
        )
        end = self.started_work + opts.duration
        while self.now() < end:
            self.submissions()
            self.step()
        # Faults still waiting for their moment (a hub that is restarting, say) get it:
        # each gives up by itself within POSTPONE_LIMIT or its own bound.
        while any(not action.recovery for action in self.actions):
            self.submissions()
            self.step()
        self.say("fault period over: undoing faults in progress")
        self.finish_faults()
        while self.task_files:
            self.submissions()
            self.step()
        drain_start = self.now()
        self.say("draining")
        self.drain(drain_start)
        return self.check()

    def plan(self) -> list[FaultCtx]:
        opts = self.opts
        count = opts.fault_count or max(len(opts.faults), round(opts.duration / 5))
        start = min(3.0, opts.duration * 0.1)
        return plan_faults(opts.faults, count, start, opts.duration * 0.95, opts.seed)

    def finish_faults(self) -> None:
        """No fault starts from now on; what a fault left undone is undone now."""
        pending, self.actions = self.actions, []
        for action in sorted(pending):
            if action.recovery:
                self.schedule(self.now(), action.fn, action.what, True)
            else:
                self.not_fired[action.what].append("the fault period ended first")
                self.say(f"fault {action.what} not fired: the fault period ended first")
        if self.proxy is not None:
            self.proxy.disarm_transfer_cut()
        self.release_disk()
        for slot in self.nodes:
            if slot.state == "stopped":
                slot.proc.sigcont()
                slot.state = "up"
        self.run_due(self.now())

    def outbox_ids(self) -> set[str]:
        ids = set()
        for project in PROJECTS:
            with contextlib.suppress(FileNotFoundError):
                text = (self.hub_data / "outbox" / project / "results.jsonl").read_text()
                for line in text.split("\n")[:-1]:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        ids.add(f"{project}/{json.loads(line)['id']}")
        return ids

    def drain(self, since: float) -> None:
        """Wait until every submitted task has its line in the outbox and the store has
        nothing left to export; then until the live nodes' spools are empty."""
        deadline = since + self.opts.drain
        wanted = set(self.submitted)
        next_look = 0.0
        while self.now() < deadline:
            self.step()
            if self.hub_state != "up" or self.now() < next_look:
                continue
            next_look = self.now() + 0.5
            if self.outbox_lines() < len(wanted) or not wanted <= self.outbox_ids():
                continue
            with contextlib.suppress(Exception):
                if self.unexported() == 0:
                    self.drained_at = self.now()
                    break
        else:
            self.say(f"not drained after {self.opts.drain:g} s")
            return
        self.say(f"drained in {self.drained_at - since:.1f} s")
        # Then every live node back at the hub with an empty spool: a result of a task
        # that finished elsewhere is still delivered (and refused) once its node is back.
        # A node's reconnect back-off is at most 30 s (node/client.py), so 45 s is ample.
        started = self.now()
        next_look = 0.0
        while self.now() < started + 45:
            self.step()
            if self.now() < next_look:
                continue
            next_look = self.now() + 0.5
            with contextlib.suppress(Exception):
                connected = self.control("status")["nodes"]["connected"]
                if connected == len(self.live_nodes()) and not any(
                    s.spooled() for s in self.live_nodes()
                ):
                    break
        self.settled_after = self.now() - started
        self.say(f"settled in {self.settled_after:.1f} s (every node back, spools empty)")

    # ---- checks ---------------------------------------------------------------------------------

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.hub_data / 'hub.db'}?mode=ro", uri=True, timeout=10)

    def unexported(self) -> int:
        with contextlib.closing(self.db()) as conn:
            row = conn.execute(
                "SELECT count(*) FROM tasks WHERE state IN ('C','F','X') AND exported = 0"
            ).fetchone()
        return int(row[0])

    def check(self) -> dict[str, Any]:
        assert self.proxy is not None
        problems: dict[str, list[str]] = defaultdict(list)
        expected = self.submitted
        # -- the outbox: exactly one line per task, each with the right result
        lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
        malformed = 0
        for project in PROJECTS:
            path = self.hub_data / "outbox" / project / "results.jsonl"
            with contextlib.suppress(FileNotFoundError):
                for raw in path.read_text(encoding="utf-8").split("\n")[:-1]:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        malformed += 1
                        continue
                    lines[f"{project}/{record['id']}"].append(record)
                if not path.read_bytes().endswith(b"\n") and path.stat().st_size:
                    malformed += 1
        duplicated = {key: len(v) - 1 for key, v in lines.items() if len(v) > 1}
        unknown = [key for key in lines if key not in expected]
        states = Counter(v[0]["state"] for v in lines.values())
        failed_reasons = Counter(
            str(v[0]["error"])[:120] for v in lines.values() if v[0]["state"] != "C"
        )
        wrong = []
        for key, records in lines.items():
            spec = expected.get(key)
            if spec is None:
                continue
            for record in records:
                if record["state"] != "C":
                    continue
                if record["result"] != spec.expected(self.salt):
                    wrong.append(f"{key}: result {record['result']!r}")
                    continue
                if spec.data is not None:
                    problem = self.check_output(spec, record)
                    if problem:
                        wrong.append(f"{key}: {problem}")
        # -- the store
        with contextlib.closing(self.db()) as conn:
            rows = conn.execute(
                "SELECT p.name, t.name, t.state, t.lease_id, t.exported, l.outcome, l.ended_at,"
                " r.received_at, l.node_id"
                " FROM tasks t JOIN projects p ON p.id = t.project_id"
                " LEFT JOIN leases l ON l.id = t.lease_id"
                " LEFT JOIN results r ON r.lease_id = t.lease_id"
            ).fetchall()
            results_per_task = conn.execute(
                "SELECT p.name || '/' || t.name, count(*) FROM results r"
                " JOIN tasks t ON t.id = r.task_id JOIN projects p ON p.id = t.project_id"
                " GROUP BY r.task_id HAVING count(*) > 1"
            ).fetchall()
            completed_leases = conn.execute(
                "SELECT p.name || '/' || t.name, count(*) FROM leases l"
                " JOIN tasks t ON t.id = l.task_id JOIN projects p ON p.id = t.project_id"
                " WHERE l.outcome = 'completed' GROUP BY l.task_id HAVING count(*) > 1"
            ).fetchall()
            foreign_results = conn.execute(
                "SELECT p.name || '/' || t.name, r.lease_id, t.lease_id, t.state FROM results r"
                " JOIN tasks t ON t.id = r.task_id JOIN projects p ON p.id = t.project_id"
                " WHERE t.state != 'C' OR t.lease_id IS NULL OR r.lease_id != t.lease_id"
            ).fetchall()
            live_on_finished = conn.execute(
                "SELECT p.name || '/' || t.name, l.id FROM leases l"
                " JOIN tasks t ON t.id = l.task_id JOIN projects p ON p.id = t.project_id"
                " WHERE l.ended_at IS NULL AND t.state IN ('C','F','X')"
            ).fetchall()
            superseded = conn.execute(
                "SELECT count(*) FROM leases WHERE outcome = 'superseded'"
            ).fetchone()[0]
            outcomes = dict(
                conn.execute(
                    "SELECT coalesce(outcome, 'live'), count(*) FROM leases GROUP BY outcome"
                ).fetchall()
            )
        store_state: dict[str, str] = {}
        stale, late = [], 0
        for project, name, state, lease, _exported, outcome, ended_at, received, _node in rows:
            key = f"{project}/{name}"
            store_state[key] = state
            if state != "C":
                continue
            if received is None:
                problems["C task without its result row"].append(key)
            if outcome in STALE_OUTCOMES:
                stale.append(f"{key}: lease {lease} ended as {outcome} before its result won")
            elif outcome in LATE_OUTCOMES:
                late += 1
                if received is not None and ended_at is not None and received < ended_at:
                    stale.append(f"{key}: lease {lease} {outcome} after its result was accepted")
            elif outcome != "completed":
                problems["accepted lease not ended as completed"].append(f"{key}: {outcome}")
        twice = sorted({k for k, _ in results_per_task} | {k for k, _ in completed_leases})
        finished_store = {k for k, s in store_state.items() if s in ("C", "F", "X")}
        lost = sorted(k for k in expected if k not in lines and k not in finished_store)
        lost_from_store = sorted(k for k in expected if k not in store_state)
        unfinished_store = sorted(k for k in expected if store_state.get(k) in ("NA", "TA", "A"))
        finished_not_out = sorted(k for k in finished_store if k not in lines and k in expected)
        if finished_not_out:
            problems["finished in the store, missing from the outbox"].extend(finished_not_out[:10])
        # -- live state, as the admin sees it
        stuck: list[str] = []
        unfinished_live: Counter[str] = Counter()
        try:
            connected = {n["node"] for n in self.ctl_json("nodes")}
            status = self.ctl_json("status")
            for project in PROJECTS:
                for state in ("TA", "A"):
                    for task in self.ctl_json("tasks", project, "--state", state):
                        unfinished_live[state] += 1
                        if task["node"] not in connected:
                            stuck.append(f"{project}/{task['id']}: {state} on {task['node']}")
        except BenchError as exc:
            problems["control socket"].append(str(exc))
            status = {}
        spooled_live = sum(s.spooled() for s in self.live_nodes())
        spooled_gone = sum(s.spooled() for s in self.nodes if s.state == "gone")
        if malformed:
            problems["malformed outbox lines"].append(str(malformed))
        if unknown:
            problems["outbox lines for unknown tasks"].extend(unknown[:10])
        if foreign_results:
            problems["results rows not of the accepted lease"].extend(
                str(r) for r in foreign_results[:10]
            )
        if live_on_finished:
            problems["live leases on finished tasks"].extend(str(r) for r in live_on_finished[:10])
        if spooled_live:
            problems["results still spooled on live nodes"].append(str(spooled_live))
        logs = self.log_evidence()
        # Every failpoint kill in the hub's log is one the harness armed and counted.
        logged_kills = len(self.failpoint_lines())
        if logged_kills != sum(self.failpoint_kills.values()):
            problems["failpoint kills in the hub's log not counted by a fault"].append(
                f"{logged_kills} logged, {sum(self.failpoint_kills.values())} counted"
            )
        cuts = Counter(c.kind for c in self.proxy.cuts)
        elapsed = (self.drained_at or self.now()) - self.started_work
        invariants = {
            "lost": len(lost),
            "duplicated in the outbox": sum(duplicated.values()),
            "completed twice in the store": len(twice),
            "wrong results": len(wrong),
            "results accepted from a stale lease": len(stale),
            "stuck in TA/A with no live node": len(stuck),
        }
        return {
            "seed": self.opts.seed,
            "machine": machine(),
            "settings": {
                "tasks": self.opts.tasks,
                "nodes": self.opts.nodes,
                "slots": self.opts.slots,
                "duration": self.opts.duration,
                "task_ms": list(self.opts.task_ms or ()),
                "file_every": self.opts.file_every,
                "payload_mb": self.opts.payload_mb,
                "heartbeat": f"{HEARTBEAT_INTERVAL} s x {HEARTBEAT_MISSES}",
                "offer_timeout": OFFER_TIMEOUT,
                "max_attempts": MAX_ATTEMPTS,
                "hub_data_on_tmpfs": self.disk_problem is None and "disk_full" in self.opts.faults,
            },
            "figures": {
                "tasks submitted": len(expected),
                "tasks completed (C)": states.get("C", 0),
                "tasks failed (F)": states.get("F", 0),
                "tasks cancelled (X)": states.get("X", 0),
                **invariants,
                "unfinished in the store (NA/TA/A)": len(unfinished_store),
                "late results accepted (lease lost or expired, task unfinished)": late,
                "leases superseded by a late result": superseded,
                "results spooled on gone nodes (abandoned)": spooled_gone,
                "kills inside a commit (store.before_commit)": self.failpoint_kills[
                    "store.before_commit"
                ],
                "kills after a commit, before its messages (runtime.after_commit)": (
                    self.failpoint_kills["runtime.after_commit"]
                ),
                "kills after an outbox fsync, before its length is recorded": (
                    self.failpoint_kills["outbox.after_fsync"]
                ),
                "kills after an upload chunk's fsync, before its ack": (
                    self.failpoint_kills["upload.after_fsync"]
                ),
                "hub outages (degraded, then recovered by itself)": logs[
                    "hub: recovered by itself (HUB RECOVERED)"
                ],
                "run time (s)": round(elapsed, 1),
                "settle: every node back, spools empty (s)": round(self.settled_after, 1),
                "throughput (tasks/s)": round(len(lines) / elapsed, 2) if elapsed > 0 else 0,
            },
            "invariants": invariants,
            "drained": self.drained_at is not None,
            "failed_reasons": dict(failed_reasons),
            "faults": {
                "scheduled": dict(self.scheduled),
                "fired": dict(self.fired),
                "not_fired": {k: v for k, v in self.not_fired.items() if v},
                "skipped_kinds": self.skipped_kinds,
                "notes": {k: v for k, v in self.fault_notes.items() if v},
                "proxy_cuts": dict(cuts),
                "failpoints": self.failpoint_record,
            },
            "events": {
                "hub exits not injected": self.hub_deaths,
                "hub start failures": self.hub_start_failures,
                "hub start failures by reason": dict(self.start_failure_reasons),
                "hub restarts": self.hub_restarts,
                "hub starts": self.hub_serial,
                "hub outages by status (outages, summed over hub starts)": sum(self.outages_seen),
                "status polls that found the hub degraded": self.degraded_seen,
                "node exits not injected": self.node_deaths,
                "submit retries": self.submit_retries,
                "lease outcomes": outcomes,
                "status": {k: status.get(k) for k in ("tasks", "commit_batches", "transfers")},
                **logs,
            },
            "problems": {k: v for k, v in problems.items() if v},
            "examples": {
                "lost": lost[:10],
                "lost from the store": lost_from_store[:10],
                "unfinished": unfinished_store[:10],
                "finished in the store, not in the outbox": finished_not_out[:10],
                "duplicated": list(duplicated)[:10],
                "twice": twice[:10],
                "wrong": wrong[:10],
                "stale": stale[:10],
                "stuck": stuck[:10],
            },
            "anomalies": self.anomalies,
            "work": str(self.work),
        }

    def check_output(self, spec: TaskSpec, record: dict[str, Any]) -> str | None:
        want = spec.expected_output()
        files = {f["name"]: f for f in record.get("files", [])}
        entry = files.get("digest.txt")
        if entry is None:
            return "no digest.txt in the result's files"
        if entry["sha256"] != hashlib.sha256(want).hexdigest() or entry["size"] != len(want):
            return f"digest.txt listed as {entry}"
        path = self.hub_data / "outbox" / "chaosf" / "files" / spec.task_id / "digest.txt"
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"outbox file: {exc}"
        return None if data == want else "outbox digest.txt differs"

    def rejoin_delays(self) -> tuple[list[float], list[float]]:
        """Seconds from a hub's "listening" to each node's first "connected" after it:
        (after every hub start that lived 10 s or more, after those of them that followed
        a hub that had lived 10 s too: one outage, not a series). Nodes started while that
        hub ran are left out; a node stopped meanwhile (SIGSTOP) counts as slow."""
        hub_log = self.work / "hub.log"
        if not hub_log.exists():
            return [], []
        starts: list[float] = []  # each hub start, and when it listened (or nan)
        listening: list[float] = []
        for line in hub_log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("==== chaos: start hub at "):
                starts.append(float(line.split()[5]))
                listening.append(float("nan"))
            elif "hub listening on" in line and listening:
                listening[-1] = _log_time(line)
        nodes: list[tuple[list[float], list[float]]] = []  # (process starts, connects)
        for slot in self.nodes:
            with contextlib.suppress(FileNotFoundError):
                text = slot.proc.log.read_text(encoding="utf-8", errors="replace")
                began = [
                    float(line.split()[5])
                    for line in text.splitlines()
                    if line.startswith("==== chaos: start ")
                ]
                connects = [
                    _log_time(line)
                    for line in text.splitlines()
                    if "INFO node.client: connected to" in line
                ]
                nodes.append((began, connects))
        every: list[float] = []
        single: list[float] = []
        for i, at in enumerate(listening):
            until = starts[i + 1] if i + 1 < len(starts) else time.time()
            if at != at or until - at < 10:  # nan: it never listened
                continue
            calm = (
                i > 0
                and listening[i - 1] == listening[i - 1]
                and starts[i] - listening[i - 1] >= 10
            )
            for began, connects in nodes:
                after = [t for t in connects if at <= t < until]
                if not after or not any(t < at for t in began):
                    continue
                if any(at <= t < after[0] for t in began):
                    continue  # killed and started again meanwhile
                every.append(after[0] - at)
                if calm:
                    single.append(after[0] - at)
        return every, single

    def log_evidence(self) -> dict[str, Any]:
        """What the logs say happened: recoveries the guarantees rely on."""
        hub_log = self.work / "hub.log"
        text = hub_log.read_text(encoding="utf-8", errors="replace") if hub_log.exists() else ""
        every, single = self.rejoin_delays()
        node_text = ""
        for slot in self.nodes:
            with contextlib.suppress(FileNotFoundError):
                node_text += slot.proc.log.read_text(encoding="utf-8", errors="replace")
        resumed_bundles = sum(
            1
            for line in node_text.splitlines()
            if "fetching bundle" in line and not line.rstrip().endswith("from 0)")
        )
        return {
            "hub: outbox tails truncated after a crash": text.count(
                "unrecorded bytes from an interrupted export"
            ),
            "hub: nodes dropped for missed heartbeats": text.count(
                "missed heartbeats; disconnecting"
            ),
            "hub: leases lost for missed heartbeats": text.count("ended: lost: no heartbeat"),
            "hub: leases lost at a reconnect without them": text.count(
                "ended: lost: node reconnected without it"
            ),
            "hub: degraded (HUB DEGRADED)": text.count("HUB DEGRADED"),
            "hub: recovered by itself (HUB RECOVERED)": text.count("HUB RECOVERED"),
            "hub: failpoint kills (CRITICAL)": len(self.failpoint_lines()),
            "hub: tracebacks": text.count("Traceback"),
            "hub: ERROR lines": sum(1 for line in text.splitlines() if " ERROR " in line),
            "nodes: bundle downloads resumed from a partial file": resumed_bundles,
            "nodes: results the hub did not record (already finished)": node_text.count(
                "hub did not record result"
            ),
            "nodes: leases cancelled by the hub": node_text.count("hub cancelled lease"),
            "nodes: leases not resumed after a reconnect": node_text.count(
                "was not resumed by the hub"
            ),
            "nodes: tracebacks": node_text.count("Traceback"),
            "nodes back at a restarted hub, s (median / 90th percentile / max)": _spread(every),
            "the same after a single restart (the hub before had lived 10 s)": _spread(single),
        }

    # ---- tear-down --------------------------------------------------------------------------

    def teardown(self, keep_data: bool) -> None:
        """End every process started here, unmount the tmpfs (``keep_data``: after
        copying the hub's data out of it)."""
        for slot in self.nodes:
            with contextlib.suppress(Exception):
                slot.proc.sigcont()
        for slot in self.nodes:
            with contextlib.suppress(Exception):
                if slot.proc.alive:
                    slot.proc.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for slot in self.nodes:
            with contextlib.suppress(Exception):
                slot.proc.terminate(8)
        if self.hub is not None:
            with contextlib.suppress(Exception):
                self.hub.terminate(10)
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.stop()
        # Orphans (task processes of killed nodes) were re-parented to us.
        leftovers = descendants(os.getpid())
        signal_all(leftovers, signal.SIGCONT)
        signal_all(leftovers, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            if not descendants(os.getpid()):
                break
            time.sleep(0.05)
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)
        if self.mount.is_mount():
            if keep_data:
                with contextlib.suppress(OSError, shutil.Error):
                    shutil.copytree(
                        self.hub_data,
                        self.work / "hub-data-copy",
                        ignore=shutil.ignore_patterns("control.sock"),
                    )
            unmount(self.mount)
        self.timeline_file.close()


# ---- output -------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    """Median, 90th percentile and maximum of ``values``, and how many."""
    if not values:
        return "none"
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"{median:.2f} / {p90:.2f} / {ordered[-1]:.2f} (n={len(ordered)})"


def _log_time(line: str) -> float:
    """UNIX time of a log line that starts ``2026-11-28 10:50:01,234``."""
    try:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
    except ValueError:
        return float("nan")


def print_report(report: dict[str, Any]) -> None:
    figures = report["figures"]
    width = max(len(k) for k in figures) + 2
    print(f"\nchaos run, seed {report['seed']}: {report['machine']}")
    print(f"settings: {json.dumps(report['settings'])}")
    print(f"\n{'figure':<{width}}value")
    for key, value in figures.items():
        mark = ""
        if key in report["invariants"]:
            mark = "  ok" if value == 0 else "  VIOLATED"
        print(f"{key:<{width}}{value}{mark}")
    faults = report["faults"]
    print(f"\n{'fault':<18}{'scheduled':>10}{'fired':>7}")
    for kind in KINDS:
        if kind in faults["skipped_kinds"]:
            print(f"{kind:<18}{'skipped':>10}        {faults['skipped_kinds'][kind]}")
        elif faults["scheduled"].get(kind):
            print(f"{kind:<18}{faults['scheduled'][kind]:>10}{faults['fired'].get(kind, 0):>7}")
    total_s = sum(faults["scheduled"].values())
    total_f = sum(faults["fired"].values())
    print(f"{'total':<18}{total_s:>10}{total_f:>7}")
    print(f"proxy cuts: {faults['proxy_cuts']}")
    for kill in faults["failpoints"]:
        up = kill["seconds_up"]
        print(
            f"failpoint kill: {kill['kind']}: {kill['point']}=kill@{kill['k']}, "
            + (f"{up} s after the armed hub was up" if up is not None else "while starting")
        )
    for kind, reasons in faults["not_fired"].items():
        print(f"not fired: {kind}: {'; '.join(reasons)}")
    for kind, notes in faults["notes"].items():
        print(f"note: {kind}: {'; '.join(notes)}")
    print("\nevents:")
    for key, value in report["events"].items():
        if isinstance(value, list):
            print(f"  {key}: {len(value)}")
            for item in value[:10]:
                print(f"    - {item}")
        else:
            print(f"  {key}: {value}")
    if report["failed_reasons"]:
        print(f"failed tasks by reason: {report['failed_reasons']}")
    for key, values in report["problems"].items():
        print(f"PROBLEM {key}: {values}")
    for key, values in report["examples"].items():
        if values:
            print(f"{key}: {values}")
    for anomaly in report["anomalies"]:
        print(f"anomaly: {anomaly}")
    if not report["drained"]:
        print("NOT DRAINED: some tasks never finished")


def failed(report: dict[str, Any]) -> bool:
    return any(report["invariants"].values()) or not report["drained"] or bool(report["problems"])


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    def expired(_signum: int, _frame: FrameType | None) -> None:
        raise DeadlineExceeded(f"the hard deadline of {seconds:g} s passed")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_chaos(opts: Options) -> tuple[int, dict[str, Any] | None]:
    """Run once; (exit status, report)."""
    work = Path(tempfile.mkdtemp(prefix="issc-chaos-", dir=opts.directory))
    print(f"chaos: seed {opts.seed} (replay with --seed {opts.seed}); work in {work}", flush=True)
    if not become_subreaper():
        print("chaos: cannot become a child subreaper; orphans may outlive a kill")
    chaos = Chaos(opts, work)
    report: dict[str, Any] | None = None
    status = 1
    deadline = opts.deadline or opts.duration + opts.drain + 180
    try:
        with terminate_as_interrupt(), hard_deadline(deadline):
            try:
                chaos.setup()
                report = chaos.run()
                status = 1 if failed(report) else 0
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                chaos.teardown(opts.keep or report is None or failed(report))
    except (BenchError, DeadlineExceeded) as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        opts.keep = True
    except KeyboardInterrupt:
        print("\nchaos: interrupted; every process started here is stopped", file=sys.stderr)
        opts.keep = True
        status = 130
    if report is not None:
        print_report(report)
        if opts.report is not None:
            opts.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if status != 0:
        opts.keep = True
    if opts.keep:
        print(f"files kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return status, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks to submit (2000)")
    parser.add_argument("--nodes", type=int, default=3, help="nodes at any time (3)")
    parser.add_argument("--slots", type=int, default=2, help="slots per node (2)")
    parser.add_argument("--duration", type=float, default=120, help="seconds of faults (120)")
    parser.add_argument("--seed", type=int, help="fault schedule and workload (random)")
    parser.add_argument("--faults", default="all", help=f"comma list of: {', '.join(KINDS)}")
    parser.add_argument("--fault-count", type=int, default=0, help="faults (duration / 5)")
    parser.add_argument("--task-ms", type=int, nargs=2, metavar=("MIN", "MAX"))
    parser.add_argument("--file-every", type=int, default=5, help="1 task in N has files (5)")
    parser.add_argument("--payload-mb", type=float, default=3.0, help="bundle payload (3)")
    parser.add_argument("--disk-mb", type=int, default=256, help="hub's tmpfs size (256)")
    parser.add_argument("--task-files", type=int, default=0, help="task files (tasks / 250)")
    parser.add_argument("--drain", type=float, default=120, help="seconds to drain (120)")
    parser.add_argument("--deadline", type=float, default=0, help="hard limit, seconds")
    parser.add_argument("--dir", type=Path, help="where the work directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--report", type=Path, help="write the figures as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no timeline while it runs")
    args = parser.parse_args(argv)
    kinds = list(KINDS) if args.faults == "all" else [k for k in args.faults.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    if args.tasks < 1 or args.nodes < 1 or args.slots < 1 or args.duration <= 0:
        parser.error("--tasks, --nodes, --slots and --duration must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    opts = Options(
        tasks=args.tasks,
        nodes=args.nodes,
        slots=args.slots,
        duration=args.duration,
        seed=seed,
        faults=kinds,
        fault_count=args.fault_count,
        task_ms=tuple(args.task_ms) if args.task_ms else None,
        file_every=args.file_every,
        payload_mb=args.payload_mb,
        disk_mb=args.disk_mb,
        task_files=args.task_files,
        drain=args.drain,
        deadline=args.deadline,
        keep=args.keep,
        directory=args.dir,
        report=args.report,
        quiet=args.quiet,
    )
    status, _report = run_chaos(opts)
    return status


if __name__ == "__main__":
    sys.exit(main())
