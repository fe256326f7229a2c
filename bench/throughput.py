"""End-to-end task throughput and latency of issc on this machine, beside Dask doing the same
work in the same run (issue 8).

issc: a hub (temporary data dir, embedded SQLite, durable settings as shipped) and K
volunteer nodes with S slots each, started as real processes, run N tiny tasks of a
project this script writes and signs itself, first in persistent mode (one long-lived
worker process per slot, one JSON line per task), then in process mode (a fresh Python
process per task). The clock starts when the task file is being dropped into the hub's
inbox (by ``issc.project_cli.drop_into_inbox``, what ``issc-project submit`` does, called
in this process) and stops when the outbox's results.jsonl has a line for every task
(the outbox is written after the database commit, so that is end to end); then every
task is checked to be C exactly once, with the right result.

Latency: with the nodes warm, one task file of one task is dropped into the inbox at a
time (atomically, by ``issc.project_cli.drop_into_inbox``, what ``issc-project submit``
does, called in this process so that no CLI start-up is timed), and the clock runs from
the moment it is there to the moment its line is in results.jsonl; R times
(``--latency-runs``), p50/p90/max. Dask's: ``client.submit(f, x).result()``, one at a
time.

Process mode is also compared with its floor: spawning the same entrypoint (main.py of the
process-mode project, with the interpreter and flags the node uses, the task's input as
JSON on stdin, a scrubbed environment) the same number of times, K x S at once, with no
scheduler at all ("bare spawn"); and the same spawns as the node's sandbox wraps them
(``node.sandbox.build_launch``: bubblewrap where it works, each in a fresh scratch dir),
to tell the sandbox's cost from the scheduler's.

Dask: ``LocalCluster(n_workers=K, threads_per_worker=S, processes=True)``, twice: with
its default configuration and with ``distributed.scheduler.worker-saturation: inf`` (its
fastest for many small independent tasks). Each runs ``client.map`` of the same function
over the same inputs, gathered; for process mode the function runs the same main.py with
``subprocess.run``, so both pay a process per task. Then the latency runs.

The work per task is negligible (``sum(range(n))``, n about 1000): this measures what
the scheduler costs per task, not computing speed. issc commits every state change to
disk (SQLite, WAL, synchronous=FULL) and runs signed code in sandboxed subprocesses;
Dask keeps its state in memory. Everything first runs one warm-up task per slot (bundle
fetch, worker start-up, function shipping), not timed. CPU seconds are those of each
process tree (the hub; the nodes with their task processes; Dask's scheduler and client,
which run in this process, and its workers).

    python -m bench.throughput [--nodes K] [--slots S] [--tasks N] [--process-tasks M]
                               [--latency-runs R] [--skip-dask] [--skip-sandboxed-spawn]
                               [--json] [--json-out FILE] [--dir DIR] [--keep] [--timeout S]

(``python bench/throughput.py`` works too.) The defaults, 2 nodes x 1 slot against 2 Dask
worker processes x 1 thread, are issue 8's setting. ``--json`` prints one JSON object on
stdout (progress goes to stderr). Dask comes with ``make bench`` (``pip install -e
'.[bench]'``); without it, issc and the bare spawns run alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__:  # python -m bench.throughput
    from .cluster import BenchError, Cluster, machine, machine_info, run_in_workdir
else:  # python bench/throughput.py: bench/ is first on sys.path
    from cluster import BenchError, Cluster, machine, machine_info, run_in_workdir

ROOT = Path(__file__).resolve().parent.parent
# The interpreter flags issc's sandbox uses for a bare ``python3`` entrypoint; the Dask
# process-mode function and the bare spawns use them too, so all start the same
# interpreter the same way.
PYTHON_FLAGS = ("-s", "-E", "-B")
ENTRYPOINT = ("python3", "main.py")  # the process-mode project's, as project.yaml says
WORK = 1000  # each task computes sum(range(WORK + i % 100))
POLL = 0.01  # seconds between looks at results.jsonl while counting a throughput run
# How this script was started, for the JSON's "command".
COMMAND = ("-m", "bench.throughput") if __package__ else ("bench/throughput.py",)
LATENCY_POLL = 0.001  # ... while waiting for the one line of a latency run
PROCESS_TARGET = 2 / 3  # issue 8: issc's process mode at least 2/3 of bare spawning

WORKER_PY = '''\
"""Persistent mode: one JSON line per task in, one line out."""
import json
import sys

for line in sys.stdin:
    task = json.loads(line)
    reply = {"id": task["id"], "result": sum(range(task["input"]["n"]))}
    sys.stdout.write(json.dumps(reply) + "\\n")
    sys.stdout.flush()
'''

MAIN_PY = '''\
"""Process mode: the task's input as JSON on stdin, the result as JSON on stdout."""
import json
import sys

print(json.dumps(sum(range(json.load(sys.stdin)["n"]))))
'''

MODES: dict[str, tuple[str, str, str]] = {
    # mode: (project name, entrypoint file, its source)
    "persistent": ("tp-persistent", "worker.py", WORKER_PY),
    "process": ("tp-process", ENTRYPOINT[1], MAIN_PY),
}

# The systems of the report: key (in the JSON) -> label (in the table).
SYSTEMS = {
    "issc": "issc",
    "bare_spawn": "bare spawn",
    "bare_spawn_sandboxed": "bare spawn, sandboxed",
    "dask_default": "dask default",
    "dask_saturation_inf": "dask saturation inf",
}
# Dask's configurations: key -> dask.config.set mapping.
DASK_CONFIGS: dict[str, dict[str, Any]] = {
    "dask_default": {},
    "dask_saturation_inf": {"distributed.scheduler.worker-saturation": float("inf")},
}


# ---- the work, as Dask and the bare spawns run it ---------------------------------------


def compute(task_input: dict[str, int]) -> int:
    """What the persistent worker does for one task."""
    return sum(range(task_input["n"]))


def run_main(main_py: str, task_input: dict[str, int]) -> Any:
    """What a process-mode task is: a fresh interpreter running main.py."""
    done = subprocess.run(
        [sys.executable, *PYTHON_FLAGS, main_py],
        input=json.dumps(task_input).encode(),
        capture_output=True,
        check=True,
    )
    return json.loads(done.stdout)


def task_input(index: int) -> dict[str, int]:
    return {"n": WORK + index % 100}


def inputs(count: int) -> list[dict[str, int]]:
    return [task_input(i) for i in range(count)]


# ---- figures ---------------------------------------------------------------------------


@dataclass
class Figure:
    """One throughput run: ``tasks`` of ``mode`` on ``system`` took ``seconds``."""

    system: str  # a key of SYSTEMS
    mode: str
    tasks: int
    seconds: float
    cpu: dict[str, float]  # CPU seconds by part, and "total"
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "seconds": round(self.seconds, 4),
            "tasks_per_s": finite(self.rate, 2),
            "cpu": {part: round(seconds, 2) for part, seconds in self.cpu.items()},
            "notes": self.notes,
        }


@dataclass
class Latency:
    """One task at a time on ``system``: each one's seconds."""

    system: str
    what: str
    samples: list[float]

    def summary(self) -> dict[str, Any]:
        ms = sorted(s * 1000 for s in self.samples)
        return {
            "what": self.what,
            "runs": len(ms),
            "p50_ms": finite(percentile(ms, 50), 2),
            "p90_ms": finite(percentile(ms, 90), 2),
            "max_ms": finite(ms[-1] if ms else math.nan, 2),
            "min_ms": finite(ms[0] if ms else math.nan, 2),
            "mean_ms": finite(sum(ms) / len(ms) if ms else math.nan, 2),
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolated between the closest ranks."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def finite(value: float, digits: int) -> float | None:
    """``value`` rounded, or None (JSON null) for NaN or infinity."""
    return round(value, digits) if math.isfinite(value) else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return finite(numerator / denominator, 3)


# ---- CPU of process trees ----------------------------------------------------------------


def process_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, own CPU seconds, CPU seconds of its reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # After the ")": state is field 0, ppid 1, utime, stime, cutime, cstime 11..14.
        own = (int(fields[11]) + int(fields[12])) / tick
        reaped = (int(fields[13]) + int(fields[14])) / tick
        table[int(entry)] = (int(fields[1]), own, reaped)
    return table


def tree_cpu(table: dict[int, tuple[int, float, float]], root: int) -> float:
    """CPU seconds of ``root`` and all its descendants, live or reaped (0 if gone).

    A process's time moves into its parent's reaped-children time when the parent waits
    for it, so every CPU second of the tree is counted once, whenever it was spent.
    """
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    total = 0.0
    stack = [root] if root in table else []
    while stack:
        pid = stack.pop()
        _, own, reaped = table[pid]
        total += own + reaped
        stack.extend(children.get(pid, ()))
    return total


def self_cpu() -> float:
    """CPU seconds of this process alone (all its threads; not its children)."""
    times = os.times()
    return times.user + times.system


def this_tree_cpu() -> float:
    return tree_cpu(process_table(), os.getpid())


# ---- issc ------------------------------------------------------------------------------


class IsscCluster(Cluster):
    """The hub and ``nodes`` nodes of ``slots`` slots each, for both projects of MODES."""

    def __init__(self, work: Path, nodes: int, slots: int, timeout: float) -> None:
        super().__init__(work, timeout)
        self.nodes = nodes
        self.slots = slots
        self.ids: dict[str, list[str]] = {}  # mode -> the ids of every task submitted
        self.counters: dict[str, LineCounter] = {}

    def start(self) -> None:
        self.start_hub()
        for mode, (name, entry, source) in MODES.items():
            self.pack(name, self.work / name, entry, source, mode, wall_seconds=60, output_mb=1)
        names = [name for name, _, _ in MODES.values()]
        for i in range(self.nodes):
            self.start_node(f"node-{i}", names, slots=self.slots, volunteer=f"bench-{i}")
        self.wait_nodes(self.nodes, f"{self.nodes} connected nodes")

    def results(self, mode: str) -> Path:
        return self.hub_dir / "outbox" / MODES[mode][0] / "results.jsonl"

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the hub and of each node, with their children."""
        table = process_table()
        return {name: tree_cpu(table, process.pid) for name, process in self.processes}

    def write_tasks(self, path: Path, name: str, ids: Sequence[str]) -> Path:
        """A task file of ``ids``; an id ``x-<i>`` gets the input of index i."""
        with path.open("w", encoding="utf-8") as out:
            for task_id in ids:
                task = {"project": name, "id": task_id, "input": task_input(index_of(task_id))}
                out.write(json.dumps(task) + "\n")
        return path

    def warm_up(self, mode: str) -> None:
        """Register the mode's project and run one task per slot (untimed)."""
        name = MODES[mode][0]
        self.register(name)
        counter = self.counters[mode] = LineCounter(self.results(mode))
        warm = [f"w-{i}" for i in range(self.nodes * self.slots)]
        self.ids[mode] = list(warm)
        self.submit(self.write_tasks(self.work / f"{name}-warmup.jsonl", name, warm))
        self.wait(lambda: counter.count() >= len(warm), f"{len(warm)} warm-up results")

    def throughput(self, mode: str, tasks: int) -> Figure:
        """``tasks`` tasks in one task file, from the inbox to their last outbox line."""
        from issc.project_cli import drop_into_inbox

        name = MODES[mode][0]
        counter = self.counters[mode]
        ids = [f"t-{i}" for i in range(tasks)]
        task_file = self.write_tasks(self.work / f"{name}.jsonl", name, ids)
        target = counter.count() + tasks
        batches_before = self.control("status")["commit_batches"]
        cpu_before = self.cpu()
        started = time.perf_counter()
        drop_into_inbox(task_file, self.inbox)  # what issc-project submit does, in-process
        queued = self.inbox / task_file.name
        ingested: float | None = None
        deadline = time.monotonic() + self.timeout
        while counter.count() < target:
            if ingested is None and not queued.exists():
                ingested = time.perf_counter() - started
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{name}: {counter.count() - target + tasks} of {tasks} results after "
                    f"{self.timeout:.0f} s (logs in {self.work})"
                )
            self.check_alive()
            time.sleep(POLL)
        seconds = time.perf_counter() - started
        cpu_after = self.cpu()
        batches = self.control("status")["commit_batches"] - batches_before
        self.ids[mode] += ids
        check_results(self.results(mode), self.ids[mode])
        cpu = {
            "hub": cpu_after["hub"] - cpu_before["hub"],
            "nodes": sum(cpu_after[n] - cpu_before[n] for n in cpu_after if n != "hub"),
        }
        cpu["total"] = cpu["hub"] + cpu["nodes"]
        notes = [
            f"task file ingested after {ingested:.2f} s"
            if ingested
            else f"task file ingested before the first look ({POLL} s)",
            f"{batches} scheduler commits ({batches / max(tasks, 1):.2f} a task)",
        ]
        return Figure("issc", mode, tasks, seconds, cpu, notes)

    def latency(self, mode: str, runs: int) -> Latency:
        """One task at a time: from its task file's drop into the inbox to its outbox line."""
        from issc.project_cli import drop_into_inbox

        name = MODES[mode][0]
        counter = self.counters[mode]
        counter.count()  # past every line so far
        staging = self.work / "latency"
        staging.mkdir(exist_ok=True)
        samples: list[float] = []
        for i in range(runs):
            task_id = f"l-{i}"
            source = self.write_tasks(staging / f"{name}-{task_id}.jsonl", name, [task_id])
            drop_into_inbox(source, self.inbox)  # as issc-project submit does
            started = time.perf_counter()
            deadline = time.monotonic() + self.timeout
            while True:
                lines = counter.new_lines()
                if lines:
                    seen = [json.loads(line)["id"] for line in lines]
                    if seen != [task_id]:
                        raise BenchError(f"{name}: waiting for {task_id}, got lines for {seen}")
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: no result for {task_id} after {self.timeout} s")
                self.check_alive()
                time.sleep(LATENCY_POLL)
            samples.append(time.perf_counter() - started)
            self.ids[mode].append(task_id)
        check_results(self.results(mode), self.ids[mode])
        return Latency("issc", f"{mode}: inbox drop -> outbox line", samples)


def index_of(task_id: str) -> int:
    """The input index of a task id: "w-7", "t-7" and "l-7" all get the 8th input."""
    return int(task_id.split("-")[1])


class LineCounter:
    """Counts the lines of a growing file, reading only what was appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0
        self.partial = b""

    def new_lines(self) -> list[bytes]:
        """The complete lines appended since the last look."""
        try:
            with self.path.open("rb") as stream:
                stream.seek(self.offset)
                data = stream.read()
        except FileNotFoundError:
            return []
        if not data:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        self.lines += len(complete)
        return complete

    def count(self) -> int:
        self.new_lines()
        return self.lines


def check_results(path: Path, ids: Sequence[str]) -> None:
    """Every task C exactly once with the right result, and nothing else."""
    expected = {i: compute(task_input(index_of(i))) for i in ids}
    seen: Counter[str] = Counter()
    problems: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        seen[record["id"]] += 1
        if record["state"] != "C":
            problems.append(f"{record['id']}: state {record['state']} ({record['error']})")
        elif record["result"] != expected.get(record["id"]):
            problems.append(f"{record['id']}: result {record['result']!r}")
    problems += [f"{i}: {n} lines" for i, n in seen.items() if n != 1]
    problems += [f"{i}: no line" for i in expected if i not in seen]
    problems += [f"{i}: unknown task" for i in seen if i not in expected]
    if problems:
        raise BenchError(f"{path}: {len(problems)} problems: " + "; ".join(problems[:10]))


def run_issc(args: argparse.Namespace, work: Path, report: Report) -> None:
    cluster = IsscCluster(work, args.nodes, args.slots, args.timeout)
    try:
        cluster.start()
        if args.tasks > 0 or args.latency_runs > 0:
            cluster.warm_up("persistent")
        if args.latency_runs > 0:
            report.add_latency(cluster.latency("persistent", args.latency_runs))
        if args.tasks > 0:
            report.add(cluster.throughput("persistent", args.tasks))
        if args.process_tasks > 0:
            cluster.warm_up("process")
            report.add(cluster.throughput("process", args.process_tasks))
    finally:
        cluster.stop()


# ---- bare spawns -----------------------------------------------------------------------


class Spawner:
    """Starts main.py as a process-mode task would be started, without the scheduler."""

    def __init__(self, work: Path, sandboxed: bool) -> None:
        self.bundle = work / "bundle"
        self.bundle.mkdir(mode=0o755, parents=True)
        (self.bundle / ENTRYPOINT[1]).write_text(MAIN_PY, encoding="utf-8")
        self.scratch_root = work / "scratch"
        self.scratch_root.mkdir(mode=0o755)
        self.sandboxed = sandboxed
        self.sandbox: Any = None
        if sandboxed:
            from node.sandbox import default_sandbox

            self.sandbox = default_sandbox()

    def run(self, index: int) -> Any:
        """Spawn main.py once with input ``index`` on stdin; its result."""
        payload = json.dumps(task_input(index)).encode()
        scratch = Path(tempfile.mkdtemp(dir=self.scratch_root))
        try:
            if self.sandboxed:
                from node.sandbox import build_launch, fresh_scratch

                shutil.rmtree(scratch)
                fresh_scratch(scratch, self.sandbox)
                launch = build_launch(ENTRYPOINT, self.bundle, scratch, f"b-{index}", self.sandbox)
                argv, env, cwd = list(launch.argv), dict(launch.env), launch.cwd
            else:
                argv = [sys.executable, *PYTHON_FLAGS, str(self.bundle / ENTRYPOINT[1])]
                env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch)}
                env |= {"TMPDIR": str(scratch), "LANG": "C.UTF-8"}
                cwd = scratch
            done = subprocess.run(
                argv,
                input=payload,
                capture_output=True,
                cwd=cwd,
                env=env,
                start_new_session=True,
                check=False,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if done.returncode != 0:
            raise BenchError(f"main.py exited {done.returncode}: {done.stderr.decode()[-500:]}")
        return json.loads(done.stdout)


def run_bare(args: argparse.Namespace, work: Path, sandboxed: bool) -> Figure:
    """``--process-tasks`` spawns of main.py, nodes x slots at a time."""
    system = "bare_spawn_sandboxed" if sandboxed else "bare_spawn"
    spawner = Spawner(work / system, sandboxed)
    parallel = args.nodes * args.slots
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(spawner.run, range(parallel)))  # warm-up
        cpu_before = this_tree_cpu()
        started = time.perf_counter()
        results = list(pool.map(spawner.run, range(args.process_tasks)))
        seconds = time.perf_counter() - started
        cpu = {"total": this_tree_cpu() - cpu_before}
    if results != [compute(x) for x in inputs(args.process_tasks)]:
        raise BenchError(f"{system}: wrong results")
    notes = []
    if sandboxed:
        notes.append(f"as node.sandbox launches it: {sandbox_name()}, fresh scratch dir each")
    return Figure(system, "process", args.process_tasks, seconds, cpu, notes)


def sandbox_name() -> str:
    """What the nodes' ``sandbox: auto`` comes to on this machine."""
    try:
        from node.sandbox import default_sandbox

        sandbox = default_sandbox()
    except Exception as exc:  # node's API moved: say so rather than fail the bench
        return f"unknown ({exc})"
    name = "bubblewrap" if sandbox.bwrap else "none"
    return name + (f", task uid {sandbox.run_as[0]}" if sandbox.run_as else "")


# ---- Dask -----------------------------------------------------------------------------


def run_dask(args: argparse.Namespace, work: Path, system: str, report: Report) -> None:
    import dask
    from dask.distributed import Client, LocalCluster

    work.mkdir()
    main_py = work / "dask-main.py"
    main_py.write_text(MAIN_PY, encoding="utf-8")
    with (
        dask.config.set(DASK_CONFIGS[system]),
        LocalCluster(
            n_workers=args.nodes,
            threads_per_worker=args.slots,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        saturation = client.run_on_scheduler(_worker_saturation)
        report.dask_configs[system] = {"worker_saturation": str(saturation)}
        jobs: list[tuple[str, int, Callable[[dict[str, int]], Any]]] = [
            ("persistent", args.tasks, compute),
            ("process", args.process_tasks, partial(run_main, str(main_py))),
        ]
        warm = inputs(args.nodes * args.slots)
        client.gather(client.map(compute, warm, pure=False))
        for mode, tasks, function in jobs:
            if tasks <= 0:
                continue
            client.gather(client.map(function, warm, pure=False))
            cpu_self, cpu_tree = self_cpu(), this_tree_cpu()
            started = time.perf_counter()
            results = client.gather(client.map(function, inputs(tasks), pure=False))
            seconds = time.perf_counter() - started
            scheduler = self_cpu() - cpu_self
            total = this_tree_cpu() - cpu_tree
            if results != [compute(x) for x in inputs(tasks)]:
                raise BenchError(f"{system} {mode}: wrong results")
            cpu = {"scheduler_client": scheduler, "workers": total - scheduler, "total": total}
            report.add(Figure(system, mode, tasks, seconds, cpu))
        samples = []
        for i in range(args.latency_runs):
            started = time.perf_counter()
            result = client.submit(compute, task_input(i), pure=False).result()
            samples.append(time.perf_counter() - started)
            if result != compute(task_input(i)):
                raise BenchError(f"{system} latency: wrong result")
        if samples:
            report.add_latency(Latency(system, "client.submit -> .result()", samples))


def _worker_saturation(dask_scheduler: Any) -> float:
    return float(dask_scheduler.WORKER_SATURATION)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version}
    for package in ("issc", "dask", "distributed"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["issc_commit"] = git_commit()
    return found


def git_commit() -> str:
    """The checkout's commit, "+changes" if tracked files differ from it; "?" without git.
    Read-only: ``--no-optional-locks`` keeps git status from refreshing the index."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True)
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True
        )
    except OSError:
        return "?"
    if head.returncode != 0:
        return "?"
    dirty = "+changes" if changes.returncode == 0 and changes.stdout.strip() else ""
    return head.stdout.decode().strip() + dirty


# ---- the report ---------------------------------------------------------------------------


class Report:
    """Every figure of the run, printed as it comes (progress), then as a table or JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.figures: dict[str, dict[str, Figure]] = {}  # system -> mode -> figure
        self.latencies: dict[str, Latency] = {}
        self.dask_configs: dict[str, dict[str, str]] = {}
        self.notes: list[str] = []
        # The machine may be shared: its load before and after the run, next to the figures.
        self.load_start = os.getloadavg()

    def add(self, figure: Figure) -> None:
        self.figures.setdefault(figure.system, {})[figure.mode] = figure
        print(
            f"{SYSTEMS[figure.system]} {figure.mode}: {figure.rate:.1f} tasks/s "
            f"({figure.tasks} in {figure.seconds:.2f} s)",
            flush=True,
        )

    def add_latency(self, latency: Latency) -> None:
        self.latencies[latency.system] = latency
        s = latency.summary()
        print(
            f"{SYSTEMS[latency.system]} latency: p50 {s['p50_ms']} ms, p90 {s['p90_ms']} ms, "
            f"max {s['max_ms']} ms ({s['runs']} runs)",
            flush=True,
        )

    def rate(self, system: str, mode: str) -> float | None:
        figure = self.figures.get(system, {}).get(mode)
        return None if figure is None else finite(figure.rate, 6)

    def p50(self, system: str) -> float | None:
        latency = self.latencies.get(system)
        return None if latency is None else latency.summary()["p50_ms"]

    def fastest_dask(self) -> str | None:
        rates = {s: self.rate(s, "persistent") for s in DASK_CONFIGS}
        known = {s: r for s, r in rates.items() if r is not None}
        return max(known, key=lambda s: known[s]) if known else None

    def ratios(self) -> dict[str, Any]:
        issc = self.rate("issc", "persistent")
        process = self.rate("issc", "process")
        fastest = self.fastest_dask()
        fastest_rate = self.rate(fastest, "persistent") if fastest else None
        bare = self.rate("bare_spawn", "process")
        dask_p50s = [p for p in (self.p50(s) for s in DASK_CONFIGS) if p is not None]
        return {
            "persistent_issc_over_dask_default": ratio(
                issc, self.rate("dask_default", "persistent")
            ),
            "persistent_issc_over_dask_saturation_inf": ratio(
                issc, self.rate("dask_saturation_inf", "persistent")
            ),
            "dask_fastest": fastest,
            "persistent_issc_over_dask_fastest": ratio(issc, fastest_rate),
            "process_issc_over_bare_spawn": ratio(process, bare),
            "process_issc_over_bare_spawn_sandboxed": ratio(
                process, self.rate("bare_spawn_sandboxed", "process")
            ),
            "process_bare_spawn_sandboxed_over_bare_spawn": ratio(
                self.rate("bare_spawn_sandboxed", "process"), bare
            ),
            "process_issc_over_dask_default": ratio(process, self.rate("dask_default", "process")),
            "latency_p50_issc_over_dask_default": ratio(self.p50("issc"), self.p50("dask_default")),
            "latency_p50_issc_over_dask_best": ratio(
                self.p50("issc"), min(dask_p50s) if dask_p50s else None
            ),
        }

    def as_json(self) -> dict[str, Any]:
        args = self.args
        ratios = self.ratios()
        met = ratios["process_issc_over_bare_spawn"]
        return {
            "benchmark": "throughput",
            "command": " ".join(["python", *COMMAND, *sys.argv[1:]]),
            "machine": machine_info(),
            "load_average": {
                "start": [round(x, 2) for x in self.load_start],
                "end": [round(x, 2) for x in os.getloadavg()],
            },
            "versions": versions(),
            "settings": {
                "nodes": args.nodes,
                "slots": args.slots,
                "dask_workers": args.nodes,
                "dask_threads_per_worker": args.slots,
                "tasks": args.tasks,
                "process_tasks": args.process_tasks,
                "latency_runs": args.latency_runs,
                "work": f"sum(range({WORK} + i % 100))",
                "sandbox": sandbox_name(),
                "hub": "embedded SQLite, durable settings as shipped",
            },
            "dask_configs": self.dask_configs,
            "throughput": {
                system: {mode: f.as_json() for mode, f in modes.items()}
                for system, modes in self.figures.items()
            },
            "latency": {system: lat.summary() for system, lat in self.latencies.items()},
            "ratios": ratios,
            "targets": {
                "process_issc_over_bare_spawn_min": round(PROCESS_TARGET, 3),
                "process_target_met": None if met is None else met >= PROCESS_TARGET,
            },
            "checked": "every issc task C exactly once with the right result; every Dask "
            "and bare-spawn result right",
            "notes": self.notes,
        }

    def print_table(self) -> None:
        print(
            f"\n{'system':<22} {'mode':<11} {'tasks':>6} {'seconds':>8} {'tasks/s':>9} "
            f"{'CPU s':>7}  CPU by part"
        )
        order = [(s, m) for m in MODES for s in SYSTEMS]
        for system, mode in order:
            f = self.figures.get(system, {}).get(mode)
            if f is None:
                continue
            parts = ", ".join(f"{k} {v:.1f}" for k, v in f.cpu.items() if k != "total")
            print(
                f"{SYSTEMS[system]:<22} {mode:<11} {f.tasks:>6} {f.seconds:>8.2f} "
                f"{f.rate:>9.1f} {f.cpu['total']:>7.1f}  {parts}"
            )
        r = self.ratios()
        lines = [
            ("persistent: issc / dask default", r["persistent_issc_over_dask_default"]),
            (
                "persistent: issc / dask saturation inf",
                r["persistent_issc_over_dask_saturation_inf"],
            ),
            (
                f"persistent: issc / dask fastest ({SYSTEMS.get(r['dask_fastest'] or '', '-')})",
                r["persistent_issc_over_dask_fastest"],
            ),
            (
                f"process: issc / bare spawn (target >= {PROCESS_TARGET:.2f})",
                r["process_issc_over_bare_spawn"],
            ),
            ("process: issc / bare spawn, sandboxed", r["process_issc_over_bare_spawn_sandboxed"]),
            ("process: bare sandboxed / bare", r["process_bare_spawn_sandboxed_over_bare_spawn"]),
            ("process: issc / dask default", r["process_issc_over_dask_default"]),
        ]
        if any(value is not None for _, value in lines):
            print("\nratios (tasks/s, issc over the other):")
        for label, value in lines:
            if value is not None:
                print(f"  {label:<54} {value:>7.3f}")
        if self.latencies:
            print(f"\n{'latency, one task at a time':<56} {'runs':>5} {'p50 ms':>8} "
                  f"{'p90 ms':>8} {'max ms':>8}")  # fmt: skip
            for system in SYSTEMS:
                if system in self.latencies:
                    s = self.latencies[system].summary()
                    label = f"{SYSTEMS[system]}: {s['what']}"
                    print(
                        f"{label:<56} {s['runs']:>5} {s['p50_ms']:>8.1f} {s['p90_ms']:>8.1f} "
                        f"{s['max_ms']:>8.1f}"
                    )
            for label, value in (
                ("p50: issc / dask default", r["latency_p50_issc_over_dask_default"]),
                ("p50: issc / dask's best", r["latency_p50_issc_over_dask_best"]),
            ):
                if value is not None:
                    print(f"  {label:<54} {value:>7.2f}")
        notes = [(s, m, f) for s, modes in self.figures.items() for m, f in modes.items()]
        if any(f.notes for _, _, f in notes) or self.notes:
            print()
            for system, mode, f in notes:
                if f.notes:
                    print(f"{SYSTEMS[system]} {mode}: " + "; ".join(f.notes))
            for note in self.notes:
                print(note)


# ---- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--nodes", type=int, default=2, help="issc nodes / Dask workers (2)")
    parser.add_argument(
        "--slots", type=int, default=1, help="slots per node / threads per Dask worker (1)"
    )
    parser.add_argument("--tasks", type=int, default=2000, help="persistent-mode tasks (2000)")
    parser.add_argument("--process-tasks", type=int, default=300, help="process-mode tasks (300)")
    parser.add_argument(
        "--latency-runs", type=int, default=100, help="one-at-a-time tasks for latency (100)"
    )
    parser.add_argument("--skip-dask", action="store_true", help="run without Dask")
    parser.add_argument(
        "--skip-sandboxed-spawn", action="store_true", help="no bare spawns through the sandbox"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--json-out", type=Path, metavar="FILE", help="also write the JSON object to FILE"
    )
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the directory (logs, db)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per wait (600)")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.slots < 1:
        parser.error("--nodes and --slots must be at least 1")
    if args.tasks < 0 or args.process_tasks < 0 or args.latency_runs < 0:
        parser.error("task and run counts must be at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # With --json, stdout carries the JSON object alone: progress goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = Report(args)
        status = run(args, report)
    if status != 0:
        return status
    figures = report.as_json()
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        report.print_table()
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\nload average at the end: {load} (1, 5, 15 min; the bench's own load included)")
        print(
            "\nissc commits every state change to disk (SQLite WAL, synchronous=FULL) and "
            "runs signed code in sandboxed subprocesses; Dask keeps its state in memory."
        )
    return 0


def run(args: argparse.Namespace, report: Report) -> int:
    info = versions()
    load = ", ".join(f"{x:.2f}" for x in report.load_start)
    extra = [f"dask {info['dask']}", f"issc {info['issc_commit']}"]
    dask_setting = (
        "Dask skipped"
        if args.skip_dask
        else f"Dask: {args.nodes} worker processes x {args.slots} threads, "
        "default config and worker-saturation inf"
    )
    print(f"machine: {machine(extra)}; load average {load}")
    print(
        f"{args.nodes} nodes x {args.slots} slots ({dask_setting}); {args.tasks} "
        f"persistent-mode and {args.process_tasks} process-mode tasks of sum(range(~1000)), "
        f"{args.latency_runs} latency runs; one warm-up task per slot first; "
        f"sandbox: {sandbox_name()}",
        flush=True,
    )
    dask_missing = False
    if not args.skip_dask:
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            dask_missing = True
            note = (
                "dask is not installed: no Dask figures. For the comparison, `make bench` "
                "installs it (or: pip install -e '.[bench]')."
            )
            print(note)
            report.notes.append(note)

    def body(work: Path) -> None:
        run_issc(args, work / "issc", report)
        if args.process_tasks > 0:
            report.add(run_bare(args, work, sandboxed=False))
            if not args.skip_sandboxed_spawn:
                try:
                    figure = run_bare(args, work, sandboxed=True)
                except (ImportError, AttributeError, TypeError) as exc:  # node's API moved
                    report.notes.append(f"sandboxed bare spawn skipped: {exc!r}")
                else:
                    report.add(figure)
        if not args.skip_dask and not dask_missing:
            for system in DASK_CONFIGS:
                run_dask(args, work / system, system, report)

    return run_in_workdir("throughput", args.dir, args.keep, body)


if __name__ == "__main__":
    sys.exit(main())
