"""Bundle and input-file bytes the hub sends for N nodes, with and without a LAN relay.

For each N (``--peers``), two scenarios run on 127.0.0.1 with real processes, each with a
fresh hub (so its counters start at zero) in its own directory:

* direct: a hub and N nodes, each connected to the hub;
* relayed: a hub, one relay node (``relay: {listen: 127.0.0.1:0}``, ``projects: []``:
  it runs no tasks, it only relays) and N peers whose ``hub:`` is only the relay.

So N nodes run tasks in both. The project's bundle is large: besides its program it holds
``--payload-mb`` MiB of random bytes (gzip cannot shrink them). ``--tasks-per-node`` x N
tasks all name the same ``--shared-mb`` MiB input file; each task holds its slot for
``--task-seconds`` so that every node (1 slot each) gets at least one task and so needs
the bundle and the file (the bench checks it). The clock starts when the task file is in
the hub's inbox and stops when the outbox has every result; then the hub is asked for its
transfer counters (``issc-ctl --json status`` -> ``transfers``) and its nodes
(``issc-ctl --json nodes``: a node with ``via`` null is a connection at the hub).

    python bench/relay.py [--peers 3 10] [--payload-mb 4] [--shared-mb 1]
                          [--tasks-per-node 4] [--task-seconds 0.2] [--dir DIR] [--keep]
                          [--timeout 120]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import BenchError, Cluster, machine, run_in_workdir

MIB = 1024 * 1024
PROJECT = "relaybench"

MAIN_PY = '''\
"""Reads in/shared, holds its slot a moment, answers the file's size."""
import json, os, sys, time
seconds = json.load(sys.stdin)["sleep"]
time.sleep(seconds)
print(json.dumps(os.path.getsize("in/shared")))
'''


@dataclass
class Scenario:
    name: str  # "direct" or "relayed"
    nodes: int  # nodes that run tasks (N)
    bundle_size: int
    transfers: dict[str, int]
    hub_connections: int  # nodes with via null
    via_relay: int  # nodes whose via is the relay
    ran_tasks: int  # distinct nodes with a result
    setup: float  # seconds: hub start -> every node connected
    wall: float  # seconds: task file in the inbox -> every result in the outbox

    def print(self) -> None:
        t = self.transfers
        print(
            f"{self.name} N={self.nodes}: bundle {self.bundle_size:,} B; hub sent "
            f"{t['bundles_sent']} bundles, {t['bundle_bytes_sent']:,} B of bundle, "
            f"{t['file_bytes_sent']:,} B of input files; {self.hub_connections} connections "
            f"at the hub ({self.via_relay} via the relay); {self.ran_tasks} nodes ran tasks; "
            f"run {self.wall:.2f} s (set-up {self.setup:.2f} s)",
            flush=True,
        )


class RelayCluster(Cluster):
    """The shared cluster, plus a project with a payload, a relay, and results."""

    wait_interval = 0.02

    def project(self, payload: bytes) -> int:
        """Write, sign and register the project with ``payload`` beside its program; the
        bundle's size."""
        directory = self.work / f"{PROJECT}-src"
        directory.mkdir()
        (directory / "main.py").write_text(MAIN_PY, encoding="utf-8")
        (directory / "payload.bin").write_bytes(payload)
        (directory / "project.yaml").write_text(
            f"name: {PROJECT}\nversion: 1\nentrypoint: [python3, main.py]\nmode: process\n"
            "limits: {wall_seconds: 60, memory_mb: 256, output_mb: 1}\nquorum: 1\n",
            encoding="utf-8",
        )
        bundle = self.work / f"{PROJECT}.issc"
        self.tool("pack", directory, "--key", "owner.key", "--out", bundle)
        self.register(PROJECT)
        return bundle.stat().st_size

    def start_relay(self, name: str) -> str:
        """A relay node that runs no tasks; its address once it accepts peers."""
        config = self.work / f"{name}.yaml"
        config.write_text(
            f"hub: {self.address}\nvolunteer: relay\ndata_dir: ./{name}\nprojects: []\n"
            "slots: 1\nrelay: {listen: 127.0.0.1:0}\n",
            encoding="utf-8",
        )
        self.spawn(name, "issc-node", config.name)
        addr_file = self.work / name / "relay.addr"
        self.wait(addr_file.exists, "the relay's address file")
        return addr_file.read_text(encoding="utf-8").strip()

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.control("nodes")
        return nodes

    def results(self) -> list[dict[str, Any]]:
        path = self.hub_dir / "outbox" / PROJECT / "results.jsonl"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def run_scenario(
    work: Path, name: str, peers: int, payload: bytes, args: argparse.Namespace
) -> Scenario:
    cluster = RelayCluster(work, args.timeout)
    try:
        started = time.perf_counter()
        cluster.start_hub()
        bundle_size = cluster.project(payload)
        hub = cluster.address
        if name == "relayed":
            hub = cluster.start_relay("relay")
            cluster.wait(lambda: len(cluster.nodes()) == 1, "the relay at the hub")
        for i in range(peers):
            cluster.start_node(f"node-{i}", [PROJECT], hub=hub, slots=1, volunteer=f"bench-{i}")
        expected = peers + (name == "relayed")
        cluster.wait(lambda: len(cluster.nodes()) == expected, f"{expected} nodes at the hub")
        setup = time.perf_counter() - started

        (cluster.work / "shared.bin").write_bytes(os.urandom(int(args.shared_mb * MIB)))
        tasks = peers * args.tasks_per_node
        task_file = cluster.work / "tasks.jsonl"
        task_file.write_text(
            "".join(
                json.dumps(
                    {
                        "project": PROJECT,
                        "id": f"t-{i}",
                        "input": {"sleep": args.task_seconds},
                        "files": {"shared": "shared.bin"},
                    }
                )
                + "\n"
                for i in range(tasks)
            ),
            encoding="utf-8",
        )
        cluster.submit(task_file)
        started = time.perf_counter()
        cluster.wait(lambda: len(cluster.results()) >= tasks, f"{tasks} results")
        wall = time.perf_counter() - started

        results = cluster.results()
        size = int(args.shared_mb * MIB)
        bad = [r for r in results if r["state"] != "C" or r["result"] != size]
        if bad or len(results) != tasks:
            raise BenchError(f"{name}: {len(bad)} bad results of {len(results)}: {bad[:3]}")
        transfers = cluster.control("status")["transfers"]
        nodes = cluster.nodes()
        direct = [n["node"] for n in nodes if n["via"] is None]
        relay_id = direct[0] if name == "relayed" and len(direct) == 1 else None
        ran = {r["node"] for r in results}
        if len(ran) != peers or (relay_id is not None and relay_id in ran):
            raise BenchError(
                f"{name}: {len(ran)} nodes ran tasks, not the {peers} task nodes; "
                "raise --task-seconds"
            )
        return Scenario(
            name=name,
            nodes=peers,
            bundle_size=bundle_size,
            transfers=transfers,
            hub_connections=len(direct),
            via_relay=sum(1 for n in nodes if relay_id is not None and n["via"] == relay_id),
            ran_tasks=len(ran),
            setup=setup,
            wall=wall,
        )
    finally:
        cluster.stop()


def print_table(scenarios: list[Scenario]) -> None:
    header = (
        f"\n{'N':>3} {'scenario':<8} {'bundle B':>11} {'bundles_sent':>12} "
        f"{'bundle_bytes_sent':>17} {'file_bytes_sent':>15} {'hub conns':>9} "
        f"{'set-up s':>8} {'wall s':>7}"
    )
    print(header)
    for s in scenarios:
        t = s.transfers
        print(
            f"{s.nodes:>3} {s.name:<8} {s.bundle_size:>11,} {t['bundles_sent']:>12} "
            f"{t['bundle_bytes_sent']:>17,} {t['file_bytes_sent']:>15,} "
            f"{s.hub_connections:>9} {s.setup:>8.2f} {s.wall:>7.2f}"
        )
    by_n: dict[int, dict[str, Scenario]] = {}
    for s in scenarios:
        by_n.setdefault(s.nodes, {})[s.name] = s
    print()
    for n, pair in by_n.items():
        if {"direct", "relayed"} <= pair.keys():
            d, r = pair["direct"].transfers, pair["relayed"].transfers
            bundle = d["bundle_bytes_sent"] / max(r["bundle_bytes_sent"], 1)
            files = d["file_bytes_sent"] / max(r["file_bytes_sent"], 1)
            print(
                f"N={n}: the relay cuts the hub's bundle bytes {bundle:.1f} x and its "
                f"input-file bytes {files:.1f} x"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[3, 10], help="N (3 10)")
    parser.add_argument("--payload-mb", type=float, default=4, help="random MiB in bundle (4)")
    parser.add_argument("--shared-mb", type=float, default=1, help="the shared input's MiB (1)")
    parser.add_argument("--tasks-per-node", type=int, default=4, help="tasks per node (4)")
    parser.add_argument("--task-seconds", type=float, default=0.2, help="each task sleeps (0.2)")
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the directory (logs, db)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per wait (120)")
    args = parser.parse_args()
    if min(args.peers) < 1 or args.tasks_per_node < 1 or args.shared_mb <= 0:
        parser.error("--peers and --tasks-per-node at least 1, --shared-mb above 0")
    if args.payload_mb < 0 or args.task_seconds < 0:
        parser.error("--payload-mb and --task-seconds at least 0")

    print(f"machine: {machine()}")
    print(
        f"N nodes in {args.peers}, 1 slot each: direct to the hub, then behind one relay "
        f"(projects: [], it runs no tasks); bundle with {args.payload_mb:g} MiB of random "
        f"payload; {args.tasks_per_node} tasks per node sharing one {args.shared_mb:g} MiB "
        f"input, each sleeping {args.task_seconds:g} s",
        flush=True,
    )
    payload = os.urandom(int(args.payload_mb * MIB))
    scenarios: list[Scenario] = []

    def body(work: Path) -> None:
        for peers in args.peers:
            for name in ("direct", "relayed"):
                scenarios.append(run_scenario(work / f"{name}-{peers}", name, peers, payload, args))
                scenarios[-1].print()

    status = run_in_workdir("relay", args.dir, args.keep, body)
    if status != 0:
        return status
    print_table(scenarios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
