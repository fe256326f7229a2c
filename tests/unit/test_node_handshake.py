"""The node's side of the handshake against a scripted hub: it proves itself with its own
key, stops for good on ``auth``, and does not sign what it should not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from issc.config import load_node_config
from issc.nodeauth import Claim, Exchange, new_kex, new_nonce, verify_proof
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
from node.client import FatalNodeError, NodeClient

HUB_KEX = new_kex()[1]  # the scripted hub's key exchange value


@dataclass
class HubSide:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: Connection = field(default_factory=lambda: Connection(Role.HUB))

    def send(self, message: Message) -> None:
        self.writer.write(self.conn.send(message))

    async def next(self) -> Message:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), 10))
                continue
            assert isinstance(event, Message), f"connection ended: {event}"
            return event


@dataclass
class Setup:
    connections: asyncio.Queue[HubSide]
    client: NodeClient
    running: asyncio.Task[None]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    connections: asyncio.Queue[HubSide] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await connections.put(HubSide(reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config_path = tmp_path / "node.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "hub": f"127.0.0.1:{port}",
                "volunteer": "alice",
                "token": "issc-tok",
                "data_dir": "node",
                "projects": [],
                "slots": 1,
            }
        )
    )
    client = NodeClient(load_node_config(config_path))
    stop = asyncio.Event()
    running = asyncio.create_task(client.run(stop))
    try:
        yield Setup(connections, client, running)
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(running, 15)
        server.close()


async def challenged(
    setup: Setup, nonce: bytes, kex: bytes = HUB_KEX
) -> tuple[HubSide, Hello, Message]:
    hub = await asyncio.wait_for(setup.connections.get(), 10)
    hello = await hub.next()
    assert isinstance(hello, Hello)
    hub.send(Challenge(nonce=nonce, kex=kex))
    return hub, hello, await hub.next()


async def test_the_node_proves_its_key_and_its_claim(setup: Setup) -> None:
    nonce = new_nonce()
    hub, hello, proof = await challenged(setup, nonce)
    identity = setup.client.identity
    assert (hello.volunteer, hello.token, hello.public_key) == (
        "alice",
        "issc-tok",
        identity.public_key,
    )
    assert isinstance(proof, Proof)
    exchange = Exchange(nonce, HUB_KEX, proof.kex)
    verify_proof(exchange, Claim("alice", identity.public_key, "issc-tok"), proof.signature)
    hub.send(
        Welcome(
            protocol=PROTOCOL_VERSION,
            node_id=identity.node_id,
            heartbeat_interval=30.0,
            heartbeat_misses=3,
            max_frame_size=4 * 1024 * 1024,
            resumed=[],
        )
    )
    assert (await hub.next()).TAG == "ready"


async def test_auth_refusal_stops_the_node_naming_the_cause(setup: Setup) -> None:
    hub, _, proof = await challenged(setup, new_nonce())
    assert isinstance(proof, Proof)
    hub.send(Error(code=ErrorCode.AUTH, message="volunteer 'alice' is unknown"))
    with pytest.raises(FatalNodeError) as info:
        await asyncio.wait_for(setup.running, 10)
    text = str(info.value)
    assert "volunteer 'alice' is unknown" in text
    assert setup.client.identity.node_id in text and "(auth)" in text


async def test_a_short_nonce_is_refused_unsigned(setup: Setup) -> None:
    _, _, answer = await challenged(setup, b"\x00" * 8)
    assert isinstance(answer, Error), answer
    assert answer.code == ErrorCode.PROTOCOL and "32 bytes" in answer.message
    # Not fatal: the node tries again on a new connection.
    again = await asyncio.wait_for(setup.connections.get(), 10)
    assert isinstance(await again.next(), Hello)


async def test_a_key_exchange_value_of_small_order_is_refused_unsigned(setup: Setup) -> None:
    # Its secret would be all zeros: whoever sent it could read every result key.
    _, _, answer = await challenged(setup, new_nonce(), kex=bytes(32))
    assert isinstance(answer, Error), answer
    assert answer.code == ErrorCode.PROTOCOL and answer.message.startswith("challenge:")
    again = await asyncio.wait_for(setup.connections.get(), 10)
    assert isinstance(await again.next(), Hello)


async def test_a_welcome_naming_another_id_is_not_believed(setup: Setup) -> None:
    hub, _, proof = await challenged(setup, new_nonce())
    assert isinstance(proof, Proof)
    hub.send(
        Welcome(
            protocol=PROTOCOL_VERSION,
            node_id="n-00000000",
            heartbeat_interval=30.0,
            heartbeat_misses=3,
            max_frame_size=4 * 1024 * 1024,
            resumed=[],
        )
    )
    # The node drops that connection instead of working under a wrong name, and retries.
    again = await asyncio.wait_for(setup.connections.get(), 10)
    assert isinstance(await again.next(), Hello)
