"""The hub's bounds on connections and messages (docs/protocol.md, "Limits"): the
``limits:`` config key, the caps on connections in total and per address, the message
rate (also through a relay), and the fix for a ``cancel`` sent before ``welcome``.

The caps run against a real hub (``hub.app.Hub``, in process, on 127.0.0.1) and raw
sockets; the relay cases against the real ``NodeSession`` with the handshake tests'
runtime (``test_hub_handshake.FakeRuntime``). Slow and silent peers are in
``tests/adversarial/test_slow_peers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_hub_handshake import Hub as FakeHub
from test_hub_handshake import hello_for, proof_for
from test_hub_relaying import OTHER_PEER_KEY, PEER_KEY, RecordingRuntime, Relay

from hub import events as ev
from hub.app import Hub, serving
from hub.blobs import ContentStore
from hub.inbox import Inbox
from hub.outbox import Outbox
from hub.runtime import HubRuntime
from hub.scheduler import Scheduler, Settings
from hub.session import SPILL_FACTOR, NodeSession, TokenBucket
from hub.store import Store
from hub.transport import ConnectionGate, StreamTransport
from issc.config import HubLimits, load_hub_config
from issc.errors import ConfigError
from issc.protocol import (
    NEED_DATA,
    Cancel,
    Challenge,
    Connection,
    Error,
    ErrorCode,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    PeerClosed,
    Proof,
    Relayed,
    Role,
    Welcome,
)

pytestmark = pytest.mark.timeout(60)

GOOD_KEY = Ed25519PrivateKey.from_private_bytes(b"\x51" * 32)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x52" * 32)
THIRD_KEY = Ed25519PrivateKey.from_private_bytes(b"\x53" * 32)
LIMIT = ErrorCode.LIMIT


# ---- the config key ---------------------------------------------------------------------------


def _hub_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_limits_default_when_absent(tmp_path: Path) -> None:
    config = load_hub_config(_hub_yaml(tmp_path, "listen: 127.0.0.1:0\n"))
    assert config.limits == HubLimits()
    assert config.limits.max_connections == 10_000
    assert config.limits.max_connections_per_address == 256
    assert config.limits.messages_per_second == 1000.0
    assert config.limits.message_burst == 2000
    assert config.limits.write_timeout == 10.0
    assert load_hub_config(None).limits == HubLimits()


def test_limits_are_read(tmp_path: Path) -> None:
    text = (
        "limits: {max_connections: 5, max_connections_per_address: 2, messages_per_second: 2.5,"
        " message_burst: 7, write_timeout: 0.5}\n"
    )
    config = load_hub_config(_hub_yaml(tmp_path, text))
    assert config.limits == HubLimits(5, 2, 2.5, 7, 0.5)
    # Keys left out keep their defaults.
    partial = load_hub_config(_hub_yaml(tmp_path, "limits: {max_connections: 3}\n"))
    assert partial.limits == dataclasses.replace(HubLimits(), max_connections=3)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("limits: {max_conections: 5}\n", "limits.max_conections: unknown key"),
        ("limits: {max_connections: many}\n", "limits.max_connections: must be a positive"),
        ("limits: {max_connections: 0}\n", "limits.max_connections: must be a positive"),
        ("limits: {max_connections_per_address: 1.5}\n", "limits.max_connections_per_address"),
        ("limits: {messages_per_second: -1}\n", "limits.messages_per_second: must be a positive"),
        ("limits: {message_burst: true}\n", "limits.message_burst: must be a positive integer"),
        ("limits: {write_timeout: .nan}\n", "limits.write_timeout: must be a positive number"),
        ("limits: 100\n", "limits: must be a mapping"),
    ],
)
def test_bad_limits_are_config_errors_naming_file_and_key(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = _hub_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)
    assert str(caught.value).startswith(f"{path}: "), caught.value
    assert fragment in str(caught.value), caught.value


# ---- building blocks --------------------------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(3, now=0.0)
    assert [bucket.take(0.0, 2.0, 3) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5, 2.0, 3)  # half a second at 2/s: one more
    assert not bucket.take(0.5, 2.0, 3)
    assert [bucket.take(100.0, 2.0, 3) for _ in range(4)] == [True, True, True, False]


def test_connection_gate_counts_in_total_and_per_address() -> None:
    gate = ConnectionGate(max_total=3, max_per_address=2)
    assert gate.admit("10.0.0.1") is None
    assert gate.admit("10.0.0.1") is None
    assert "limits.max_connections_per_address" in (gate.admit("10.0.0.1") or "")
    assert gate.admit("10.0.0.2") is None
    assert "limits.max_connections" in (gate.admit("10.0.0.3") or "")
    gate.release("10.0.0.1")
    assert gate.admit("10.0.0.3") is None
    assert (gate.total, dict(gate.per_address)) == (
        3,
        {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1},
    )


# ---- a real hub and raw connections -----------------------------------------------------------


@dataclasses.dataclass
class RealHub:
    hub: Hub
    port: int


@contextlib.asynccontextmanager
async def real_hub(tmp_path: Path, extra: str) -> AsyncIterator[RealHub]:
    data = tmp_path / "h"
    config = load_hub_config(_hub_yaml(tmp_path, f"listen: 127.0.0.1:0\ndata_dir: {data}\n{extra}"))
    async with serving(config) as hub:
        assert hub.address is not None
        yield RealHub(hub, hub.address.port)


class Conn:
    """A raw connection to the hub, from a chosen local address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.NODE)

    @classmethod
    async def open(cls, hub: RealHub, source: str = "127.0.0.1") -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", hub.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        self.writer.write(self.conn.send(message))

    async def next(self, timeout: float = 10) -> Message | None:
        """The hub's next message, or None once it hung up."""
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), timeout))
        return event if isinstance(event, Message) else None

    async def handshake(self, key: Ed25519PrivateKey) -> None:
        hello = hello_for(key)
        self.send(hello)
        challenge = await self.next()
        assert isinstance(challenge, Challenge), challenge
        self.send(proof_for(key, challenge, hello))
        welcome = await self.next()
        assert isinstance(welcome, Welcome), welcome

    async def heartbeat_round_trip(self) -> None:
        self.send(Heartbeat(running=[]))
        assert isinstance(await self.next(), HeartbeatAck)

    async def refused(self, fragment: str) -> None:
        """Exactly one error frame, code ``limit``, then the end of the connection."""
        error = await self.next()
        assert isinstance(error, Error), error
        assert (error.code, fragment in error.message) == (LIMIT, True), error
        assert await self.next() is None  # closed, nothing after the error

    def close(self) -> None:
        self.writer.close()


async def a_good_node_works(hub: RealHub, source: str = "127.0.0.1") -> None:
    """A node from ``source`` joins (hello, challenge, proof, welcome) and its heartbeat
    is answered."""
    good = await Conn.open(hub, source)
    try:
        await good.handshake(GOOD_KEY)
        await good.heartbeat_round_trip()
    finally:
        good.close()


async def until_admitted(hub: RealHub, source: str = "127.0.0.1") -> None:
    """A good node from ``source`` gets in once the hub has noticed a connection end."""
    deadline = time.monotonic() + 5
    while True:
        try:
            await a_good_node_works(hub, source)
            return
        except AssertionError:
            assert time.monotonic() < deadline, "no connection was admitted again"
            await asyncio.sleep(0.05)


async def test_connections_over_the_total_cap_get_limit_and_are_closed(tmp_path: Path) -> None:
    async with real_hub(tmp_path, "limits: {max_connections: 3}\n") as hub:
        held = [await Conn.open(hub, f"127.0.0.{i}") for i in (1, 2, 3)]
        await asyncio.sleep(0.1)  # the hub has counted them
        over = await Conn.open(hub, "127.0.0.4")
        await over.refused("the hub serves 3 connections already (limits.max_connections)")
        # The admitted ones are served as ever...
        await held[0].handshake(OTHER_KEY)
        await held[0].heartbeat_round_trip()
        # ...and a connection that ends makes room for another.
        held[1].close()
        await until_admitted(hub, "127.0.0.4")
        for conn in held:
            conn.close()


async def test_the_cap_per_address_counts_each_address_alone(tmp_path: Path) -> None:
    extra = "limits: {max_connections: 100, max_connections_per_address: 2}\n"
    async with real_hub(tmp_path, extra) as hub:
        first = [await Conn.open(hub, "127.0.0.1") for _ in range(2)]
        await asyncio.sleep(0.1)
        third = await Conn.open(hub, "127.0.0.1")
        await third.refused("2 connections from 127.0.0.1 already")
        # Another address has its own count: two get in, a third does not.
        other = [await Conn.open(hub, "127.0.0.2") for _ in range(2)]
        await other[0].handshake(OTHER_KEY)
        await other[0].heartbeat_round_trip()
        await other[1].handshake(THIRD_KEY)
        await other[1].heartbeat_round_trip()
        await (await Conn.open(hub, "127.0.0.2")).refused("2 connections from 127.0.0.2 already")
        # 127.0.0.1 gets a place back when one of its connections ends.
        first[0].close()
        await until_admitted(hub, "127.0.0.1")
        for conn in [*first, *other]:
            conn.close()


async def test_a_message_flood_gets_limit_naming_the_rate_and_others_go_on(
    tmp_path: Path,
) -> None:
    extra = "limits: {messages_per_second: 20, message_burst: 10}\n"
    async with real_hub(tmp_path, extra) as hub:
        flooder = await Conn.open(hub)
        await flooder.handshake(OTHER_KEY)  # hello and proof: 2 of the 10
        flooder.writer.write(b"".join(flooder.conn.send(Heartbeat(running=[])) for _ in range(50)))
        acks = 0
        while isinstance(message := await flooder.next(), HeartbeatAck):
            acks += 1
        assert isinstance(message, Error), message
        assert message.code == LIMIT
        assert "more than 20 messages a second, 10 at once" in message.message
        assert await flooder.next() is None
        # The burst less the handshake, and what the rate refilled meanwhile; no more.
        assert 8 <= acks <= 12, acks
        # A node within the rate is not touched: 12 heartbeats at 10 a second.
        good = await Conn.open(hub)
        await good.handshake(GOOD_KEY)
        for _ in range(12):
            await good.heartbeat_round_trip()
            await asyncio.sleep(0.1)
        good.close()


# ---- the rate through a relay -----------------------------------------------------------------


class LimitedRuntime(RecordingRuntime):
    """The relaying tests' runtime, taking heartbeats (and forgetting them)."""

    def submit(self, event: object) -> None:
        pass


@contextlib.asynccontextmanager
async def limited_fake_hub(tmp_path: Path, limits: HubLimits) -> AsyncIterator[FakeHub]:
    store = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    runtime = LimitedRuntime(store, "open")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = StreamTransport(reader, writer)
        await NodeSession(runtime, transport, limits=limits).serve()  # type: ignore[arg-type]

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield FakeHub(runtime, server.sockets[0].getsockname()[1])
    finally:
        server.close()
        runtime.astore.shutdown()


async def _acks_for(relay: Relay, peers: dict[int, int]) -> None:
    """Expect ``peers[n]`` relayed heartbeat acks for each peer n, in any order."""
    left = dict(peers)
    while any(left.values()):
        message = await relay.next()
        assert isinstance(message, Relayed), message
        conn = relay.peer_conns[message.peer]
        conn.receive_data(message.frame)
        assert isinstance(conn.next_event(), HeartbeatAck)
        left[message.peer] -= 1
        assert left[message.peer] >= 0, message


async def test_a_relays_peers_are_each_charged_their_own_messages(tmp_path: Path) -> None:
    limits = HubLimits(messages_per_second=10, message_burst=20)
    async with limited_fake_hub(tmp_path, limits) as hub:
        relay = await Relay.join(hub)  # relay: hello, proof
        assert isinstance(await relay.handshake_for(1, PEER_KEY, "vera"), Welcome)
        assert isinstance(await relay.handshake_for(2, OTHER_PEER_KEY, "walt"), Welcome)
        # 34 envelopes at once, more than the relay's own burst of 20: each peer's 17 are
        # its own (17 + hello + proof = 19 of its 20), so nobody is over.
        for _ in range(17):
            relay.send_for(1, Heartbeat(running=[]))
            relay.send_for(2, Heartbeat(running=[]))
        await _acks_for(relay, {1: 17, 2: 17})
        relay.raw.writer.write(relay.raw.conn.send(Heartbeat(running=[])))
        assert isinstance(await relay.next(), HeartbeatAck)
        # A peer over its own rate is ended alone: relayed error, then peer_closed. The
        # rest of its flood, still on its way, does not cost the relay its connection.
        for _ in range(200):
            relay.send_for(1, Heartbeat(running=[]))
        acks = 0
        while isinstance(message := await relay.next(), Relayed):
            conn = relay.peer_conns[message.peer]
            conn.receive_data(message.frame)
            event = conn.next_event()
            if isinstance(event, HeartbeatAck):
                acks += 1
                continue
            assert isinstance(event, Error), event
            assert event.code == LIMIT and "10 messages a second" in event.message, event
        assert isinstance(message, PeerClosed) and message.peer == 1, message
        assert acks <= 3, acks  # what was left of its 20
        # The relay and its other peer go on.
        relay.raw.writer.write(relay.raw.conn.send(Heartbeat(running=[])))
        assert isinstance(await relay.next(), HeartbeatAck)
        relay.send_for(2, Heartbeat(running=[]))
        await _acks_for(relay, {2: 1})
        relay.raw.close()


async def test_envelopes_no_session_takes_slow_the_relay_down(tmp_path: Path) -> None:
    limits = HubLimits(messages_per_second=10, message_burst=20)
    spill_rate, spill_burst = 10 * SPILL_FACTOR, 20 * SPILL_FACTOR
    async with limited_fake_hub(tmp_path, limits) as hub:
        relay = await Relay.join(hub)
        assert isinstance(await relay.handshake_for(1, PEER_KEY, "vera"), Welcome)
        relay.raw.writer.write(relay.raw.conn.send(PeerClosed(peer=1, reason="gone")))
        await asyncio.sleep(0.2)  # the peer's session has ended
        frame = Connection(Role.NODE).send(hello_for(PEER_KEY))
        extra = spill_rate  # one second's worth beyond the burst
        started = time.monotonic()
        for _ in range(spill_burst + extra):
            relay.send_raw(1, frame)
        relay.raw.writer.write(relay.raw.conn.send(Heartbeat(running=[])))
        # Not closed (nothing of it reached a session), but read no faster than the rate.
        assert isinstance(await relay.next(), HeartbeatAck)
        assert time.monotonic() - started >= 0.8 * extra / spill_rate
        relay.raw.close()


# ---- cancel before welcome ---------------------------------------------------------------------


class RecordingTransport:
    address = "192.0.2.9:4000"

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    async def read(self) -> bytes:
        await asyncio.Event().wait()
        return b""

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def backlog(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


async def test_a_cancel_is_never_sent_before_welcome(tmp_path: Path) -> None:
    """docs/reliability.md, finding 1: a batch that ends a lease of a reconnecting node
    (a late result supersedes it) and then handles its NodeJoined emits SendCancel before
    SendWelcome. The session must not be dropped for it; the welcome alone tells the node
    (its ``resumed`` leaves the lease out) and later messages flow as usual."""
    store = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    data = tmp_path / "hub"
    files = ContentStore(data / "files")
    config = SimpleNamespace(
        data_dir=data, heartbeat_interval=5.0, heartbeat_misses=3, registration="open"
    )
    scheduler = Scheduler(Settings(3, 30.0, 90.0), store.load_snapshot(), now=time.time())
    runtime = HubRuntime(
        config,  # type: ignore[arg-type]
        store,
        scheduler,
        Inbox(data / "inbox", store, files),
        Outbox(data / "outbox", store, files),
        files,
    )
    transport = RecordingTransport()
    session = NodeSession(runtime, transport)
    # The session as HubRuntime.attach leaves it: proof verified, in `sessions`, no welcome.
    node = Connection(Role.NODE)
    session.conn.receive_data(node.send(hello_for(GOOD_KEY)))
    assert isinstance(session.conn.next_event(), Hello)
    node.receive_data(session.conn.send(Challenge(nonce=b"\x00" * 32, kex=b"\x00" * 32)))
    assert isinstance(node.next_event(), Challenge)
    session.conn.receive_data(node.send(Proof(signature=b"\x00" * 64, kex=b"\x00" * 32)))
    assert isinstance(session.conn.next_event(), Proof)
    session.node_id = "n-00000001"
    runtime.sessions[session.node_id] = session
    try:
        await runtime._carry_out(
            [
                ev.SendCancel(session.node_id, (7,), "task completed elsewhere"),
                ev.SendWelcome(session.node_id, ()),
                ev.SendCancel(session.node_id, (8,), "task completed elsewhere"),
            ]
        )
        assert not session.closed and not transport.closed
        node.receive_data(b"".join(transport.written))
        welcome = node.next_event()
        assert isinstance(welcome, Welcome) and welcome.resumed == [], welcome
        cancel = node.next_event()  # after the welcome, cancels go out as ever
        assert isinstance(cancel, Cancel) and cancel.leases == [8], cancel
        assert node.next_event() is NEED_DATA
    finally:
        runtime.astore.shutdown()
