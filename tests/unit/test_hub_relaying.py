"""The hub's side of relaying, over a real loopback connection: a relay's peers get
sessions of their own, with every check of a direct connection, and a relay that breaks
the relaying rules is refused without harm to anyone else.

The relay is played by hand (``RawNode`` from test_hub_handshake) so it can lie; the
hub side is the real ``NodeSession`` with the real enrollment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_hub_handshake import FakeRuntime, Hub, RawNode, hello_for, proof_for

from hub import relaying
from hub.session import NodeSession
from hub.store import Store
from hub.transport import StreamTransport
from issc.keys import public_key_string
from issc.nodeauth import Claim, Exchange, new_kex, node_id_for, transcript
from issc.protocol import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    RELAY_ENVELOPE_OVERHEAD,
    Challenge,
    Connection,
    Error,
    ErrorCode,
    Message,
    PeerClosed,
    PeerOpened,
    Proof,
    Relayed,
    Role,
    Welcome,
    decode_message,
    encode_frame,
    encode_message,
)

RELAY_KEY = Ed25519PrivateKey.from_private_bytes(b"\x21" * 32)
PEER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x22" * 32)
OTHER_PEER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x23" * 32)


def node_id(key: Ed25519PrivateKey) -> str:
    return node_id_for(public_key_string(key.public_key()))


class RecordingRuntime(FakeRuntime):
    """Keeps the sessions it admitted and the ones that left."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sessions: dict[str, NodeSession] = {}
        self.left: list[str] = []

    def attach(self, session: NodeSession, hello: object) -> None:
        super().attach(session, hello)  # type: ignore[arg-type]
        assert session.node_id is not None
        self.sessions[session.node_id] = session

    def detach(self, session: NodeSession) -> None:
        assert session.node_id is not None
        self.left.append(session.node_id)


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    store = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    runtime = RecordingRuntime(store, "open")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await NodeSession(runtime, StreamTransport(reader, writer)).serve()  # type: ignore[arg-type]

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield Hub(runtime, server.sockets[0].getsockname()[1])
    finally:
        server.close()
        runtime.astore.shutdown()


class Relay:
    """A welcomed relay connection speaking for peers by hand."""

    def __init__(self, raw: RawNode) -> None:
        self.raw = raw
        self.peer_conns: dict[int, Connection] = {}

    @classmethod
    async def join(cls, hub: Hub) -> Relay:
        raw = await RawNode.connect(hub)
        hello = hello_for(RELAY_KEY, "rita")
        challenge = await raw.challenge(hello)
        welcome = await raw.send(proof_for(RELAY_KEY, challenge, hello))
        assert isinstance(welcome, Welcome), welcome
        return cls(raw)

    def open_peer(self, number: int) -> None:
        self.peer_conns[number] = Connection(Role.NODE, MAX_FRAME_SIZE - RELAY_ENVELOPE_OVERHEAD)
        self.raw.writer.write(
            self.raw.conn.send(PeerOpened(peer=number, address=f"192.0.2.{number}:5000"))
        )

    def send_raw(self, number: int, frame: bytes) -> None:
        self.raw.writer.write(self.raw.conn.send(Relayed(peer=number, frame=frame)))

    def send_for(self, number: int, message: Message) -> None:
        self.send_raw(number, self.peer_conns[number].send(message))

    async def next(self) -> Message:
        """The hub's next message to the relay itself; a relayed frame is decoded."""
        while True:
            event = self.raw.conn.next_event()
            if event is NEED_DATA:
                data = await asyncio.wait_for(self.raw.reader.read(65536), 10)
                self.raw.conn.receive_data(data)
                continue
            assert isinstance(event, Message), f"the hub hung up on the relay: {event}"
            return event

    async def next_for(self, number: int) -> Message:
        """The next message the hub sends to peer ``number`` (through the relay)."""
        message = await self.next()
        assert isinstance(message, Relayed) and message.peer == number, message
        conn = self.peer_conns[number]
        conn.receive_data(message.frame)
        event = conn.next_event()
        assert isinstance(event, Message), event
        return event

    async def handshake_for(self, number: int, key: Ed25519PrivateKey, volunteer: str) -> Message:
        self.open_peer(number)
        hello = hello_for(key, volunteer)
        self.send_for(number, hello)
        challenge = await self.next_for(number)
        assert isinstance(challenge, Challenge), challenge
        self.send_for(number, proof_for(key, challenge, hello))
        return await self.next_for(number)


async def test_a_peer_gets_a_session_of_its_own_through_the_relay(hub: Hub) -> None:
    relay = await Relay.join(hub)
    welcome = await relay.handshake_for(1, PEER_KEY, "vera")

    assert isinstance(welcome, Welcome)
    assert welcome.node_id == node_id(PEER_KEY)  # from the peer's key, not the relay's
    assert welcome.max_frame_size == MAX_FRAME_SIZE - RELAY_ENVELOPE_OVERHEAD
    runtime = hub.runtime
    assert isinstance(runtime, RecordingRuntime)
    session = runtime.sessions[node_id(PEER_KEY)]
    assert session.via == node_id(RELAY_KEY)
    assert session.volunteer == "vera"
    assert session.address == "192.0.2.1:5000"


async def test_a_peer_must_prove_its_own_key(hub: Hub) -> None:
    relay = await Relay.join(hub)
    relay.open_peer(1)
    hello = hello_for(PEER_KEY, "vera")
    relay.send_for(1, hello)
    challenge = await relay.next_for(1)
    assert isinstance(challenge, Challenge)
    # The relay signs with its own key in the peer's name: refused, like a direct forgery.
    claim = Claim(hello.volunteer, hello.public_key, hello.token)
    node_kex = new_kex()[1]
    exchange = Exchange(challenge.nonce, challenge.kex, node_kex)
    relay.send_for(1, Proof(signature=RELAY_KEY.sign(transcript(exchange, claim)), kex=node_kex))
    refusal = await relay.next_for(1)
    assert isinstance(refusal, Error) and refusal.code == ErrorCode.AUTH, refusal
    assert await relay.next() == PeerClosed(peer=1, reason="closed by the hub")
    runtime = hub.runtime
    assert isinstance(runtime, RecordingRuntime)
    assert node_id(PEER_KEY) not in runtime.sessions


async def test_a_peer_that_breaks_the_protocol_is_dropped_and_the_relay_goes_on(hub: Hub) -> None:
    relay = await Relay.join(hub)
    relay.open_peer(1)
    relay.send_raw(1, encode_frame(b"\xc1"))  # 0xC1 is never valid msgpack
    error = await relay.next_for(1)
    assert isinstance(error, Error) and error.code == ErrorCode.PROTOCOL, error
    assert isinstance(await relay.next(), PeerClosed)
    # The relay's own connection and its other peers are untouched.
    welcome = await relay.handshake_for(2, OTHER_PEER_KEY, "walt")
    assert isinstance(welcome, Welcome)


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        ([PeerOpened(peer=3, address="a"), PeerOpened(peer=3, address="b")], "not above 3"),
        ([PeerOpened(peer=5, address="a"), PeerOpened(peer=4, address="b")], "not above 5"),
        ([Relayed(peer=9, frame=b"\x00\x00\x00\x01\x80")], "never opened"),
    ],
    ids=["number reused", "number goes down", "frame for a peer never opened"],
)
async def test_a_relay_that_breaks_the_relaying_rules_is_refused(
    hub: Hub, steps: list[Message], fragment: str
) -> None:
    relay = await Relay.join(hub)
    for step in steps:
        relay.raw.writer.write(relay.raw.conn.send(step))
    while True:
        message = await relay.next()
        if isinstance(message, Error):
            break
    assert message.code == ErrorCode.PROTOCOL and fragment in message.message, message


async def test_a_relay_carries_at_most_max_peers(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relaying, "MAX_PEERS", 2)
    relay = await Relay.join(hub)
    relay.open_peer(1)
    relay.open_peer(2)
    relay.open_peer(3)
    # The third peer is told why (limit: it tries elsewhere); the relay keeps going.
    refusal = await relay.next_for(3)
    assert isinstance(refusal, Error) and refusal.code == ErrorCode.LIMIT, refusal
    assert "2 peers" in refusal.message
    closed = await relay.next()
    assert isinstance(closed, PeerClosed) and closed.peer == 3, closed
    relay.open_peer(4)  # the relay's connection is still served
    assert isinstance(await relay.next_for(4), Error)


async def test_relays_nest_at_most_max_depth(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relaying, "MAX_RELAY_DEPTH", 1)
    relay = await Relay.join(hub)
    assert isinstance(await relay.handshake_for(1, PEER_KEY, "vera"), Welcome)
    # The peer relays in turn: its own peer would be one level deeper than allowed.
    relay.send_for(1, PeerOpened(peer=1, address="x"))
    nested = await relay.next_for(1)
    assert isinstance(nested, Relayed) and nested.peer == 1, nested
    refusal = decode_message(nested.frame[4:])
    assert isinstance(refusal, Error) and refusal.code == ErrorCode.LIMIT, refusal
    assert "nested at most 1 deep" in refusal.message
    assert isinstance(await relay.next_for(1), PeerClosed)


async def test_the_relays_peers_leave_with_it(hub: Hub) -> None:
    relay = await Relay.join(hub)
    assert isinstance(await relay.handshake_for(1, PEER_KEY, "vera"), Welcome)
    relay.raw.close()
    runtime = hub.runtime
    assert isinstance(runtime, RecordingRuntime)

    async def both_left() -> None:
        while not {node_id(PEER_KEY), node_id(RELAY_KEY)} <= set(runtime.left):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(both_left(), 5)


def test_envelope_overhead_covers_the_largest_envelope() -> None:
    # A frame of the largest size a peer may send still fits its relay's frames.
    frame = encode_frame(b"x" * (MAX_FRAME_SIZE - RELAY_ENVELOPE_OVERHEAD - 4))
    envelope = encode_message(Relayed(peer=2**63 - 1, frame=frame))
    assert len(envelope) <= MAX_FRAME_SIZE
    assert decode_message(envelope) == Relayed(peer=2**63 - 1, frame=frame)
