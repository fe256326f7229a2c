"""The bad-input suite, slow side: peers that hold a connection without using it.

A real hub (``hub.app.Hub``, in process, on 127.0.0.1) with a small heartbeat interval
(0.5 s: the idle timeout is 2 x 0.5 + 1 = 2 s) and a long lease window (heartbeat_misses
20), so that only the mechanism under test can end a connection. Each case asserts the
exact outcome (docs/protocol.md, "Limits"): one ``error`` frame with code ``limit`` where
one can get through, then the end of the connection; and a good node on the same hub
still completes a handshake and a heartbeat round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub import session as hub_session
from hub.app import Hub, serving
from hub.runtime import HubRuntime
from hub.session import MAX_WRITE_BUFFER, NodeSession
from issc.config import load_hub_config
from issc.keys import public_key_string
from issc.nodeauth import Claim, answer_challenge, node_id_for
from issc.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Challenge,
    Connection,
    Error,
    ErrorCode,
    FetchFile,
    FileChunk,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    Proof,
    Role,
    Welcome,
)

pytestmark = pytest.mark.timeout(60)

GOOD_KEY = Ed25519PrivateKey.from_private_bytes(b"\x61" * 32)
SLOW_KEY = Ed25519PrivateKey.from_private_bytes(b"\x62" * 32)
FAST = "heartbeat_interval: 0.5\nheartbeat_misses: 20\n"
IDLE = 2.0  # 2 x heartbeat_interval + 1 s
MiB = 1024 * 1024


# ---- a real hub --------------------------------------------------------------------------------


@dataclasses.dataclass
class SlowHub:
    hub: Hub
    port: int

    @property
    def runtime(self) -> HubRuntime:
        assert self.hub.runtime is not None
        return self.hub.runtime

    def session_of(self, key: Ed25519PrivateKey) -> NodeSession:
        return self.runtime.sessions[node_id_for(public_key_string(key.public_key()))]

    def add_file(self, tmp_path: Path, size: int) -> str:
        """An input file of ``size`` bytes in the hub's content store; its SHA-256."""
        source = tmp_path / "input.bin"
        source.write_bytes(bytes(range(256)) * (size // 256))
        return self.runtime.files.add_file(source)[0]


@contextlib.asynccontextmanager
async def slow_hub(tmp_path: Path, extra: str = "") -> AsyncIterator[SlowHub]:
    data = tmp_path / "h"
    config_file = tmp_path / "hub.yaml"
    config_file.write_text(
        f"listen: 127.0.0.1:0\ndata_dir: {data}\n{FAST}{extra}", encoding="utf-8"
    )
    async with serving(load_hub_config(config_file)) as hub:
        assert hub.address is not None
        yield SlowHub(hub, hub.address.port)


# ---- peers ---------------------------------------------------------------------------------------


def slow_hello(key: Ed25519PrivateKey) -> Hello:
    return Hello(
        protocol=PROTOCOL_VERSION,
        software="slow-peer/0",
        volunteer="sloth",
        token=None,
        public_key=public_key_string(key.public_key()),
        projects=[],
        slots=1,
        leases=[],
    )


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.NODE)

    @classmethod
    async def connect(cls, hub: SlowHub, receive_buffer: int | None = None) -> Peer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connecting: the window is agreed then
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", hub.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
        return cls(reader, writer)

    @classmethod
    async def join(
        cls, hub: SlowHub, key: Ed25519PrivateKey, receive_buffer: int | None = None
    ) -> Peer:
        peer = await cls.connect(hub, receive_buffer)
        hello = slow_hello(key)
        peer.send(hello)
        challenge = await peer.next()
        assert isinstance(challenge, Challenge), challenge
        claim = Claim(hello.volunteer, hello.public_key, hello.token)
        answer = answer_challenge(key, challenge.nonce, challenge.kex, claim)
        peer.send(Proof(signature=answer.signature, kex=answer.kex))
        welcome = await peer.next()
        assert isinstance(welcome, Welcome), welcome
        return peer

    def send(self, message: Message) -> None:
        self.writer.write(self.conn.send(message))

    async def next(self, timeout: float = 10) -> Message | None:
        """The hub's next message, or None once it hung up."""
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), timeout))
        return event if isinstance(event, Message) else None

    async def ended_with_limit(self, fragment: str, timeout: float) -> float:
        """Heartbeat acks aside, exactly one ``error`` ``limit`` naming ``fragment``, then
        the end of the connection; the seconds it took."""
        started = time.monotonic()
        while isinstance(message := await self.next(timeout), HeartbeatAck):
            pass
        assert isinstance(message, Error), message
        assert message.code == ErrorCode.LIMIT, message
        assert fragment in message.message, message.message
        assert await self.next(timeout) is None  # nothing after it: closed
        return time.monotonic() - started

    async def cut_off(self, timeout: float) -> None:
        """The hub ends the connection: reading (whatever was in flight) ends in EOF or a
        reset within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(self.reader.read(MiB), deadline - time.monotonic()):
                pass

    def close(self) -> None:
        self.writer.close()


async def slow_good_node_works(hub: SlowHub) -> None:
    """A good node joins and its heartbeat is answered: the hub serves everyone else."""
    good = await Peer.join(hub, GOOD_KEY)
    try:
        good.send(Heartbeat(running=[]))
        assert isinstance(await good.next(), HeartbeatAck)
    finally:
        good.close()


async def heartbeats(peer: Peer, every: float) -> None:
    """What a live node does without a lease: a heartbeat every ``every`` seconds."""
    with contextlib.suppress(ConnectionError, RuntimeError):
        while not peer.writer.is_closing():
            peer.send(Heartbeat(running=[]))
            await asyncio.sleep(every)


async def dribble(peer: Peer, data: bytes, every: float) -> None:
    """One byte every ``every`` seconds."""
    with contextlib.suppress(ConnectionError, RuntimeError):
        for i in range(len(data)):
            peer.writer.write(data[i : i + 1])
            await asyncio.sleep(every)


# ---- idle and slow loris ---------------------------------------------------------------------


async def test_an_idle_connection_gets_limit_and_is_closed(tmp_path: Path) -> None:
    async with slow_hub(tmp_path) as hub:
        idle = await Peer.join(hub, SLOW_KEY)
        good = await Peer.join(hub, GOOD_KEY)
        beating = asyncio.create_task(heartbeats(good, 0.4))
        waited = await idle.ended_with_limit("no complete message in 2 s (idle timeout", 8)
        assert IDLE - 0.3 <= waited <= IDLE + 3, waited
        # The node that sends its heartbeats (and holds no lease) was not touched.
        assert not good.writer.is_closing() and not hub.session_of(GOOD_KEY).closed
        beating.cancel()
        good.close()
        await slow_good_node_works(hub)


async def test_a_connection_that_never_says_hello_gets_the_idle_limit(tmp_path: Path) -> None:
    async with slow_hub(tmp_path) as hub:
        silent = await Peer.connect(hub)
        waited = await silent.ended_with_limit("idle timeout", 8)
        assert waited <= IDLE + 3, waited  # long before the 10 s handshake deadline
        await slow_good_node_works(hub)


async def test_a_slow_loris_after_welcome_is_cut_off_mid_frame(tmp_path: Path) -> None:
    async with slow_hub(tmp_path) as hub:
        loris = await Peer.join(hub, SLOW_KEY)
        frame = loris.conn.send(Heartbeat(running=list(range(20))))  # 20+ bytes: 6+ s
        assert len(frame) * 0.3 > IDLE + 3
        dribbling = asyncio.create_task(dribble(loris, frame, 0.3))
        waited = await loris.ended_with_limit("idle timeout", 8)
        # Bytes kept coming; only a whole frame would have reset the clock.
        assert IDLE - 0.3 <= waited <= IDLE + 3, waited
        dribbling.cancel()
        await slow_good_node_works(hub)


async def test_a_slow_loris_hello_is_cut_off_before_the_handshake_deadline(
    tmp_path: Path,
) -> None:
    async with slow_hub(tmp_path) as hub:
        loris = await Peer.connect(hub)
        frame = loris.conn.send(slow_hello(SLOW_KEY))
        dribbling = asyncio.create_task(dribble(loris, frame, 0.3))
        waited = await loris.ended_with_limit("idle timeout", 8)
        assert waited <= IDLE + 3, waited
        dribbling.cancel()
        await slow_good_node_works(hub)


# ---- peers that do not read ------------------------------------------------------------------


async def watch_backlog(session: NodeSession, until: float) -> tuple[int, float | None]:
    """The largest write backlog of ``session`` seen, and when it was closed (None if it
    was not by ``until``, a monotonic time)."""
    largest = 0
    while time.monotonic() < until:
        largest = max(largest, session.transport.backlog())
        if session.closed:
            return largest, time.monotonic()
        await asyncio.sleep(0.01)
    return largest, None


async def test_a_peer_that_stops_reading_is_cut_off_after_the_write_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_session, "WRITE_HIGH_WATER", 1 * MiB)
    async with slow_hub(tmp_path, "limits: {write_timeout: 1}\n") as hub:
        digest = hub.add_file(tmp_path, 1 * MiB)
        # A small receive window: the kernels hold little, the hub's buffer the rest.
        sloth = await Peer.join(hub, SLOW_KEY, receive_buffer=64 * 1024)
        session = hub.session_of(SLOW_KEY)
        for _ in range(8):  # 8 MiB asked for, never read
            sloth.send(FetchFile(sha256=digest, offset=0))
        beating = asyncio.create_task(heartbeats(sloth, 0.3))  # it is not idle
        over_since = None
        deadline = time.monotonic() + 5
        while over_since is None:
            assert time.monotonic() < deadline, session.transport.backlog()
            if session.transport.backlog() > 1 * MiB:
                over_since = time.monotonic()
            await asyncio.sleep(0.01)
        largest, closed_at = await watch_backlog(session, over_since + 6)
        assert closed_at is not None, "a peer that does not read was kept"
        assert 0.8 <= closed_at - over_since <= 4, closed_at - over_since
        assert largest < MAX_WRITE_BUFFER  # the write timeout did it, not the hard cap
        assert session.transport.backlog() == 0  # dropped, not kept to flush
        beating.cancel()
        await sloth.cut_off(5)
        await slow_good_node_works(hub)


async def test_a_peer_that_asks_for_much_and_never_reads_is_cut_off_at_the_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with slow_hub(tmp_path, "limits: {write_timeout: 30}\n") as hub:
        digest = hub.add_file(tmp_path, 1 * MiB)
        sloth = await Peer.join(hub, SLOW_KEY, receive_buffer=64 * 1024)
        session = hub.session_of(SLOW_KEY)
        with caplog.at_level(logging.WARNING, logger="hub.session"):
            for _ in range(48):  # 48 MiB asked for at once, never read
                sloth.send(FetchFile(sha256=digest, offset=0))
            largest, closed_at = await watch_backlog(session, time.monotonic() + 5)
        assert closed_at is not None, "a peer that does not read was kept"
        # The most the hub ever held for it: the cap and one more chunk.
        held = re.findall(r"\((\d+) bytes unsent, over (\d+)\)", caplog.text)
        assert len(held) == 1, caplog.text
        assert int(held[0][1]) == MAX_WRITE_BUFFER
        assert MAX_WRITE_BUFFER < int(held[0][0]) <= MAX_WRITE_BUFFER + MiB + 1024
        assert largest <= MAX_WRITE_BUFFER + MiB + 1024
        assert session.transport.backlog() == 0  # dropped at once
        await sloth.cut_off(5)
        await slow_good_node_works(hub)


async def test_an_honest_download_is_not_taken_for_a_slow_peer(tmp_path: Path) -> None:
    """Stop-and-wait, as nodes fetch: one chunk asked for at a time, read slowly."""
    async with slow_hub(tmp_path, "limits: {write_timeout: 0.5}\n") as hub:
        digest = hub.add_file(tmp_path, 4 * MiB)
        node = await Peer.join(hub, SLOW_KEY, receive_buffer=64 * 1024)
        offset = 0
        while offset < 4 * MiB:
            node.send(FetchFile(sha256=digest, offset=offset))
            await asyncio.sleep(0.6)  # slower than the write timeout, for each chunk
            chunk = await node.next()
            assert isinstance(chunk, FileChunk), chunk
            offset += len(chunk.data)
        session = hub.session_of(SLOW_KEY)
        assert not session.closed
        node.send(Heartbeat(running=[]))
        assert isinstance(await node.next(), HeartbeatAck)
        node.close()
