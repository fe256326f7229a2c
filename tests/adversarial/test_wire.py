"""The bad-input suite, wire side: a real hub (``hub.app.Hub``, in process, listening on
127.0.0.1) and a bad peer on a raw socket.

Every case asserts the exact outcome (docs/security.md, "The bad-input suite"): the hub
answers one ``error`` frame with the expected code and a message naming the cause, then
closes the connection; or, for the lease cases, what docs/protocol.md section 7 rule 2
says (a result is acknowledged ``accepted: false``, a heartbeat only proves the sender
alive) and the other node's lease is untouched. After every case a good node on the same
hub still completes a task (``adv_serves_a_task``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.app import Hub, serving
from hub.store import Store, TaskEntry
from issc.config import load_hub_config
from issc.keys import public_key_string
from issc.manifest import Limits, Manifest
from issc.nodeauth import Claim, answer_challenge, node_id_for
from issc.protocol import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    Accept,
    Challenge,
    Connection,
    Decline,
    Error,
    ErrorCode,
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

pytestmark = pytest.mark.timeout(30)

M = TypeVar("M", bound=Message)
HOLDER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x41" * 32)
INTRUDER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x42" * 32)
GOOD_KEY = Ed25519PrivateKey.from_private_bytes(b"\x43" * 32)
OWNER = "ed25519:" + "A" * 43 + "="
TASKS = 6
PROTOCOL = ErrorCode.PROTOCOL.value


# ---- a real hub with a project and tasks ----------------------------------------------------


@dataclasses.dataclass
class WireHub:
    hub: Hub
    port: int

    def lease_holder(self, lease: int) -> tuple[str, bool] | None:
        """(node id, accepted) of a live lease, from the hub's scheduler; None if not live."""
        assert self.hub.runtime is not None
        record = self.hub.runtime.scheduler.leases.get(lease)
        return None if record is None else (record.node_id, record.accepted)

    async def accepted(self, lease: int, node_id: str) -> None:
        """Wait until the hub has taken ``node_id``'s accept of ``lease``."""
        deadline = time.monotonic() + 10
        while self.lease_holder(lease) != (node_id, True):
            assert time.monotonic() < deadline, self.lease_holder(lease)
            await asyncio.sleep(0.01)


def _prepare_store(url: str) -> None:
    store = Store(url)
    store.create_schema()
    manifest = Manifest(
        name="primes",
        version=1,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=1,
        files=(),
        owner_key=OWNER,
    )
    content = b"bundle v1"
    now = time.time()
    store.register_bundle(manifest, hashlib.sha256(content).hexdigest(), content, now - 60)
    entries = [TaskEntry(f"t-{i}", f'{{"n": {i}}}', i + 1) for i in range(TASKS)]
    store.add_tasks("primes", entries, "f" * 64, "tasks.jsonl", now)
    store.engine.dispose()


@pytest.fixture
async def adv_hub(tmp_path: Path) -> AsyncIterator[WireHub]:
    data = tmp_path / "h"
    config_file = tmp_path / "hub.yaml"
    config_file.write_text(f"listen: 127.0.0.1:0\ndata_dir: {data}\n", encoding="utf-8")
    config = load_hub_config(config_file)
    data.mkdir(mode=0o755)
    _prepare_store(config.database_url)
    async with serving(config) as hub:
        assert hub.address is not None
        yield WireHub(hub, hub.address.port)


# ---- nodes -----------------------------------------------------------------------------------


class Peer:
    """A connection to the hub; speaks the protocol through ``conn`` or writes raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.NODE)
        self.key: Ed25519PrivateKey | None = None
        self.result_key = b""  # the connection's, from the handshake

    @classmethod
    async def connect(cls, hub: WireHub) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        return cls(reader, writer)

    @classmethod
    async def join(cls, hub: WireHub, key: Ed25519PrivateKey) -> Peer:
        """A node that completed the handshake (welcome received)."""
        peer = await cls.connect(hub)
        peer.key = key
        hello = hello_for(key)
        peer.send(hello)
        challenge = await peer.expect(Challenge)
        claim = Claim(hello.volunteer, hello.public_key, hello.token)
        answer = answer_challenge(key, challenge.nonce, challenge.kex, claim)
        peer.result_key = answer.result_key
        peer.send(Proof(signature=answer.signature, kex=answer.kex))
        await peer.expect(Welcome)
        return peer

    @property
    def node_id(self) -> str:
        assert self.key is not None
        return node_id_for(public_key_string(self.key.public_key()))

    def send(self, message: Message) -> None:
        self.writer.write(self.conn.send(message))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def next(self, timeout: float = 10) -> Message | None:
        """The hub's next message (heartbeat acks skipped), or None once it hung up."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                self.conn.receive_data(data)
                continue
            if not isinstance(event, Message):
                return None
            if not isinstance(event, HeartbeatAck):
                return event

    async def expect(self, kind: type[M]) -> M:
        message = await self.next()
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message}"
        return message

    async def take_offer(self) -> TaskOffer:
        self.send(Ready(free=1))
        offer = await self.expect(Offer)
        assert len(offer.tasks) == 1
        self.send(Accept(leases=[offer.tasks[0].lease]))
        return offer.tasks[0]

    async def next_event(self) -> Message | None:
        """The hub's very next message (acks included), or None once it hung up."""
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), 10))
        return event if isinstance(event, Message) else None

    async def still_open(self) -> None:
        """The hub answers a heartbeat with heartbeat_ack, and nothing came before it."""
        self.send(Heartbeat(running=[]))
        event = await self.next_event()
        assert isinstance(event, HeartbeatAck), event

    def close(self) -> None:
        self.writer.close()


def hello_for(key: Ed25519PrivateKey) -> Hello:
    return Hello(
        protocol=PROTOCOL_VERSION,
        software="adversarial/0",
        volunteer="alice",
        token=None,
        public_key=public_key_string(key.public_key()),
        projects=["primes"],
        slots=1,
        leases=[],
    )


def result_for(offer: TaskOffer, peer: Peer, answer: Any = 42) -> Result:
    """An honest result of ``peer`` for ``offer``, authenticated with its connection's key."""
    given = given_of(offer.lease, offer.project, offer.task, offer.digest, offer.input, offer.files)
    returned = returned_of(True, answer, None, 0.1, 0.2, [])
    digest = transcript_digest(peer.node_id, given, returned)
    return Result(
        lease=offer.lease,
        project=offer.project,
        task=offer.task,
        ok=True,
        result=answer,
        error=None,
        cpu_seconds=0.1,
        wall_seconds=0.2,
        files=[],
        mac=result_mac(peer.result_key, digest),
    )


async def adv_serves_a_task(hub: WireHub) -> None:
    """Other work goes on: a good node joins, takes a task and its result is accepted."""
    good = await Peer.join(hub, GOOD_KEY)
    try:
        offer = await good.take_offer()
        good.send(result_for(offer, good))
        ack = await good.expect(ResultAck)
        assert (ack.lease, ack.accepted, ack.reason) == (offer.lease, True, None)
    finally:
        good.close()


async def refused(peer: Peer, code: str, message: str) -> None:
    """The hub sent exactly one error frame, ``code`` and ``message``, then hung up."""
    error = await peer.next()
    assert isinstance(error, Error), error
    assert (error.code, error.message) == (code, message)
    assert await peer.next() is None  # the connection closed
    peer.close()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def wire_hello(**changes: Any) -> dict[str, Any]:
    """A hello as a msgpack map, with ``changes`` applied."""
    hello = hello_for(GOOD_KEY)
    body = {"t": "hello", **{f.name: getattr(hello, f.name) for f in dataclasses.fields(hello)}}
    body.update(changes)
    return body


# ---- framing and msgpack, the first bytes of a connection ------------------------------------

TWO_GIB = 2**31

# (case id, bytes sent on a fresh connection, exact message of the hub's protocol error)
BAD_FIRST_FRAMES = [
    pytest.param(
        struct.pack(">I", TWO_GIB),
        f"peer announced a frame of {TWO_GIB} bytes; the maximum frame size is "
        f"{MAX_FRAME_SIZE} bytes",
        id="frame-header-claims-2GiB",
    ),
    pytest.param(
        frame(b"\xdb" + struct.pack(">I", TWO_GIB) + b"x" * 16),
        "malformed msgpack body: ValueError: Unpack failed: incomplete input",
        id="msgpack-str-claims-2GiB",
    ),
    pytest.param(
        frame(packed(wire_hello())[:20]),
        "malformed msgpack body: ValueError: Unpack failed: incomplete input",
        id="msgpack-truncated-inside-a-complete-frame",
    ),
    pytest.param(
        frame(b"\xc1"),
        "malformed msgpack body: FormatError: reserved byte 0xc1 (never used in msgpack)",
        id="byte-0xC1",
    ),
    pytest.param(
        frame(packed(wire_hello()) + b"\x00"),
        "malformed msgpack body: ExtraData: unpack(b) received extra data.",
        id="trailing-bytes-after-the-object",
    ),
    pytest.param(
        frame(b"\xdf\xff\xff\xff\xff" + packed("t") + packed("hello")),
        "malformed msgpack body: ValueError: 4294967295 exceeds max_map_len(6)",
        id="map-claims-2**32-1-entries",
    ),
    pytest.param(
        frame(packed(wire_hello(software="X")).replace(b"\xa1X", b"\xa1\xff")),
        "malformed msgpack body: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff "
        "in position 0: invalid start byte",
        id="bad-utf8-in-a-str",
    ),
    pytest.param(
        frame(packed(wire_hello(software=msgpack.ExtType(5, b"abc")))),
        "msgpack extension type 5 is not allowed",
        id="ext-type",
    ),
    pytest.param(
        frame(packed(wire_hello(software=msgpack.Timestamp(1, 0)))),
        "hello.software: expected str, got msgpack extension type (Timestamp)",
        id="timestamp-type",
    ),
    pytest.param(
        frame(packed({**wire_hello(), 7: 1})),
        "malformed msgpack body: ValueError: int is not allowed for map key when "
        "strict_map_key=True",
        id="integer-map-key",
    ),
    pytest.param(
        frame(packed(wire_hello(slots="two"))),
        "hello.slots: expected int, got str",
        id="field-of-the-wrong-type",
    ),
    pytest.param(
        frame(packed({"t": "heartbeat", "running": []})),
        "node may not send 'heartbeat' in state HANDSHAKE",
        id="message-before-the-handshake",
    ),
    pytest.param(
        frame(packed({"t": "launch_missiles"})),
        "unknown message tag 'launch_missiles'",
        id="unknown-message-type",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_FIRST_FRAMES)
async def test_a_bad_first_frame_is_refused_and_the_hub_serves_on(
    adv_hub: WireHub, data: bytes, message: str
) -> None:
    peer = await Peer.connect(adv_hub)
    peer.send_raw(data)
    await refused(peer, PROTOCOL, message)
    await adv_serves_a_task(adv_hub)


async def test_a_connection_closed_mid_frame_is_a_protocol_error(adv_hub: WireHub) -> None:
    """The frame ends mid-object and the peer closes its side: the hub still says why."""
    peer = await Peer.connect(adv_hub)
    body = packed(wire_hello())
    peer.send_raw(struct.pack(">I", len(body)) + body[:10])
    peer.writer.write_eof()
    await refused(peer, PROTOCOL, "connection closed mid-frame")
    await adv_serves_a_task(adv_hub)


async def test_ten_thousand_levels_of_nesting_are_refused(adv_hub: WireHub) -> None:
    peer = await Peer.connect(adv_hub)
    peer.send_raw(frame(b"\x91" * 10_000 + b"\xc0"))
    error = await peer.next()
    assert isinstance(error, Error), error
    assert error.code == PROTOCOL
    assert error.message == "message nested too deeply to decode"
    assert await peer.next() is None
    peer.close()
    await adv_serves_a_task(adv_hub)


async def test_the_nesting_error_names_the_cause(adv_hub: WireHub) -> None:
    peer = await Peer.connect(adv_hub)
    peer.send_raw(frame(b"\x91" * 10_000 + b"\xc0"))
    await refused(peer, PROTOCOL, "message nested too deeply to decode")


# ---- bad messages of a node that completed the handshake -------------------------------------

RESULT_FIELDS: dict[str, Any] = {
    "project": "primes",
    "ok": True,
    "result": 1,
    "error": None,
    "cpu_seconds": 0.0,
    "wall_seconds": 0.0,
    "files": [],
    "mac": b"",
}
UINT64_MAX = 2**64 - 1

BAD_OPEN_FRAMES = [
    pytest.param(
        packed({"t": "accept", "leases": [UINT64_MAX]}),
        f"accept.leases[0]: int {UINT64_MAX} is outside 0..{2**63 - 1}",
        id="uint64-lease-id",
    ),
    pytest.param(
        packed({"t": "result", "lease": 1, "task": UINT64_MAX, **RESULT_FIELDS}),
        "result.task: expected str, got int",
        id="uint64-task-id",
    ),
    pytest.param(
        packed({"t": "ready", "free": True}),
        "ready.free: expected int, got bool",
        id="field-of-the-wrong-type",
    ),
    pytest.param(
        packed({"t": "offer", "tasks": []}),
        "node may not send 'offer' in state OPEN",
        id="a-hub-message-from-a-node",
    ),
    pytest.param(
        packed({"t": "launch_missiles", "at": "once"}),
        "unknown message tag 'launch_missiles'",
        id="unknown-message-type",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_OPEN_FRAMES)
async def test_a_bad_message_after_the_handshake_ends_only_that_session(
    adv_hub: WireHub, body: bytes, message: str
) -> None:
    peer = await Peer.join(adv_hub, INTRUDER_KEY)
    peer.send_raw(frame(body))
    await refused(peer, PROTOCOL, message)
    await adv_serves_a_task(adv_hub)


# ---- leases that are not the sender's -------------------------------------------------------


async def test_a_result_for_a_lease_the_node_does_not_hold_is_not_accepted(
    adv_hub: WireHub,
) -> None:
    holder = await Peer.join(adv_hub, HOLDER_KEY)
    offer = await holder.take_offer()
    await adv_hub.accepted(offer.lease, holder.node_id)
    intruder = await Peer.join(adv_hub, INTRUDER_KEY)
    # Another node's live lease, correctly authenticated by the intruder's connection:
    intruder.send(result_for(offer, intruder, answer="forged"))
    ack = await intruder.expect(ResultAck)
    assert (ack.lease, ack.accepted, ack.reason) == (
        offer.lease,
        False,
        "lease held by another node",
    )
    # A lease that never existed:
    ghost = dataclasses.replace(result_for(offer, intruder), lease=10**12)
    intruder.send(ghost)
    ack = await intruder.expect(ResultAck)
    assert (ack.lease, ack.accepted, ack.reason) == (
        10**12,
        False,
        "no such unfinished lease: task finished or lease unknown",
    )
    await intruder.still_open()  # refused, not disconnected
    # The holder's lease is untouched, and its own result counts.
    assert adv_hub.lease_holder(offer.lease) == (holder.node_id, True)
    holder.send(result_for(offer, holder))
    ack = await holder.expect(ResultAck)
    assert (ack.lease, ack.accepted, ack.reason) == (offer.lease, True, None)
    intruder.close()
    holder.close()
    await adv_serves_a_task(adv_hub)


async def test_a_heartbeat_naming_another_nodes_lease_changes_nothing(
    adv_hub: WireHub,
) -> None:
    holder = await Peer.join(adv_hub, HOLDER_KEY)
    offer = await holder.take_offer()
    await adv_hub.accepted(offer.lease, holder.node_id)
    intruder = await Peer.join(adv_hub, INTRUDER_KEY)
    # Protocol section 6: the hub uses only the fact that a heartbeat arrived.
    intruder.send(Heartbeat(running=[offer.lease, 10**12]))
    assert isinstance(await intruder.next_event(), HeartbeatAck)
    await intruder.still_open()  # and no error followed
    assert adv_hub.lease_holder(offer.lease) == (holder.node_id, True)
    assert adv_hub.lease_holder(10**12) is None
    holder.send(result_for(offer, holder))
    ack = await holder.expect(ResultAck)
    assert (ack.lease, ack.accepted) == (offer.lease, True)
    intruder.close()
    holder.close()
    await adv_serves_a_task(adv_hub)


async def test_an_accept_or_decline_naming_another_nodes_lease_is_ignored(
    adv_hub: WireHub,
) -> None:
    holder = await Peer.join(adv_hub, HOLDER_KEY)
    offer = await holder.take_offer()
    await adv_hub.accepted(offer.lease, holder.node_id)
    intruder = await Peer.join(adv_hub, INTRUDER_KEY)
    # Protocol section 7, rule 2: ignored, no answer, the connection stays.
    intruder.send(Decline(leases=[offer.lease], reason="mine now"))
    intruder.send(Accept(leases=[offer.lease]))
    await intruder.still_open()
    await asyncio.sleep(0.1)  # the runtime has had its turn at both
    assert adv_hub.lease_holder(offer.lease) == (holder.node_id, True)
    holder.send(result_for(offer, holder))
    ack = await holder.expect(ResultAck)
    assert (ack.lease, ack.accepted) == (offer.lease, True)
    intruder.close()
    holder.close()
    await adv_serves_a_task(adv_hub)


async def test_the_hub_survives_every_bad_peer_at_once(adv_hub: WireHub) -> None:
    """All the bad first frames on connections open at the same time, then a good node."""
    peers = []
    for param in BAD_FIRST_FRAMES:
        peer = await Peer.connect(adv_hub)
        peer.send_raw(param.values[0])
        peers.append((peer, param.values[1]))
    for peer, message in peers:
        await refused(peer, PROTOCOL, message)
    await adv_serves_a_task(adv_hub)
