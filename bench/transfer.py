"""Input and output file transfer through a real hub and node on loopback, beside plain
socket copies of the same bytes; and the bytes a shared input file costs on the wire.

Part 1, throughput. A hub (embedded SQLite) and one node run as processes in a temporary
directory. Each run submits one task with a fresh input file of S MiB (random bytes, so
nothing is cached or deduplicated); the task writes an output file of S MiB (fresh random
bytes, so the hub cannot have it already) and records when it started and ended. The
bench watches the partial files grow, by polling their sizes every millisecond (no
request to the hub or the node, so nothing disturbs them):

* download: the node's ``<node>/files/<sha256>.part`` until it holds all S bytes;
* upload: the hub's ``<hub>/uploads/<lease>/out.bin.part`` until it holds all S bytes
  (the hub fsyncs every chunk before it acknowledges it).

The rate is the bytes that arrived between the first and the last sighting, over that
time. The end-to-end phases around them are reported too: from the first input bytes to
the program starting (the rest of the download, the node's SHA-256 check, the read-only
copy into ``in/``, process start) and from the program's end to its line in results.jsonl
(output copied and hashed into the node's spool, the upload, the hub's SHA-256 check,
the commit, the copy into the outbox with fsync).

Baselines in the same run, same size, same disk: a sender process serves the file over a
loopback TCP socket (asyncio streams) to a receiver that appends to a file:

* ``stream``: the sender writes the whole file, the receiver appends what arrives (``cat``
  over a socket, no protocol at all);
* ``stop-and-wait``: the receiver asks for 1 MiB at an offset and waits for it before
  asking for the next, as ``fetch_file`` and ``upload`` do (one chunk in flight);
* ``stop-and-wait + fsync``: the same with an fsync of each chunk before the next ask, as
  the hub does for every upload chunk.

Part 2, bytes on the wire. N tasks share one input file of M MiB on K nodes (2 slots
each); each node talks to the hub through a counting TCP proxy in this process. Reported:
the hub's input-file payload bytes (``transfers.file_bytes_sent``), everything the hub sent
to the nodes (framing, offers, the bundle, heartbeats included), and N x M for comparison.

    python bench/transfer.py [--size-mb 64] [--runs 3] [--tasks 100] [--shared-mb 1]
                             [--nodes 2] [--dir DIR] [--keep] [--timeout 300]

No Dask comparison: Dask moves Python objects between workers (pickled, in memory), not
files with digests, resumable and fsynced; the socket baselines are the fair yardstick.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import BenchError, Cluster, machine, run_in_workdir

MIB = 1024 * 1024
CHUNK = MIB  # issc's transfer chunk (BUNDLE_CHUNK_SIZE)
POLL = 0.001  # seconds between looks at the partial files
DONE = (1 << 64) - 1  # the stop-and-wait receiver's "no more" request

COPY_MAIN = '''\
"""The transfer task: writes out/out.bin, S fresh random bytes; says when it ran."""
import json, os, sys, time
started = time.time()
size = json.load(sys.stdin)["size"]
os.makedirs("out", exist_ok=True)
with open("out/out.bin", "wb") as f:
    left = size
    while left:
        n = min(left, 1 << 20)
        f.write(os.urandom(n))
        left -= n
print(json.dumps({"started": started, "ended": time.time(), "in": os.path.getsize("in/data")}))
'''

SHARED_MAIN = '''\
"""The shared-input task: reads in/shared, answers its size."""
import json, os
print(json.dumps(os.path.getsize("in/shared")))
'''


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, CHUNK))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def rate(size: int, seconds: float) -> float:
    """MiB/s."""
    return size / MIB / seconds if seconds > 0 else float("nan")


# ---- processes ------------------------------------------------------------------------


class TransferCluster(Cluster):
    """The shared cluster, plus process-mode projects and reading a project's results."""

    wait_interval = 0.02

    def project(self, name: str, main_py: str, output_mb: int) -> None:
        """Write, sign and submit a process-mode project; wait until the hub has it."""
        directory = self.work / f"{name}-src"
        self.pack(name, directory, "main.py", main_py, "process", 600, output_mb)
        self.register(name)

    def results(self, project: str) -> list[dict[str, Any]]:
        path = self.hub_dir / "outbox" / project / "results.jsonl"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


# ---- part 1: throughput through issc ----------------------------------------------------


@dataclass
class Growth:
    """Sightings of a partial file growing: first (time, size) and when it was full."""

    first: tuple[float, int] | None = None
    full: float | None = None

    def see(self, now: float, size: int | None, total: int) -> None:
        if size is None or size <= 0 or self.full is not None:
            return
        if self.first is None:
            self.first = (now, size)
        if size >= total:
            self.full = now

    def rate(self, total: int) -> float:
        if self.first is None or self.full is None:
            return float("nan")
        started, size = self.first
        return rate(total - size, self.full - started)


def size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def upload_part_size(uploads: Path, name: str) -> int | None:
    try:
        leases = list(os.scandir(uploads))
    except FileNotFoundError:
        return None
    for lease in leases:
        size = size_of(Path(lease.path) / f"{name}.part")
        if size is not None:
            return size
    return None


@dataclass
class TransferRun:
    download: float  # MiB/s on the wire, node side
    upload: float  # MiB/s on the wire, hub side
    fetch_to_start: float  # s: first input bytes -> program started
    end_to_line: float  # s: program ended -> results line


def issc_run(cluster: TransferCluster, node_dir: Path, index: int, size: int) -> TransferRun:
    source = cluster.work / f"data-{index}.bin"
    sha = random_file(source, size)
    task = {"project": "xfer", "id": f"x-{index}", "input": {"size": size}}
    task["files"] = {"data": source.name}
    task_file = cluster.work / f"xfer-{index}.jsonl"
    task_file.write_text(json.dumps(task) + "\n", encoding="utf-8")
    before = len(cluster.results("xfer"))
    cluster.submit(task_file)

    part = node_dir / "files" / f"{sha}.part"
    uploads = cluster.hub_dir / "uploads"
    down, up = Growth(), Growth()
    deadline = time.monotonic() + cluster.timeout
    line_at: float | None = None
    while line_at is None:
        now = time.time()
        down.see(now, size_of(part), size)
        if down.full is not None:
            up.see(now, upload_part_size(uploads, "out.bin"), size)
        if len(cluster.results("xfer")) > before:
            line_at = time.time()
            break
        if time.monotonic() > deadline:
            cluster.check_alive()
            raise BenchError(f"task x-{index}: no result after {cluster.timeout:.0f} s")
        time.sleep(POLL)
    record = cluster.results("xfer")[-1]
    if record["state"] != "C" or record["result"]["in"] != size:
        raise BenchError(f"task x-{index}: {record['state']} {record['error']}")
    if [f["size"] for f in record["files"]] != [size]:
        raise BenchError(f"task x-{index}: output files {record['files']}")
    if down.first is None or up.first is None:
        raise BenchError(f"task x-{index}: a transfer was too quick to be seen")
    result = record["result"]
    return TransferRun(
        download=down.rate(size),
        upload=up.rate(size),
        fetch_to_start=result["started"] - down.first[0],
        end_to_line=line_at - result["ended"],
    )


def part_one(work: Path, size_mb: int, runs: int, timeout: float) -> list[TransferRun]:
    cluster = TransferCluster(work, timeout)
    try:
        cluster.start_hub()
        cluster.project("xfer", COPY_MAIN, output_mb=size_mb + 1)
        node_dir = cluster.start_node("node-0", ["xfer"])
        cluster.wait_nodes(1, "the node")
        out = []
        for i in range(runs):
            out.append(issc_run(cluster, node_dir, i, size_mb * MIB))
            r = out[-1]
            print(
                f"issc run {i + 1}: download {r.download:.0f} MiB/s, upload {r.upload:.0f} MiB/s;"
                f" first input byte -> program start {r.fetch_to_start:.2f} s, program end ->"
                f" results line {r.end_to_line:.2f} s",
                flush=True,
            )
        return out
    finally:
        cluster.stop()


# ---- part 1: socket baselines ------------------------------------------------------------


def _serve(path: str, mode: str, ports: Any) -> None:
    """The baseline sender (its own process): serves ``path`` to one connection."""

    async def main() -> None:
        served = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with open(path, "rb") as f:
                if mode == "stream":
                    while block := f.read(CHUNK):
                        writer.write(block)
                        await writer.drain()
                else:
                    while (offset := int.from_bytes(await reader.readexactly(8))) != DONE:
                        data = os.pread(f.fileno(), CHUNK, offset)
                        writer.write(len(data).to_bytes(8) + data)
                        await writer.drain()
            writer.close()
            served.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        async with server:
            await served.wait()

    asyncio.run(main())


async def _receive(port: int, dest: Path, mode: str, size: int) -> float:
    """Receive the file into ``dest``; seconds from connecting to the last byte written."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    with dest.open("wb") as out:
        if mode == "stream":
            while data := await reader.read(256 * 1024):
                out.write(data)
        else:
            held = 0
            while held < size:
                writer.write(held.to_bytes(8))
                await writer.drain()
                data = await reader.readexactly(int.from_bytes(await reader.readexactly(8)))
                out.write(data)
                held += len(data)
                if mode == "stop-and-wait + fsync":
                    out.flush()
                    os.fsync(out.fileno())
            writer.write(DONE.to_bytes(8))
            await writer.drain()
        out.flush()
        seconds = time.perf_counter() - started
    writer.close()
    return seconds


def baseline(work: Path, source: Path, mode: str) -> float:
    """MiB/s of one baseline copy of ``source``."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    sender = context.Process(target=_serve, args=(str(source), mode, ports), daemon=True)
    sender.start()
    try:
        port = ports.get(timeout=30)
        dest = work / "received.bin"
        seconds = asyncio.run(_receive(port, dest, mode, source.stat().st_size))
        if dest.stat().st_size != source.stat().st_size:
            raise BenchError(f"baseline {mode}: received {dest.stat().st_size} bytes")
        dest.unlink()
        return rate(source.stat().st_size, seconds)
    finally:
        sender.join(10)
        if sender.is_alive():
            sender.kill()


def baselines(work: Path, size_mb: int, runs: int) -> dict[str, list[float]]:
    work.mkdir(parents=True)
    source = work / "source.bin"
    random_file(source, size_mb * MIB)
    out: dict[str, list[float]] = {}
    for mode in ("stream", "stop-and-wait", "stop-and-wait + fsync"):
        out[mode] = [baseline(work, source, mode) for _ in range(runs)]
        print(f"baseline {mode}: " + ", ".join(f"{r:.0f}" for r in out[mode]) + " MiB/s")
    return out


# ---- part 2: bytes on the wire -------------------------------------------------------------


class CountingProxy:
    """A TCP proxy to ``target`` on its own thread, counting the bytes each way."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.down = 0  # hub -> node
        self.up = 0  # node -> hub
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> str:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return self.address

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hub_reader, hub_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, hub_writer, "up"),
            self._pipe(hub_reader, writer, "down"),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str
    ) -> None:
        try:
            while data := await reader.read(256 * 1024):
                if way == "down":
                    self.down += len(data)
                else:
                    self.up += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


@dataclass
class WireFigure:
    tasks: int
    shared: int
    nodes: int
    tasks_per_node: list[int]
    file_bytes: int
    bundle_bytes: int
    down_bytes: list[int]

    def print(self) -> None:
        naive = self.tasks * self.shared
        print(
            f"\nbytes on the wire: {self.tasks} tasks sharing one {self.shared / MIB:g} MiB input "
            f"on {self.nodes} nodes (tasks per node {self.tasks_per_node}):\n"
            f"  input-file payload sent by the hub: {self.file_bytes:,} B "
            f"= {self.file_bytes / self.shared:.2f} x the file\n"
            f"  everything the hub sent the nodes (proxy): {sum(self.down_bytes):,} B "
            f"(per node {', '.join(f'{b:,}' for b in self.down_bytes)}; bundle payload "
            f"{self.bundle_bytes:,} B)\n"
            f"  each task fetching its own copy would be: {naive:,} B "
            f"= {naive / max(sum(self.down_bytes), 1):.1f} x what was sent"
        )


def node_id_of(data_dir: Path) -> str:
    """The id of the node that runs from ``data_dir`` (it follows from the node's key)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from node.identity import node_id_in

    node_id = node_id_in(data_dir)
    if node_id is None:
        raise BenchError(f"{data_dir}: no node key")
    return node_id


def part_two(work: Path, tasks: int, shared_mb: float, nodes: int, timeout: float) -> WireFigure:
    cluster = TransferCluster(work, timeout)
    proxies: list[CountingProxy] = []
    try:
        cluster.start_hub()
        cluster.project("shared", SHARED_MAIN, output_mb=1)
        node_ids = []
        for i in range(nodes):
            proxy = CountingProxy(cluster.address)
            proxies.append(proxy)
            node_dir = cluster.start_node(f"node-{i}", ["shared"], hub=proxy.start())
            node_ids.append(node_dir)
        cluster.wait_nodes(nodes, f"{nodes} nodes")
        shared = int(shared_mb * MIB)
        random_file(cluster.work / "shared.bin", shared)
        lines = [
            json.dumps(
                {"project": "shared", "id": f"s-{i}", "input": i, "files": {"shared": "shared.bin"}}
            )
            for i in range(tasks)
        ]
        task_file = cluster.work / "shared.jsonl"
        task_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        cluster.submit(task_file)
        cluster.wait(lambda: len(cluster.results("shared")) >= tasks, f"{tasks} results")
        results = cluster.results("shared")
        bad = [r for r in results if r["state"] != "C" or r["result"] != shared]
        if bad or len(results) != tasks:
            raise BenchError(f"shared: {len(bad)} bad results of {len(results)}: {bad[:3]}")
        transfers = cluster.control("status")["transfers"]
        ids = [node_id_of(node_dir) for node_dir in node_ids]
        per_node = [sum(1 for r in results if r["node"] == node_id) for node_id in ids]
        return WireFigure(
            tasks=tasks,
            shared=shared,
            nodes=nodes,
            tasks_per_node=per_node,
            file_bytes=transfers["file_bytes_sent"],
            bundle_bytes=transfers["bundle_bytes_sent"],
            down_bytes=[p.down for p in proxies],
        )
    finally:
        cluster.stop()
        for proxy in proxies:
            proxy.stop()


# ---- main -----------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if len(values) > 1 else f"{values[0]:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64, help="input and output MiB (64)")
    parser.add_argument("--runs", type=int, default=3, help="transfer runs (3)")
    parser.add_argument("--tasks", type=int, default=100, help="tasks sharing one input (100)")
    parser.add_argument("--shared-mb", type=float, default=1, help="the shared input's MiB (1)")
    parser.add_argument("--nodes", type=int, default=2, help="nodes for the shared input (2)")
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the directory (logs, db)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per wait (300)")
    args = parser.parse_args()
    if args.size_mb < 2 or args.runs < 1 or args.tasks < 1 or args.nodes < 1:
        parser.error("--size-mb at least 2; --runs, --tasks and --nodes at least 1")

    print(f"machine: {machine()}")
    print(
        f"{args.size_mb} MiB in and out per task, {args.runs} runs; then {args.tasks} tasks "
        f"sharing one {args.shared_mb:g} MiB input on {args.nodes} nodes",
        flush=True,
    )
    found: dict[str, Any] = {}

    def body(work: Path) -> None:
        found["runs"] = part_one(work / "issc", args.size_mb, args.runs, args.timeout)
        found["base"] = baselines(work / "baseline", args.size_mb, args.runs)
        found["wire"] = part_two(
            work / "shared", args.tasks, args.shared_mb, args.nodes, args.timeout
        )

    status = run_in_workdir("transfer", args.dir, args.keep, body)
    if status != 0:
        return status
    runs, base, wire = found["runs"], found["base"], found["wire"]
    print(f"\n{'path':<38} {'MiB/s (range over runs)':>24}")
    print(f"{'issc download (fetch_file, node side)':<38} {spread([r.download for r in runs]):>24}")
    print(f"{'issc upload (upload, hub side)':<38} {spread([r.upload for r in runs]):>24}")
    for mode, rates in base.items():
        print(f"{'socket ' + mode:<38} {spread(rates):>24}")
    to_start = spread([r.fetch_to_start * 1000 for r in runs])
    to_line = spread([r.end_to_line * 1000 for r in runs])
    print(
        f"\nfirst input byte -> program start: {to_start} ms;"
        f" program end -> results line: {to_line} ms"
    )
    wire.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
