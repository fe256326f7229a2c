"""A TCP proxy between issc nodes and the hub that cuts connections on command.

``ChaosProxy`` listens on 127.0.0.1 and pipes each accepted connection to the hub's
address. It follows issc's framing (a 4-byte big-endian length, then the body) in both
directions, so it can cut a connection exactly *inside* a frame: it forwards the header
and part of the body, then aborts both sides (an RST, no orderly close). Two kinds of cut:

* ``cut_connections``: each chosen connection is cut inside the next frame that crosses
  it, in either direction (a heartbeat every ``heartbeat_interval`` makes that soon);
* ``arm_transfer_cut``: the next connection whose hub-to-node stream carries ``threshold``
  bytes of large frames (bundle and file chunks, up to 1 MiB each) is cut at that byte,
  which is inside a chunk: "a bundle download cut half way".

It runs its own event loop in a thread (``start``/``stop``); the chaos harness calls it
from its own thread. Counters are plain integers read without locking (the GIL makes
each read whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HEADER = 4
READ_SIZE = 64 * 1024
LARGE_FRAME = 256 * 1024  # frames at least this long are bulk transfer (bundle/file chunks)


class FrameTracker:
    """Where one direction of a connection stands in issc's framing."""

    def __init__(self) -> None:
        self.header = b""  # bytes of the current frame's length prefix seen so far
        self.size = 0  # body length of the current frame
        self.remaining = 0  # body bytes of the current frame not yet seen
        self.frames = 0  # complete frames
        self.large_bytes = 0  # body bytes of large frames seen

    def mid_frame_cut(self, data: bytes) -> int | None:
        """A position in ``data`` strictly inside a frame: its header and at least one
        byte of its body are before it, at least one body byte after it; or None."""
        i, header, remaining, size = 0, self.header, self.remaining, self.size
        while i < len(data):
            if remaining == 0:
                take = min(HEADER - len(header), len(data) - i)
                header += data[i : i + take]
                i += take
                if len(header) == HEADER:
                    size = remaining = struct.unpack(">I", header)[0]
                    header = b""
                continue
            take = min(remaining, len(data) - i)
            # Forwarding p bytes of this stretch leaves the frame unfinished while
            # p < remaining; p >= 1 at the body's start so some body goes through.
            low, high = (1 if remaining == size else 0), min(take, remaining - 1)
            if low <= high:
                return i + (low + high) // 2
            i += take
            remaining -= take
        return None

    def large_cut(self, data: bytes, threshold: int) -> int | None:
        """The position in ``data`` at which ``large_bytes`` reaches ``threshold`` inside
        a large frame's body (before its last byte), or None."""
        i, header, remaining, size = 0, self.header, self.remaining, self.size
        large = self.large_bytes
        while i < len(data):
            if remaining == 0:
                take = min(HEADER - len(header), len(data) - i)
                header += data[i : i + take]
                i += take
                if len(header) == HEADER:
                    size = remaining = struct.unpack(">I", header)[0]
                    header = b""
                continue
            take = min(remaining, len(data) - i)
            if size >= LARGE_FRAME:
                need = max(0, threshold - large)
                if need < take and need < remaining:
                    return i + need
                large += take
            i += take
            remaining -= take
        return None

    def advance(self, data: bytes) -> None:
        """Account for ``data`` having been forwarded."""
        i = 0
        while i < len(data):
            if self.remaining == 0:
                take = min(HEADER - len(self.header), len(data) - i)
                self.header += data[i : i + take]
                i += take
                if len(self.header) == HEADER:
                    self.size = self.remaining = struct.unpack(">I", self.header)[0]
                    self.header = b""
                continue
            take = min(self.remaining, len(data) - i)
            if self.size >= LARGE_FRAME:
                self.large_bytes += take
            i += take
            self.remaining -= take
            if self.remaining == 0:
                self.frames += 1


@dataclass
class Cut:
    """A cut that happened: which connection, which way, how far into the frame."""

    conn: int
    kind: str  # "mid_frame" or "transfer"
    direction: str  # "node->hub" or "hub->node"
    frame_size: int
    frame_offset: int  # body bytes of the frame forwarded before the cut
    at: float = field(default_factory=time.time)


@dataclass
class _Conn:
    number: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    down: FrameTracker = field(default_factory=FrameTracker)  # hub -> node
    up: FrameTracker = field(default_factory=FrameTracker)  # node -> hub
    cut_armed: bool = False
    large_base: int = 0  # down.large_bytes when the current transfer cut was armed
    closed: bool = False


class ChaosProxy:
    """The proxy; every method but ``start`` and ``stop`` is safe to call from any thread."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._next = 0
        self._transfer_cut: int | None = None  # armed threshold, used up by one cut
        self.cuts: list[Cut] = []
        self.accepted = 0
        self.upstream_refused = 0  # connections the hub did not take (hub down)
        self.bytes_down = 0
        self.bytes_up = 0
        self.on_cut: Callable[[Cut], None] | None = None

    # ---- life -------------------------------------------------------------------------

    def start(self) -> int:
        """Listen on 127.0.0.1 (a free port); the port."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, "127.0.0.1", 0)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close_all())
            loop.close()

        self._thread = threading.Thread(target=main, name="chaosproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self.port

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            self._abort(conn)

    # ---- commands (any thread) ----------------------------------------------------------

    def connections(self) -> int:
        return len(self._conns)

    def cut_connections(self, fraction: float, rng: random.Random) -> int:
        """Arm a mid-frame cut on ``fraction`` of the open connections (at least one, if
        any is open), chosen with ``rng``; how many were armed."""
        armed: list[int] = []

        def arm() -> None:
            numbers = sorted(self._conns)
            if not numbers:
                return
            count = min(len(numbers), max(1, round(len(numbers) * fraction)))
            for number in rng.sample(numbers, count):
                self._conns[number].cut_armed = True
                armed.append(number)

        self._call(arm)
        return len(armed)

    def disarm_connections(self) -> None:
        """Take back every mid-frame cut armed by cut_connections and not yet made."""

        def disarm() -> None:
            for conn in self._conns.values():
                conn.cut_armed = False

        self._call(disarm)

    def arm_transfer_cut(self, threshold: int) -> None:
        """Cut the first connection that carries ``threshold`` bytes of bulk transfer
        (large frames) from the hub from now on, at that byte."""

        def arm() -> None:
            for conn in self._conns.values():
                conn.large_base = conn.down.large_bytes
            self._transfer_cut = threshold

        self._call(arm)

    def transfer_cut_armed(self) -> bool:
        return self._transfer_cut is not None

    def disarm_transfer_cut(self) -> None:
        def disarm() -> None:
            self._transfer_cut = None

        self._call(disarm)

    def _call(self, fn: Callable[[], None]) -> None:
        assert self.loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(5)

    # ---- the pipes ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._next += 1
        conn = _Conn(self._next, writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), 5
            )
        except (OSError, TimeoutError):
            self.upstream_refused += 1
            writer.close()
            return
        conn.upstream = up_writer
        self._conns[conn.number] = conn
        try:
            await asyncio.gather(
                self._pipe(conn, reader, up_writer, conn.up, "node->hub"),
                self._pipe(conn, up_reader, writer, conn.down, "hub->node"),
            )
        finally:
            self._abort(conn)

    async def _pipe(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tracker: FrameTracker,
        direction: str,
    ) -> None:
        try:
            while not conn.closed:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                cut: int | None = None
                kind = ""
                if conn.cut_armed:
                    cut, kind = tracker.mid_frame_cut(data), "mid_frame"
                threshold = self._transfer_cut
                if cut is None and direction == "hub->node" and threshold is not None:
                    cut = tracker.large_cut(data, conn.large_base + threshold)
                    kind = "transfer"
                if cut is None:
                    self._forward(writer, data, direction)
                    tracker.advance(data)
                    await writer.drain()
                    continue
                self._forward(writer, data[:cut], direction)
                tracker.advance(data[:cut])
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.drain(), 2)
                if kind == "transfer":
                    self._transfer_cut = None
                record = Cut(
                    conn.number,
                    kind,
                    direction,
                    tracker.size,
                    tracker.size - tracker.remaining,
                )
                self.cuts.append(record)
                if self.on_cut is not None:
                    self.on_cut(record)
                self._abort(conn)
                return
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other too (a half-open proxy would hide the close).
            self._abort(conn)

    def _forward(self, writer: asyncio.StreamWriter, data: bytes, direction: str) -> None:
        if not data:
            return
        writer.write(data)
        if direction == "hub->node":
            self.bytes_down += len(data)
        else:
            self.bytes_up += len(data)

    def _abort(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.number, None)
        for writer in (conn.client, conn.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()
