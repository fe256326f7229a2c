"""The hub's side of the handshake over a real loopback connection: hello, challenge,
proof, welcome; replayed, forged and misdirected proofs refused with ``auth``.

The session under test is the hub's real ``NodeSession`` with the real ``enroll`` of
``HubRuntime`` on an SQLite store; only the scheduler is left out (``attach`` answers
with ``welcome`` at once, as the scheduler would for a node holding no leases).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import OperationalError

from hub.runtime import HubRuntime
from hub.session import NodeSession
from hub.store import AsyncStore, Store
from hub.transport import StreamTransport
from issc.keys import public_key_string
from issc.nodeauth import (
    Claim,
    Exchange,
    answer_challenge,
    new_kex,
    node_id_for,
    sign_proof,
    transcript,
)
from issc.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Challenge,
    Connection,
    Error,
    ErrorCode,
    Hello,
    Message,
    Proof,
    Role,
    Welcome,
)

T0 = 1_800_000_000.0
ALICE_KEY = Ed25519PrivateKey.from_private_bytes(b"\x0a" * 32)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x0c" * 32)
MALLORY_KEY = Ed25519PrivateKey.from_private_bytes(b"\x0b" * 32)


class FakeRuntime:
    """What a NodeSession needs of the hub's runtime, with the real enrollment."""

    enroll = HubRuntime.enroll
    degraded: str | None = None  # HubRuntime.enroll refuses nodes while it is set

    def __init__(self, store: Store, registration: str) -> None:
        self.store = store
        self.astore = AsyncStore(store)
        self.config = SimpleNamespace(
            heartbeat_interval=5.0, heartbeat_misses=3, registration=registration
        )
        self.joined: list[str] = []

    def now(self) -> float:
        return T0

    def attach(self, session: NodeSession, hello: Hello) -> None:
        assert session.node_id is not None
        self.joined.append(session.node_id)
        session.send_welcome(())

    def detach(self, session: NodeSession) -> None:
        pass


@dataclasses.dataclass
class Hub:
    runtime: FakeRuntime
    port: int


def hello_for(key: Ed25519PrivateKey, volunteer: str = "alice", token: str | None = None) -> Hello:
    return Hello(
        protocol=PROTOCOL_VERSION,
        software="test/0",
        volunteer=volunteer,
        token=token,
        public_key=public_key_string(key.public_key()),
        projects=["primes"],
        slots=1,
        leases=[],
    )


def proof_for(key: Ed25519PrivateKey, challenge: Challenge, hello: Hello) -> Proof:
    claim = Claim(hello.volunteer, hello.public_key, hello.token)
    answer = answer_challenge(key, challenge.nonce, challenge.kex, claim)
    return Proof(signature=answer.signature, kex=answer.kex)


class RawNode:
    """A node speaking the protocol by hand, so it can lie."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.NODE)

    @classmethod
    async def connect(cls, hub: Hub) -> RawNode:
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        return cls(reader, writer)

    async def send(self, message: Message) -> Message:
        """Send; the hub's next message."""
        self.writer.write(self.conn.send(message))
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), 10))
                continue
            assert isinstance(event, Message), f"the hub hung up: {event}"
            return event

    async def challenge(self, hello: Hello) -> Challenge:
        reply = await self.send(hello)
        assert isinstance(reply, Challenge), reply
        return reply

    def close(self) -> None:
        self.writer.close()


async def handshake(
    hub: Hub, key: Ed25519PrivateKey, volunteer: str = "alice", token: str | None = None
) -> Message:
    """A complete, honest handshake; the hub's last word (welcome or error)."""
    node = await RawNode.connect(hub)
    try:
        hello = hello_for(key, volunteer, token)
        challenge = await node.challenge(hello)
        return await node.send(proof_for(key, challenge, hello))
    finally:
        node.close()


def refused(message: Message, fragment: str) -> None:
    assert isinstance(message, Error), message
    assert message.code == ErrorCode.AUTH, message
    assert fragment in message.message, message.message


async def start_hub(tmp_path: Path, registration: str) -> tuple[Hub, asyncio.Server]:
    store = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    runtime = FakeRuntime(store, registration)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await NodeSession(runtime, StreamTransport(reader, writer)).serve()  # type: ignore[arg-type]

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return Hub(runtime, server.sockets[0].getsockname()[1]), server


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    started, server = await start_hub(tmp_path, "open")
    try:
        yield started
    finally:
        server.close()
        started.runtime.astore.shutdown()


@pytest.fixture
async def closed_hub(tmp_path: Path) -> AsyncIterator[Hub]:
    started, server = await start_hub(tmp_path, "closed")
    try:
        yield started
    finally:
        server.close()
        started.runtime.astore.shutdown()


# ---- the honest path ------------------------------------------------------------------------


async def test_hello_challenge_proof_welcome(hub: Hub) -> None:
    welcome = await handshake(hub, ALICE_KEY)
    node_id = node_id_for(public_key_string(ALICE_KEY.public_key()))
    assert isinstance(welcome, Welcome)
    assert welcome.node_id == node_id
    assert hub.runtime.joined == [node_id]
    # The same key on a later connection is the same node.
    again = await handshake(hub, ALICE_KEY)
    assert isinstance(again, Welcome) and again.node_id == node_id


async def test_every_connection_gets_a_new_nonce_and_key_exchange_value(hub: Hub) -> None:
    nonces, kexes = set(), set()
    for _ in range(3):
        node = await RawNode.connect(hub)
        challenge = await node.challenge(hello_for(ALICE_KEY))
        nonces.add(challenge.nonce)
        kexes.add(challenge.kex)
        node.close()
    assert len(nonces) == len(kexes) == 3
    assert all(len(n) == 32 for n in nonces | kexes)


async def test_a_proof_with_a_key_exchange_value_of_small_order_is_refused(hub: Hub) -> None:
    # Its secret would be all zeros, whoever the hub is: the result key would be public.
    node = await RawNode.connect(hub)
    hello = hello_for(ALICE_KEY)
    challenge = await node.challenge(hello)
    claim = Claim(hello.volunteer, hello.public_key, hello.token)
    exchange = Exchange(challenge.nonce, challenge.kex, bytes(32))
    proof = Proof(signature=sign_proof(ALICE_KEY, exchange, claim), kex=bytes(32))
    refused(await node.send(proof), "small order")
    node.close()
    assert hub.runtime.joined == []


# ---- attacks -------------------------------------------------------------------------------


async def test_a_replayed_handshake_is_refused_and_logged(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    # Record a good handshake of alice's node...
    node = await RawNode.connect(hub)
    hello = hello_for(ALICE_KEY)
    challenge = await node.challenge(hello)
    recorded = proof_for(ALICE_KEY, challenge, hello)
    assert isinstance(await node.send(recorded), Welcome)
    node.close()
    # ...and play it back on a new connection, without the key.
    replay = await RawNode.connect(hub)
    await replay.challenge(hello)
    with caplog.at_level(logging.WARNING, logger="hub.session"):
        answer = await replay.send(recorded)
    replay.close()
    refused(answer, "does not verify")
    assert "refused node from 127.0.0.1:" in caplog.text
    assert "'alice'" in caplog.text and "does not verify" in caplog.text
    assert hub.runtime.joined == [node_id_for(hello.public_key)]  # only the first time


async def test_a_proof_signed_by_another_key_is_refused(hub: Hub) -> None:
    # Mallory names alice's key in his hello but holds only his own.
    node = await RawNode.connect(hub)
    hello = hello_for(ALICE_KEY, volunteer="alice")
    challenge = await node.challenge(hello)
    claim = Claim(hello.volunteer, hello.public_key, hello.token)
    node_kex = new_kex()[1]
    exchange = Exchange(challenge.nonce, challenge.kex, node_kex)
    forged = Proof(signature=MALLORY_KEY.sign(transcript(exchange, claim)), kex=node_kex)
    refused(await node.send(forged), "does not verify")
    node.close()
    assert hub.runtime.joined == []


async def test_a_proof_made_for_another_volunteer_is_refused(hub: Hub) -> None:
    node = await RawNode.connect(hub)
    hello = hello_for(ALICE_KEY, volunteer="mallory")
    challenge = await node.challenge(hello)
    # Signed for alice, presented for mallory.
    proof = proof_for(ALICE_KEY, challenge, dataclasses.replace(hello, volunteer="alice"))
    refused(await node.send(proof), "does not verify")
    node.close()


async def test_a_known_key_cannot_join_for_another_volunteer(hub: Hub) -> None:
    assert isinstance(await handshake(hub, ALICE_KEY, "alice"), Welcome)
    node_id = node_id_for(public_key_string(ALICE_KEY.public_key()))
    refused(
        await handshake(hub, ALICE_KEY, "mallory"),
        f"node {node_id} is enrolled for volunteer 'alice', not 'mallory'",
    )


async def test_a_bad_public_key_is_a_protocol_error_before_any_challenge(hub: Hub) -> None:
    node = await RawNode.connect(hub)
    hello = dataclasses.replace(hello_for(ALICE_KEY), public_key="ed25519:AAAA")
    answer = await node.send(hello)
    node.close()
    assert isinstance(answer, Error) and answer.code == ErrorCode.PROTOCOL
    assert "hello.public_key" in answer.message


# ---- registration and tokens ---------------------------------------------------------------


async def test_closed_registration_refuses_an_unknown_volunteer(closed_hub: Hub) -> None:
    refused(
        await handshake(closed_hub, ALICE_KEY, "bob"),
        "volunteer 'bob' is unknown and registration is closed",
    )
    assert closed_hub.runtime.joined == []


async def test_closed_registration_takes_each_token_once(closed_hub: Hub) -> None:
    token = closed_hub.runtime.store.issue_token("alice", T0)
    welcome = await handshake(closed_hub, ALICE_KEY, "alice", token)
    assert isinstance(welcome, Welcome)
    # The enrolled node keeps coming back, token or not.
    assert isinstance(await handshake(closed_hub, ALICE_KEY, "alice", token), Welcome)
    assert isinstance(await handshake(closed_hub, ALICE_KEY, "alice"), Welcome)
    # A second machine with the same token does not get in.
    refused(
        await handshake(closed_hub, OTHER_KEY, "alice", token),
        f"already used by node {welcome.node_id}",
    )


async def test_a_database_failure_is_internal_not_auth(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> str:
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(hub.runtime.store, "enroll_node", broken)
    answer = await handshake(hub, ALICE_KEY)
    assert isinstance(answer, Error) and answer.code == ErrorCode.INTERNAL
