"""Authenticated results at the hub, over real loopback connections: the real NodeSession,
HubRuntime, Scheduler and SQLite store; the node is played by hand so it can be lied for.

A result counts only if its HMAC under the connection's result key (issc.resultmac)
checks against what the hub offered under the lease and what arrived; anything altered on
the way (by a relay) gives the lease back (the task is NA again, no attempt counted),
answers ``result_ack`` with ``accepted: false`` and ends the connection with an ``error``
of code ``relay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from hub.blobs import ContentStore
from hub.changes import FileInfo
from hub.inbox import Inbox
from hub.models import Task
from hub.outbox import Outbox
from hub.runtime import HubRuntime
from hub.scheduler import Scheduler, Settings
from hub.session import NodeSession
from hub.store import Store, TaskEntry
from hub.transport import StreamTransport
from issc.keys import public_key_string
from issc.manifest import Limits, Manifest
from issc.nodeauth import Claim, answer_challenge, node_id_for
from issc.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Accept,
    Challenge,
    Connection,
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
KEY = Ed25519PrivateKey.from_private_bytes(b"\x31" * 32)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x32" * 32)
PUBLIC = public_key_string(KEY.public_key())
NODE = node_id_for(PUBLIC)
OWNER = "ed25519:" + "A" * 43 + "="
INPUT_JSON = '{"n":10,"opts":{"b":2.5,"a":[1,"x"]}}'
SHARED = b"shared input bytes"
SHARED_FILE = FileInfo("data.bin", hashlib.sha256(SHARED).hexdigest(), len(SHARED))
ANSWER = {"primes": [2, 3, 5, 7], "ratio": 0.4, "note": "é"}


def manifest(version: int) -> Manifest:
    return Manifest(
        name="primes",
        version=version,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=1,
        files=(),
        owner_key=OWNER,
    )


def register(store: Store, version: int, at: float) -> str:
    content = f"bundle v{version}".encode()
    digest = hashlib.sha256(content).hexdigest()
    store.register_bundle(manifest(version), digest, content, at)
    return digest


class RunningHub:
    """A hub runtime on a store, serving nodes on a loopback port (restartable)."""

    def __init__(self, tmp_path: Path, store: Store) -> None:
        self.tmp_path = tmp_path
        self.store = store
        data = tmp_path / "hub"
        files = ContentStore(data / "files")
        config = SimpleNamespace(
            data_dir=data, heartbeat_interval=30.0, heartbeat_misses=3, registration="open"
        )
        scheduler = Scheduler(Settings(3, 30.0, 90.0), store.load_snapshot(), now=time.time())
        self.runtime = HubRuntime(
            config,  # type: ignore[arg-type]
            store,
            scheduler,
            Inbox(data / "inbox", store, files),
            Outbox(data / "outbox", store, files),
            files,
        )
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        runtime = self.runtime

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await NodeSession(runtime, StreamTransport(reader, writer)).serve()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._pump = asyncio.create_task(runtime.pump())

    async def stop(self) -> None:
        """Stop serving: like a hub killed, except that the store stays open."""
        assert self._server is not None and self._pump is not None
        self._server.close()
        for session in list(self.runtime.sessions.values()):
            session.close()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump

    def task_row(self, pk: int) -> tuple[str, int]:
        with self.store.engine.connect() as conn:
            row = conn.execute(select(Task.state, Task.attempts).where(Task.id == pk)).one()
        return row.state, row.attempts


@dataclasses.dataclass
class World:
    hub: RunningHub
    store: Store
    task_pk: int
    digest: str  # the bundle offered


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    digest = register(store, 1, time.time() - 60)
    _, pks = store.add_tasks(
        "primes",
        [TaskEntry("t-1", INPUT_JSON, 1, files=(SHARED_FILE,))],
        "f" * 64,
        "tasks.jsonl",
        time.time(),
    )
    hub = RunningHub(tmp_path, store)
    await hub.start()
    holder = World(hub, store, pks[0], digest)
    try:
        yield holder
    finally:
        with contextlib.suppress(Exception):
            await holder.hub.stop()
        holder.hub.runtime.astore.shutdown()


class RawNode:
    """A node speaking the protocol by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.NODE)
        self.result_key = b""  # the connection's, from the handshake

    @classmethod
    async def join(
        cls, hub: RunningHub, leases: list[int] | None = None, key: Ed25519PrivateKey = KEY
    ) -> tuple[RawNode, Welcome]:
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        node = cls(reader, writer)
        hello = Hello(
            protocol=PROTOCOL_VERSION,
            software="test/0",
            volunteer="alice",
            token=None,
            public_key=public_key_string(key.public_key()),
            projects=["primes"],
            slots=1,
            leases=leases or [],
        )
        node.send(hello)
        challenge = await node.expect(Challenge)
        claim = Claim(hello.volunteer, hello.public_key, hello.token)
        answer = answer_challenge(key, challenge.nonce, challenge.kex, claim)
        node.result_key = answer.result_key
        node.send(Proof(signature=answer.signature, kex=answer.kex))
        return node, await node.expect(Welcome)

    def send(self, message: Message) -> None:
        self.writer.write(self.conn.send(message))

    async def next(self) -> Message | None:
        """The hub's next message (heartbeat acks skipped), or None once it hung up."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), 10))
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
        """Ask for work, accept what comes."""
        self.send(Ready(free=1))
        offer = await self.expect(Offer)
        assert len(offer.tasks) == 1
        self.send(Accept(leases=[offer.tasks[0].lease]))
        return offer.tasks[0]

    def close(self) -> None:
        self.writer.close()


def result_for(
    node: RawNode,
    offer: TaskOffer,
    answer: Any = ANSWER,
    *,
    signed_input: Any = None,
    signed_answer: Any = None,
    signed_digest: str | None = None,
) -> Result:
    """An honest result of ``node`` for ``offer``, authenticated with its connection's key;
    the ``signed_*`` arguments make the node authenticate something else than what travels
    (what a relay's tampering looks like to the hub)."""
    given = given_of(
        offer.lease,
        offer.project,
        offer.task,
        signed_digest or offer.digest,
        offer.input if signed_input is None else signed_input,
        offer.files,
    )
    returned = returned_of(
        True, answer if signed_answer is None else signed_answer, None, 0.25, 0.5, []
    )
    return Result(
        lease=offer.lease,
        project=offer.project,
        task=offer.task,
        ok=True,
        result=answer,
        error=None,
        cpu_seconds=0.25,
        wall_seconds=0.5,
        files=[],
        mac=result_mac(node.result_key, transcript_digest(NODE, given, returned)),
    )


async def still_connected(node: RawNode) -> None:
    """The hub neither sent an error nor hung up, and still answers."""
    node.send(Heartbeat(running=[]))
    with pytest.raises(TimeoutError):
        message = await asyncio.wait_for(node.next(), 0.3)  # acks are skipped
        raise AssertionError(f"the hub sent {message}")


async def assert_refused_as_relayed(node: RawNode, world: World, lease: int) -> None:
    ack = await node.expect(ResultAck)
    assert (ack.lease, ack.accepted) == (lease, False)
    assert ack.reason is not None and "HMAC" in ack.reason
    error = await node.expect(Error)
    assert error.code == ErrorCode.RELAY
    assert f"lease {lease}" in error.message
    assert await node.next() is None  # and the hub hung up
    # Given back, committed before the ack: waiting for a node again, no attempt used.
    assert world.hub.task_row(world.task_pk) == ("NA", 0)
    assert world.hub.runtime.scheduler.tasks[world.task_pk].attempts == 0
    assert lease not in world.hub.runtime.scheduler.leases


async def test_a_correctly_authenticated_result_is_accepted(world: World) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    assert offer.digest == world.digest
    assert [f.name for f in offer.files] == ["data.bin"]
    node.send(result_for(node, offer))
    ack = await node.expect(ResultAck)
    assert (ack.lease, ack.accepted, ack.reason) == (offer.lease, True, None)
    assert world.hub.task_row(world.task_pk) == ("C", 1)
    assert world.hub.runtime._offered == {}  # forgotten with the finished task
    node.close()


async def test_a_result_altered_after_its_mac_is_refused_and_the_task_given_back(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    # The node authenticated ANSWER; a relay changed one number on the way.
    forged = result_for(node, offer, {**ANSWER, "ratio": 0.5}, signed_answer=ANSWER)
    with caplog.at_level("WARNING", logger="hub.session"):
        node.send(forged)
        await assert_refused_as_relayed(node, world, offer.lease)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert NODE in logged and "alice" in logged and f"lease {offer.lease}" in logged
    assert "task t-1" in logged and "direct connection" in logged
    # The task is offered again, and an honest result then counts.
    node, _ = await RawNode.join(world.hub)
    again = await node.take_offer()
    assert again.task == "t-1" and again.lease != offer.lease
    node.send(result_for(node, again))
    assert (await node.expect(ResultAck)).accepted
    assert world.hub.task_row(world.task_pk) == ("C", 1)
    node.close()


async def test_a_result_over_another_input_than_offered_is_refused(world: World) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    assert offer.input == {"n": 10, "opts": {"b": 2.5, "a": [1, "x"]}}
    # The hub offered n=10; the node received (and authenticated) n=11.
    node.send(result_for(node, offer, signed_input={"n": 11, "opts": {"b": 2.5, "a": [1, "x"]}}))
    await assert_refused_as_relayed(node, world, offer.lease)


async def test_a_result_over_another_bundle_or_input_file_is_refused(world: World) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    node.send(result_for(node, offer, signed_digest="0" * 64))
    await assert_refused_as_relayed(node, world, offer.lease)

    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    swapped = dataclasses.replace(offer, files=[])  # the node was told of no input file
    forged = dataclasses.replace(result_for(node, swapped), lease=offer.lease)
    node.send(forged)
    await assert_refused_as_relayed(node, world, offer.lease)


async def test_a_result_with_no_mac_is_refused(world: World) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    node.send(dataclasses.replace(result_for(node, offer), mac=b""))
    await assert_refused_as_relayed(node, world, offer.lease)


async def test_a_result_under_another_connections_key_is_refused(world: World) -> None:
    # The key is the connection's: a MAC made under an earlier connection's key (one that
    # something in the middle might have learnt) counts for nothing on this one.
    earlier, _ = await RawNode.join(world.hub)
    node, _ = await RawNode.join(world.hub)  # the same node again: the earlier is closed
    assert node.result_key != earlier.result_key
    offer = await node.take_offer()
    node.send(result_for(earlier, offer))
    await assert_refused_as_relayed(node, world, offer.lease)


async def test_a_result_for_a_finished_task_is_acknowledged_without_a_check(
    world: World,
) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    node.send(result_for(node, offer))
    assert (await node.expect(ResultAck)).accepted
    # Sent again (the ack was lost) with garbage for a MAC: nothing to protect.
    node.send(dataclasses.replace(result_for(node, offer), mac=b"\x00" * 32))
    ack = await node.expect(ResultAck)
    assert (ack.accepted, ack.reason) == (
        False,
        "no such unfinished lease: task finished or lease unknown",
    )
    await still_connected(node)
    assert world.hub.task_row(world.task_pk) == ("C", 1)
    node.close()


async def test_a_result_for_another_nodes_lease_is_left_to_the_scheduler(world: World) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    other, _ = await RawNode.join(world.hub, key=OTHER_KEY)
    other.send(dataclasses.replace(result_for(node, offer), mac=b""))
    ack = await other.expect(ResultAck)
    assert (ack.accepted, ack.reason) == (False, "lease held by another node")
    await still_connected(other)
    # The holder's lease is untouched, and its honest result counts.
    node.send(result_for(node, offer))
    assert (await node.expect(ResultAck)).accepted
    other.close()
    node.close()


async def test_after_a_restart_the_offer_is_rebuilt_from_the_store(world: World) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    await asyncio.sleep(0.05)  # the accept is committed
    node.close()
    # A newer bundle arrives while the task runs, then the hub restarts: the lease still
    # names the bundle its offer named, which the store does not keep with the lease.
    register(world.store, 2, time.time() + 1)
    await world.hub.stop()
    world.hub.runtime.astore.shutdown()
    world.hub = RunningHub(world.hub.tmp_path, Store(f"sqlite:///{world.hub.tmp_path / 'hub.db'}"))
    await world.hub.start()
    assert world.hub.runtime._offered == {}

    node, welcome = await RawNode.join(world.hub, leases=[offer.lease])
    assert welcome.resumed == [offer.lease]
    # Signed over the new bundle (what a relay swapping bundles would make the node run):
    node.send(result_for(node, offer, signed_digest=world.hub.runtime.scheduler.projects[1].digest))
    await assert_refused_as_relayed(node, world, offer.lease)


async def test_after_a_restart_an_honest_result_still_counts(world: World) -> None:
    node, _ = await RawNode.join(world.hub)
    offer = await node.take_offer()
    await asyncio.sleep(0.05)
    node.close()
    register(world.store, 2, time.time() + 1)
    await world.hub.stop()
    world.hub.runtime.astore.shutdown()
    world.hub = RunningHub(world.hub.tmp_path, Store(f"sqlite:///{world.hub.tmp_path / 'hub.db'}"))
    await world.hub.start()

    node, welcome = await RawNode.join(world.hub, leases=[offer.lease])
    assert welcome.resumed == [offer.lease]
    node.send(result_for(node, offer))  # over bundle v1, as offered
    ack = await node.expect(ResultAck)
    assert (ack.lease, ack.accepted) == (offer.lease, True), ack.reason
    assert world.hub.task_row(world.task_pk) == ("C", 1)
    node.close()


def test_bundles_by_names_what_an_offer_made_then_may_have_named(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    v1 = register(store, 1, 100.0)
    v2 = register(store, 2, 200.0)
    v3 = register(store, 3, 300.0)
    assert store.bundles_by(1, 50.0) == []
    assert store.bundles_by(1, 150.0) == [v1]
    assert store.bundles_by(1, 250.0) == [v2, v1]
    assert store.bundles_by(1, 1000.0) == [v3, v2]
    store.close()
