"""A hub played by the test, message by message, on a real socket: for node client tests
that must see the node's wiring on the wire (unit/test_node_files_client,
unit/test_node_prefetch, adversarial/test_bundles).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from issc.bundle import pack_bundle
from issc.keys import generate_key
from issc.nodeauth import Claim, Exchange, new_kex, new_nonce, node_id_for, result_key, verify_proof
from issc.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Challenge,
    Connection,
    Heartbeat,
    Hello,
    Message,
    Proof,
    Ready,
    Role,
    Welcome,
)

M = TypeVar("M", bound=Message)


@dataclass
class HubSide:
    """One connection from the node, seen from the hub."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: Connection = field(default_factory=lambda: Connection(Role.HUB))
    result_key: bytes = b""  # the connection's, once handshake() has run

    def send(self, message: Message) -> None:
        self.writer.write(self.conn.send(message))

    async def expect(self, kind: type[M]) -> M:
        """The next message of ``kind`` (within 10 s), skipping heartbeats, and readies
        unless a ready is asked for."""

        async def wanted() -> M:
            while True:
                message = await self._next_any()
                if isinstance(message, Heartbeat) or (
                    isinstance(message, Ready) and kind is not Ready
                ):
                    continue
                assert isinstance(message, kind), f"expected {kind.__name__}, got {message}"
                return message

        return await asyncio.wait_for(wanted(), 10)

    async def handshake(self, resumed: list[int]) -> Hello:
        """Answer the node's hello: challenge, check its proof, welcome it."""
        hello = await self.expect(Hello)
        nonce = new_nonce()
        kex_private, hub_kex = new_kex()
        self.send(Challenge(nonce=nonce, kex=hub_kex))
        proof = await self.expect(Proof)
        exchange = Exchange(nonce, hub_kex, proof.kex)
        verify_proof(
            exchange, Claim(hello.volunteer, hello.public_key, hello.token), proof.signature
        )
        self.result_key = result_key(kex_private, exchange, proof.kex)
        self.send(
            Welcome(
                protocol=PROTOCOL_VERSION,
                node_id=node_id_for(hello.public_key),
                heartbeat_interval=30.0,
                heartbeat_misses=3,
                max_frame_size=4 * 1024 * 1024,
                resumed=resumed,
            )
        )
        return hello

    def close(self) -> None:
        self.writer.close()

    async def _next_any(self) -> Message:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(await self.reader.read(65536))
                continue
            assert isinstance(event, Message), f"connection ended: {event}"
            return event


@dataclass
class Listening:
    """The scripted hub's listening socket; each node connection arrives in ``connections``."""

    server: asyncio.Server
    port: int
    connections: asyncio.Queue[HubSide]


async def listen() -> Listening:
    connections: asyncio.Queue[HubSide] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await connections.put(HubSide(reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return Listening(server, server.sockets[0].getsockname()[1], connections)


@dataclass(frozen=True)
class SignedBundle:
    content: bytes
    digest: str
    owner_key: str  # the public key a node must trust for the project


def signed_bundle(tmp_path: Path, name: str, mode: str, program: str) -> SignedBundle:
    """A one-file project ``name`` (main.py = ``program``), packed and signed by a new key."""
    public = generate_key(tmp_path / "owner.key")
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text(program)
    manifest = {
        "name": name,
        "version": 1,
        "entrypoint": ["python3", "main.py"],
        "mode": mode,
        "limits": {"wall_seconds": 20, "memory_mb": 256, "output_mb": 1},
    }
    (project / "project.yaml").write_text(yaml.safe_dump(manifest))
    path = tmp_path / f"{name}-1.issc"
    pack_bundle(project, tmp_path / "owner.key", path)
    content = path.read_bytes()
    return SignedBundle(content, hashlib.sha256(content).hexdigest(), public)


def node_config(
    tmp_path: Path, port: int, bundle_name: str, bundle: SignedBundle, **extra: Any
) -> Path:
    """A node config (one slot) for volunteer alice, trusting the bundle's owner key."""
    path = tmp_path / "node.yaml"
    config = {
        "hub": f"127.0.0.1:{port}",
        "volunteer": "alice",
        "data_dir": str(tmp_path / "node"),
        "projects": [bundle_name],
        "trusted_keys": {bundle_name: bundle.owner_key},
        "slots": 1,
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path
