"""End-to-end task throughput of issc on this machine, beside Dask doing the same work.

issc: a hub (embedded SQLite) and K volunteer nodes with S slots each, started as real
processes in a temporary directory, run N tiny tasks of a project this script writes and
signs itself, first in persistent mode (one long-lived worker process per slot, one JSON
line per task), then in process mode (a fresh Python process per task). The clock starts
when the task file is in the hub's inbox and stops when the outbox's results.jsonl has a
line for every task (the outbox is written after the database commit, so that is end to
end); then every task is checked to be C exactly once, with the right result.

Dask: ``LocalCluster(n_workers=K, threads_per_worker=S, processes=True)`` and
``client.map`` of the same function over the same inputs, gathered; for process mode the
function runs the same main.py with ``subprocess.run``, so both pay a process per task.

The work per task is negligible (``sum(range(n))``, n about 1000): this measures what
the scheduler costs per task, not computing speed. issc commits every state change to
disk (SQLite, WAL, synchronous=FULL) and runs signed code in sandboxed subprocesses;
Dask keeps its state in memory. Both first run one warm-up task per slot (bundle fetch,
worker start-up, function shipping), not timed.

    python bench/throughput.py [--nodes K] [--slots S] [--tasks N] [--process-tasks M]
                               [--skip-dask] [--dir DIR] [--keep]

Dask comes with ``make bench`` (``pip install -e '.[bench]'``); without it, issc runs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cluster import BenchError, Cluster, machine, run_in_workdir

ROOT = Path(__file__).resolve().parent.parent
# The interpreter flags issc's sandbox uses for a bare ``python3`` entrypoint; the Dask
# process-mode function uses them too, so both start the same interpreter the same way.
PYTHON_FLAGS = ("-s", "-E", "-B")
WORK = 1000  # each task computes sum(range(WORK + i % 100))
POLL = 0.01  # seconds between looks at results.jsonl

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
    "process": ("tp-process", "main.py", MAIN_PY),
}


# ---- the work, as Dask runs it ---------------------------------------------------------


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


# ---- results --------------------------------------------------------------------------


@dataclass
class Figure:
    system: str
    mode: str
    tasks: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else float("nan")


def print_table(figures: Sequence[Figure]) -> None:
    print(f"\n{'system':<8} {'mode':<11} {'tasks':>6} {'seconds':>8} {'tasks/s':>9}")
    for f in figures:
        print(f"{f.system:<8} {f.mode:<11} {f.tasks:>6} {f.seconds:>8.2f} {f.rate:>9.1f}")
    noted = [f for f in figures if f.notes]
    if noted:
        print()
        for f in noted:
            print(f"{f.system} {f.mode}: " + "; ".join(f.notes))


def dask_version() -> str:
    try:
        from importlib.metadata import version

        return version("dask")
    except Exception:  # not installed
        return "not installed"


# ---- issc -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children, from /proc (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")": state is field 0, so utime, stime, cutime, cstime are 11..14.
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class IsscCluster(Cluster):
    """The hub and ``nodes`` nodes of ``slots`` slots each, for both projects of MODES."""

    def __init__(self, work: Path, nodes: int, slots: int, timeout: float) -> None:
        super().__init__(work, timeout)
        self.nodes = nodes
        self.slots = slots

    def start(self) -> None:
        self.start_hub()
        for mode, (name, entry, source) in MODES.items():
            self.pack(name, self.work / name, entry, source, mode, wall_seconds=60, output_mb=1)
        names = [name for name, _, _ in MODES.values()]
        for i in range(self.nodes):
            self.start_node(f"node-{i}", names, slots=self.slots, volunteer=f"bench-{i}")
        self.wait_nodes(self.nodes, f"{self.nodes} connected nodes")

    # -- one measured run

    def write_tasks(self, name: str, file_name: str, ids: Sequence[str]) -> Path:
        path = self.work / file_name
        with path.open("w", encoding="utf-8") as out:
            for task_id, task_input in zip(ids, inputs(len(ids)), strict=True):
                out.write(json.dumps({"project": name, "id": task_id, "input": task_input}) + "\n")
        return path

    def run(self, mode: str, tasks: int) -> Figure:
        name = MODES[mode][0]
        self.register(name)
        results = self.hub_dir / "outbox" / name / "results.jsonl"
        warm = [f"w-{i}" for i in range(self.nodes * self.slots)]
        self.submit(self.write_tasks(name, f"{name}-warmup.jsonl", warm))
        counter = LineCounter(results)
        self.wait(lambda: counter.count() >= len(warm), f"{len(warm)} warm-up results")

        ids = [f"t-{i}" for i in range(tasks)]
        task_file = self.write_tasks(name, f"{name}.jsonl", ids)
        batches_before = self.control("status")["commit_batches"]
        cpu_before = {n: cpu_seconds(p.pid) for n, p in self.processes}
        self.submit(task_file)
        started = time.perf_counter()
        queued = self.inbox / task_file.name
        ingested: float | None = None
        deadline = time.monotonic() + self.timeout
        target = len(warm) + tasks
        while counter.count() < target:
            if ingested is None and not queued.exists():
                ingested = time.perf_counter() - started
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{name}: {counter.count() - len(warm)} of {tasks} results after "
                    f"{self.timeout:.0f} s (logs in {self.work})"
                )
            self.check_alive()
            time.sleep(POLL)
        seconds = time.perf_counter() - started
        cpu = {n: cpu_seconds(p.pid) - cpu_before[n] for n, p in self.processes}
        batches = self.control("status")["commit_batches"] - batches_before
        check_results(results, warm + ids)
        hub_cpu = cpu.pop("hub")
        notes = [
            f"task file ingested after {ingested or 0.0:.2f} s",
            f"{batches} scheduler commits ({batches / tasks:.2f} a task)",
            f"CPU seconds: hub {hub_cpu:.1f}, nodes {sum(cpu.values()):.1f} "
            f"(wall {seconds:.1f} x {os.cpu_count()} CPUs)",
        ]
        return Figure("issc", mode, tasks, seconds, notes)


class LineCounter:
    """Counts the lines of a growing file, reading only what was appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def count(self) -> int:
        try:
            with self.path.open("rb") as stream:
                stream.seek(self.offset)
                data = stream.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


def check_results(path: Path, ids: Sequence[str]) -> None:
    """Every task C exactly once with the right result, and nothing else."""
    # "w-7" and "t-7" both got the 8th input of their file.
    expected = {i: compute(task_input(int(i.split("-")[1]))) for i in ids}
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


def run_issc(args: argparse.Namespace, work: Path) -> list[Figure]:
    cluster = IsscCluster(work, args.nodes, args.slots, args.timeout)
    figures = []
    try:
        cluster.start()
        for mode, tasks in (("persistent", args.tasks), ("process", args.process_tasks)):
            if tasks > 0:
                figures.append(cluster.run(mode, tasks))
                print(f"issc {mode}: {figures[-1].rate:.1f} tasks/s", flush=True)
    finally:
        cluster.stop()
    return figures


# ---- Dask -----------------------------------------------------------------------------


def run_dask(args: argparse.Namespace, work: Path) -> list[Figure]:
    import logging

    from dask.distributed import Client, LocalCluster

    main_py = work / "dask-main.py"
    main_py.write_text(MAIN_PY, encoding="utf-8")
    figures = []
    with (
        LocalCluster(
            n_workers=args.nodes,
            threads_per_worker=args.slots,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        jobs: list[tuple[str, int, Callable[[dict[str, int]], Any]]] = [
            ("persistent", args.tasks, compute),
            ("process", args.process_tasks, partial(run_main, str(main_py))),
        ]
        for mode, tasks, function in jobs:
            if tasks <= 0:
                continue
            warm = inputs(args.nodes * args.slots)
            client.gather(client.map(function, warm, pure=False))
            started = time.perf_counter()
            results = client.gather(client.map(function, inputs(tasks), pure=False))
            seconds = time.perf_counter() - started
            if results != [compute(x) for x in inputs(tasks)]:
                raise BenchError(f"dask {mode}: wrong results")
            figures.append(Figure("dask", mode, tasks, seconds))
            print(f"dask {mode}: {figures[-1].rate:.1f} tasks/s", flush=True)
    return figures


# ---- main -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="issc nodes / Dask workers (2)")
    parser.add_argument("--slots", type=int, default=2, help="slots per node / threads (2)")
    parser.add_argument("--tasks", type=int, default=2000, help="persistent-mode tasks (2000)")
    parser.add_argument("--process-tasks", type=int, default=300, help="process-mode tasks (300)")
    parser.add_argument("--skip-dask", action="store_true", help="run issc only")
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the directory (logs, db)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per wait (600)")
    args = parser.parse_args()
    if args.nodes < 1 or args.slots < 1 or args.tasks < 0 or args.process_tasks < 0:
        parser.error("--nodes and --slots must be at least 1, task counts at least 0")

    print(f"machine: {machine([f'dask {dask_version()}'])}")
    print(
        f"{args.nodes} nodes x {args.slots} slots (Dask: {args.nodes} worker processes x "
        f"{args.slots} threads); {args.tasks} persistent-mode and {args.process_tasks} "
        "process-mode tasks of sum(range(~1000)); one warm-up task per slot first",
        flush=True,
    )
    dask_missing = False
    if not args.skip_dask:
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            dask_missing = True
            print(
                "dask is not installed: running issc alone. For the comparison, "
                "`make bench` installs it (or: pip install -e '.[bench]')."
            )
    figures: list[Figure] = []

    def body(work: Path) -> None:
        figures.extend(run_issc(args, work / "issc"))
        if not args.skip_dask and not dask_missing:
            figures.extend(run_dask(args, work))

    status = run_in_workdir("throughput", args.dir, args.keep, body)
    if status != 0:
        return status
    print_table(figures)
    print(
        "\nissc commits every state change to disk (SQLite WAL, synchronous=FULL) and runs "
        "signed code in sandboxed subprocesses; Dask keeps its state in memory."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
