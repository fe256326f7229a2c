"""Swarm: thousands of simulated nodes speaking the real protocol to one real hub.

The hub is the real ``issc-hub`` process (embedded SQLite, durable settings as shipped),
started in a temporary directory. This one process then opens N TCP connections to it
and, on each, does what a node does on the wire: ``hello``, a signed ``proof`` with a key
of its own, ``welcome``; then a ``heartbeat`` every ``heartbeat_interval`` seconds (at a
random phase, as real nodes start at random times), and ``ready`` for one slot. Offers
are accepted and answered at once with a signed ``result``; no code runs, so what is
measured is the hub's cost of holding nodes and scheduling for them.

It reports how many nodes it held, the heartbeat round trip (``heartbeat`` sent to
``heartbeat_ack`` read) p50/p99 over the holding period, tasks done meanwhile, and the
hub's CPU and RSS (from /proc) in all and per connected node. ``--ceiling`` goes on
adding nodes in steps until the p99 passes 100 ms, a connection fails, or the file
descriptor limit is reached, and reports the last step that held.

    python bench/swarm.py [--nodes 10000] [--heartbeat 5] [--hold 30] [--tasks N]
                          [--ceiling] [--step 5000] [--dir DIR] [--keep] [--json]

The simulator shares the machine (2 cores here) with the hub, so the round trip includes
its own scheduling delay: the figures are an upper bound for the hub's share.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster import BenchError, Cluster, machine, run_in_workdir
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from issc.keys import public_key_string
from issc.nodeauth import Claim, answer_challenge
from issc.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Accept,
    Cancel,
    Challenge,
    Connection,
    Error,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    Offer,
    Proof,
    Ready,
    Result,
    ResultAck,
    Role,
    TaskOffer,
    Welcome,
)
from issc.resultmac import given_of, result_mac, returned_of, transcript_digest

PROJECT = "swarm"
VOLUNTEERS = 100  # simulated nodes belong to this many volunteers, round robin
CONNECTING_AT_ONCE = 200  # handshakes in flight; beyond this the hub's accept backlog fills
P99_TARGET_MS = 100.0
HANDSHAKE_DEADLINE = 60.0

ENTRY = """\
import json, sys
for line in sys.stdin:
    print(json.dumps({"result": 0}), flush=True)
"""


@dataclass
class Stats:
    """What the simulated nodes saw, shared by all of them."""

    connected: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    round_trips: list[float] = field(default_factory=list)  # seconds, while recording
    recording: bool = False
    results_acked: int = 0

    def fail(self, why: str) -> None:
        self.failed += 1
        self.failures[why] = self.failures.get(why, 0) + 1


class SimulatedNode:
    """One node's side of the protocol, without running any code."""

    def __init__(
        self, index: int, host: str, port: int, heartbeat: float, work: float, stats: Stats
    ):
        self.key = Ed25519PrivateKey.generate()
        self.volunteer = f"swarm-{index % VOLUNTEERS}"
        self.host, self.port = host, port
        self.heartbeat = heartbeat
        self.work = work  # mean seconds a task "runs" before its result goes back
        self.stats = stats
        self.conn = Connection(Role.NODE)
        self.node_id = ""
        self.result_key = b""
        self.sent_at: deque[float] = deque()  # heartbeats not yet acknowledged
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> asyncio.StreamReader:
        """Open the connection and finish the handshake; raises on any failure."""
        reader, self.writer = await asyncio.open_connection(self.host, self.port)
        hello = Hello(
            protocol=PROTOCOL_VERSION,
            software="issc-swarm/1",
            volunteer=self.volunteer,
            token=None,
            public_key=public_key_string(self.key.public_key()),
            projects=[PROJECT],
            slots=1,
            leases=[],
        )
        self.send(hello)
        challenge = await self.receive(reader)
        if not isinstance(challenge, Challenge):
            raise BenchError(f"expected challenge, got {challenge}")
        claim = Claim(hello.volunteer, hello.public_key, hello.token)
        answer = answer_challenge(self.key, challenge.nonce, challenge.kex, claim)
        self.result_key = answer.result_key
        self.send(Proof(signature=answer.signature, kex=answer.kex))
        welcome = await self.receive(reader)
        if not isinstance(welcome, Welcome):
            raise BenchError(f"expected welcome, got {welcome}")
        self.node_id = welcome.node_id
        self.send(Ready(free=1))
        return reader

    def send(self, message: Message) -> None:
        assert self.writer is not None
        self.writer.write(self.conn.send(message))

    async def receive(self, reader: asyncio.StreamReader) -> Message:
        while True:
            event = self.conn.next_event()
            if isinstance(event, Message):
                return event
            if event is not NEED_DATA:
                raise ConnectionError("the hub closed the connection")
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the hub closed the connection")
            self.conn.receive_data(data)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Heartbeats and work until cancelled or the hub hangs up."""
        beating = asyncio.create_task(self.beat())
        try:
            while True:
                self.handle(await self.receive(reader))
        finally:
            beating.cancel()

    async def beat(self) -> None:
        await asyncio.sleep(random.uniform(0, self.heartbeat))
        while True:
            self.sent_at.append(time.perf_counter())
            self.send(Heartbeat(running=[]))
            await asyncio.sleep(self.heartbeat)

    def handle(self, message: Message) -> None:
        if isinstance(message, HeartbeatAck):
            sent = self.sent_at.popleft()
            if self.stats.recording:
                self.stats.round_trips.append(time.perf_counter() - sent)
        elif isinstance(message, Offer):
            self.send(Accept(leases=[task.lease for task in message.tasks]))
            loop = asyncio.get_running_loop()
            for task in message.tasks:
                # Work takes a while (0.5 to 1.5 times the mean), as on a real node.
                loop.call_later(random.uniform(0.5, 1.5) * self.work, self.finish, task)
        elif isinstance(message, ResultAck):
            self.stats.results_acked += 1
            self.send(Ready(free=1))
        elif isinstance(message, Error):
            raise ConnectionError(f"error {message.code}: {message.message}")
        elif not isinstance(message, Cancel):
            raise BenchError(f"unexpected {message}")

    def finish(self, task: TaskOffer) -> None:
        if self.writer is None or self.writer.is_closing():
            return
        given = given_of(task.lease, task.project, task.task, task.digest, task.input, [])
        returned = returned_of(True, 0, None, 0.0, 0.0, [])
        self.send(
            Result(
                lease=task.lease,
                project=task.project,
                task=task.task,
                ok=True,
                result=0,
                error=None,
                cpu_seconds=0.0,
                wall_seconds=0.0,
                files=[],
                mac=result_mac(self.result_key, transcript_digest(self.node_id, given, returned)),
            )
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Step:
    """The figures of one number of nodes, held for a while."""

    nodes: int
    held: int
    failed: int
    connect_seconds: float
    heartbeats: int
    rtt_p50_ms: float
    rtt_p99_ms: float
    rtt_max_ms: float
    tasks_done: int
    hub_cpu_percent: float
    swarm_cpu_percent: float
    hub_rss_mib: float
    hub_rss_per_node_kib: float
    hub_cpu_ms_per_node_second: float
    failures: dict[str, int]

    def print(self) -> None:
        print(
            f"{self.nodes:>7} {self.held:>7} {self.failed:>6} {self.connect_seconds:>9.1f} "
            f"{self.rtt_p50_ms:>8.2f} {self.rtt_p99_ms:>8.2f} {self.rtt_max_ms:>8.1f} "
            f"{self.tasks_done:>7} {self.hub_cpu_percent:>8.1f} {self.hub_rss_mib:>8.1f} "
            f"{self.hub_rss_per_node_kib:>9.1f} {self.swarm_cpu_percent:>10.1f}",
            flush=True,
        )


HEADER = (
    f"{'nodes':>7} {'held':>7} {'failed':>6} {'connect s':>9} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'max ms':>8} {'tasks':>7} {'hub CPU%':>8} {'RSS MiB':>8} {'KiB/node':>9} {'swarm CPU%':>10}"
)


def hub_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hub_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by the hub started after it) to
    ``wanted``, past the hard limit when root may; the soft limit reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted > hard and os.geteuid() == 0:
        ceiling = min(wanted, int(Path("/proc/sys/fs/nr_open").read_text()))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            return ceiling
        except (ValueError, OSError):  # root without CAP_SYS_RESOURCE (a container)
            pass
    target = min(max(soft, wanted), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


class Swarm:
    """The hub and the simulated nodes, grown step by step."""

    def __init__(self, cluster: Cluster, hub_pid: int, heartbeat: float, work: float) -> None:
        host, port = cluster.address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.cluster = cluster
        self.hub_pid = hub_pid
        self.heartbeat = heartbeat
        self.work = work
        self.stats = Stats()
        self.nodes: list[asyncio.Task[None]] = []
        self.rss_before = hub_rss_mib(hub_pid)

    async def grow(self, count: int) -> float:
        """Connect ``count`` more nodes, at most CONNECTING_AT_ONCE at a time; seconds."""
        started = time.perf_counter()
        gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
        done: list[asyncio.Future[None]] = []
        for _ in range(count):
            await gate.acquire()
            handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.append(handshake)
            index = len(self.nodes)
            self.nodes.append(asyncio.create_task(self.live(index, gate, handshake)))
        await asyncio.gather(*done)
        return time.perf_counter() - started

    async def live(self, index: int, gate: asyncio.Semaphore, handshake: asyncio.Future[None]):
        node = SimulatedNode(index, self.host, self.port, self.heartbeat, self.work, self.stats)
        try:
            try:
                reader = await asyncio.wait_for(node.connect(), HANDSHAKE_DEADLINE)
            except (OSError, ConnectionError, TimeoutError, BenchError) as exc:
                self.stats.fail(f"connect: {type(exc).__name__}: {exc}"[:120])
                return
            finally:
                gate.release()
                handshake.set_result(None)
            self.stats.connected += 1
            try:
                await node.serve(reader)
            except (OSError, ConnectionError, BenchError) as exc:
                self.stats.connected -= 1
                self.stats.fail(f"dropped: {exc}"[:120])
        finally:
            node.close()

    async def hold(self, seconds: float, tasks: int) -> Step:
        """Record heartbeats for ``seconds`` while ``tasks`` tasks go through."""
        stats = self.stats
        stats.round_trips.clear()
        acked = stats.results_acked
        if tasks:
            await asyncio.to_thread(self.submit, tasks)
        cpu0, wall0 = hub_cpu_seconds(self.hub_pid), time.perf_counter()
        own0 = time.process_time()
        stats.recording = True
        await asyncio.sleep(seconds)
        stats.recording = False
        cpu = hub_cpu_seconds(self.hub_pid) - cpu0
        wall = time.perf_counter() - wall0
        own = time.process_time() - own0
        rtts = sorted(stats.round_trips) or [0.0]
        rss = hub_rss_mib(self.hub_pid)
        held = max(stats.connected, 1)
        return Step(
            nodes=len(self.nodes),
            held=stats.connected,
            failed=stats.failed,
            connect_seconds=0.0,
            heartbeats=len(stats.round_trips),
            rtt_p50_ms=statistics.median(rtts) * 1000,
            rtt_p99_ms=rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1000,
            rtt_max_ms=rtts[-1] * 1000,
            tasks_done=stats.results_acked - acked,
            hub_cpu_percent=100 * cpu / wall,
            swarm_cpu_percent=100 * own / wall,
            hub_rss_mib=rss,
            hub_rss_per_node_kib=(rss - self.rss_before) * 1024 / held,
            hub_cpu_ms_per_node_second=1000 * cpu / wall / held,
            failures=dict(stats.failures),
        )

    def submit(self, tasks: int) -> None:
        name = f"tasks-{time.monotonic_ns()}.jsonl"
        path = self.cluster.work / name
        with path.open("w", encoding="utf-8") as out:
            for i in range(tasks):
                out.write(json.dumps({"project": PROJECT, "id": f"{name}-{i}", "input": i}) + "\n")
        self.cluster.submit(path)

    async def stop(self) -> None:
        for task in self.nodes:
            task.cancel()
        await asyncio.gather(*self.nodes, return_exceptions=True)


def start_hub(work: Path, heartbeat: float, max_nodes: int) -> Cluster:
    cluster = Cluster(work, timeout=120)
    cluster.start_hub(
        f"heartbeat_interval: {heartbeat}\n"
        f"limits: {{max_connections: {max_nodes + 100}, "
        f"max_connections_per_address: {max_nodes + 100}}}\n"
    )
    cluster.pack(PROJECT, work / "project", "main.py", ENTRY, "persistent", 60, 1)
    cluster.register(PROJECT)
    return cluster


async def run(args: argparse.Namespace, cluster: Cluster) -> list[Step]:
    hub_pid = cluster.processes[0][1].pid
    swarm = Swarm(cluster, hub_pid, args.heartbeat, args.task_seconds)
    steps: list[Step] = []
    try:
        targets = (
            list(range(args.step, args.max_nodes + 1, args.step)) if args.ceiling else [args.nodes]
        )
        for target in targets:
            connect_seconds = await swarm.grow(target - len(swarm.nodes))
            # The simulated nodes are long-lived objects: keep the collector from walking
            # them all again and again (its pauses would count as heartbeat delay).
            gc.collect()
            gc.freeze()
            await asyncio.sleep(args.heartbeat)  # every node's first heartbeat is out
            step = await swarm.hold(args.hold, args.tasks if args.tasks >= 0 else target)
            step.connect_seconds = connect_seconds
            step.print()
            steps.append(step)
            cluster.check_alive()
            if step.failed or step.rtt_p99_ms > P99_TARGET_MS:
                break
    finally:
        await swarm.stop()
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10000, help="simulated nodes (10000)")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat seconds (5)")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds measured per step")
    parser.add_argument(
        "--tasks", type=int, default=-1, help="tasks done per step (default: one per node)"
    )
    parser.add_argument(
        "--task-seconds", type=float, default=5.0, help="mean simulated work per task (5)"
    )
    parser.add_argument("--ceiling", action="store_true", help="grow in steps until it fails")
    parser.add_argument("--step", type=int, default=5000, help="nodes added per step (5000)")
    parser.add_argument("--max-nodes", type=int, default=60000, help="stop there (60000)")
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the directory (logs, db)")
    parser.add_argument("--json", action="store_true", help="print the steps as JSON too")
    args = parser.parse_args()
    most = args.max_nodes if args.ceiling else args.nodes
    if most < 1 or args.step < 1 or args.heartbeat <= 0 or args.hold <= 0:
        parser.error("--nodes, --step, --heartbeat and --hold must be positive")
    limit = raise_fd_limit(most + 1000)
    if args.ceiling:  # each node is a descriptor here and one in the hub
        most = args.max_nodes = min(args.max_nodes, limit - 1000)
    print(f"machine: {machine()}")
    print(
        f"{'up to ' + str(most) if args.ceiling else most} simulated nodes in one process, "
        f"heartbeat every {args.heartbeat:g} s, each step held {args.hold:g} s; "
        f"open-file limit {limit}",
        flush=True,
    )
    if limit < most + 100 or most < 1:
        print(f"swarm: the open-file limit {limit} is too low for {most} nodes", file=sys.stderr)
        return 1
    steps: list[Step] = []

    def body(work: Path) -> None:
        cluster = start_hub(work, args.heartbeat, most)
        try:
            print(HEADER, flush=True)
            steps.extend(asyncio.run(run(args, cluster)))
        finally:
            cluster.stop()

    status = run_in_workdir("swarm", args.dir, args.keep, body)
    if status != 0:
        return status
    if args.json:
        print(json.dumps([asdict(step) for step in steps], indent=2))
    for step in steps:
        if step.failures:
            print(f"at {step.nodes} nodes: {step.failures}")
    held = [s for s in steps if not s.failed and s.rtt_p99_ms <= P99_TARGET_MS]
    if args.ceiling:
        best = held[-1].nodes if held else 0
        print(f"ceiling: {best} nodes held with heartbeat p99 <= {P99_TARGET_MS:g} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
