"""The relay side (node.relay.RelayServer) over real loopback sockets, with the uplink
replaced by a list that records what would go to the hub.

A peer's frames travel in ``relayed`` envelopes, numbered per connection; fetches are
answered from the relay's caches, only for what the hub offered that peer; a peer that
breaks the rules is dropped and the hub is told; without an uplink nobody is served.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from issc.config import Address, RelayConfig
from issc.protocol import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    BundleChunk,
    Challenge,
    Connection,
    Error,
    ErrorCode,
    FetchBundle,
    FetchFile,
    Hello,
    Message,
    Offer,
    PeerClosed,
    PeerOpened,
    Proof,
    Relayed,
    Role,
    TaskOffer,
    Welcome,
    decode_message,
    encode_frame,
    encode_message,
)
from node.fetch import InputFetcher
from node.files import FileCache
from node.relay import RelayServer, Uplink

BUNDLE = b"bundle bytes " * 1000
DIGEST = hashlib.sha256(BUNDLE).hexdigest()


@dataclass
class Setup:
    server: RelayServer
    uplink: list[Message]
    address: tuple[str, int]


async def start_relay(tmp_path: Path, max_peers: int = 4) -> Setup:
    inputs = InputFetcher(FileCache(tmp_path / "files", 1 << 30, 1e6))
    config = RelayConfig(Address("127.0.0.1", 0), max_peers)
    server = RelayServer(config, "relay-node", tmp_path, inputs, 1 << 30, 1e6)
    sent: list[Message] = []

    async def drain() -> None:
        pass

    server.uplink_up(Uplink(sent.append, drain, MAX_FRAME_SIZE))
    for _ in range(500):
        if server.serving:
            break
        await asyncio.sleep(0.01)
    assert server.serving
    return Setup(server, sent, ("127.0.0.1", server.port))


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Setup]:
    setup = await start_relay(tmp_path)
    try:
        yield setup
    finally:
        await setup.server.close()


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.NODE)

    @classmethod
    async def connect(cls, setup: Setup) -> Peer:
        return cls(*await asyncio.open_connection(*setup.address))

    def send(self, message: Message) -> None:
        self.writer.write(self.conn.send(message))

    async def next(self) -> Message | None:
        """The relay's next message, or None when it hangs up."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.reader.read(1 << 20), 10))
                continue
            return event if isinstance(event, Message) else None


def hello() -> Hello:
    return Hello(
        protocol=PROTOCOL_VERSION,
        software="test/0",
        volunteer="vera",
        token=None,
        public_key="ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        projects=["gate"],
        slots=1,
        leases=[],
    )


def from_hub(setup: Setup, peer: int, message: Message) -> None:
    """The hub sends ``message`` to peer number ``peer`` through the relay."""
    frame = encode_frame(encode_message(message))
    setup.server.on_uplink_message(Relayed(peer=peer, frame=frame))


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def relayed_messages(setup: Setup, peer: int) -> list[Message]:
    out = []
    for message in setup.uplink:
        if isinstance(message, Relayed) and message.peer == peer:
            out.append(decode_message(message.frame[4:]))
    return out


async def open_peer(setup: Setup) -> Peer:
    """A peer through its handshake, the hub's side played through ``from_hub``."""
    peer = await Peer.connect(setup)
    peer.send(hello())
    await wait_for(lambda: relayed_messages(setup, 1))
    from_hub(setup, 1, Challenge(nonce=b"n" * 32, kex=b"k" * 32))
    assert isinstance(await peer.next(), Challenge)
    peer.send(Proof(signature=b"s" * 64, kex=b"x" * 32))
    await wait_for(lambda: len(relayed_messages(setup, 1)) == 2)
    welcome = Welcome(
        protocol=PROTOCOL_VERSION,
        node_id="peer-node",
        heartbeat_interval=5.0,
        heartbeat_misses=3,
        max_frame_size=MAX_FRAME_SIZE - 256,
        resumed=[],
    )
    from_hub(setup, 1, welcome)
    assert await peer.next() == welcome
    return peer


async def test_a_peers_frames_go_to_the_hub_in_numbered_envelopes(relay: Setup) -> None:
    peer = await Peer.connect(relay)
    peer.send(hello())
    await wait_for(lambda: len(relay.uplink) >= 2)
    opened, carried = relay.uplink[:2]
    assert isinstance(opened, PeerOpened) and opened.peer == 1
    assert opened.address.startswith("127.0.0.1:")
    assert isinstance(carried, Relayed) and carried.peer == 1
    assert decode_message(carried.frame[4:]) == hello()
    # A second connection gets the next number.
    second = await Peer.connect(relay)
    second.send(hello())
    await wait_for(lambda: any(isinstance(m, PeerOpened) and m.peer == 2 for m in relay.uplink))


async def test_an_offered_bundle_is_served_from_the_relay_cache(relay: Setup) -> None:
    cache = relay.server.bundles.cache
    part = cache.directory / f"{DIGEST}.part"
    part.write_bytes(BUNDLE)
    cache.finish(DIGEST)  # as if fetched from the hub earlier, for another peer
    peer = await open_peer(relay)
    offer = TaskOffer(
        lease=7, project="gate", task="t-1", version=1, digest=DIGEST, size=len(BUNDLE),
        input={}, files=[],
    )  # fmt: skip
    from_hub(relay, 1, Offer(tasks=[offer]))
    assert await peer.next() == Offer(tasks=[offer])

    peer.send(FetchBundle(digest=DIGEST, offset=0))
    chunk = await peer.next()
    assert chunk == BundleChunk(digest=DIGEST, offset=0, total=len(BUNDLE), data=BUNDLE)
    assert not any(isinstance(m, FetchBundle) for m in relay.uplink)  # the hub was not asked
    assert not any(isinstance(m, FetchBundle) for m in relayed_messages(relay, 1))


@pytest.mark.parametrize(
    "fetch",
    [FetchBundle(digest=DIGEST, offset=0), FetchFile(sha256=DIGEST, offset=0)],
    ids=["bundle", "file"],
)
async def test_a_fetch_of_what_was_not_offered_goes_to_the_hub_in_the_envelope(
    relay: Setup, fetch: FetchBundle | FetchFile
) -> None:
    # E.g. the rest of a download begun before the peer reconnected: the relay neither
    # fetches it into its own cache nor refuses it; the hub answers (or ends that peer).
    peer = await open_peer(relay)
    peer.send(fetch)
    await wait_for(lambda: fetch in relayed_messages(relay, 1))
    assert not any(isinstance(m, (FetchBundle, FetchFile)) for m in relay.uplink)
    assert not any(isinstance(m, PeerClosed) for m in relay.uplink)


async def test_a_peer_that_sends_garbage_is_dropped_and_the_hub_told(relay: Setup) -> None:
    peer = await Peer.connect(relay)
    peer.writer.write(b"\xff\xff\xff\xff")  # a frame header claiming 4 GiB
    error = await peer.next()
    assert isinstance(error, Error) and error.code == ErrorCode.PROTOCOL, error
    await wait_for(lambda: any(isinstance(m, PeerClosed) for m in relay.uplink))


async def test_the_hub_closing_a_peer_closes_its_connection(relay: Setup) -> None:
    peer = await Peer.connect(relay)
    peer.send(hello())
    await wait_for(lambda: relayed_messages(relay, 1))
    relay.server.on_uplink_message(PeerClosed(peer=1, reason="closed by the hub"))
    assert await peer.next() is None


async def test_without_an_uplink_nobody_is_served(relay: Setup) -> None:
    peer = await Peer.connect(relay)
    peer.send(hello())
    await wait_for(lambda: relayed_messages(relay, 1))
    relay.server.uplink_down()
    assert await peer.next() is None  # dropped
    with pytest.raises(OSError):  # and the relay no longer listens
        await Peer.connect(relay)


async def test_a_full_relay_stops_listening_until_a_peer_leaves(tmp_path: Path) -> None:
    setup = await start_relay(tmp_path, max_peers=1)
    try:
        first = await Peer.connect(setup)
        first.send(hello())
        await wait_for(lambda: relayed_messages(setup, 1))
        with pytest.raises(OSError):  # a probe or a new peer fails at once: try elsewhere
            await Peer.connect(setup)
        assert not setup.server.serving  # nor does discovery answer
        first.writer.close()
        await wait_for(lambda: setup.server.serving)
        second = await Peer.connect(setup)
        second.send(hello())
        await wait_for(lambda: relayed_messages(setup, 2))
    finally:
        await setup.server.close()
