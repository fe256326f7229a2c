"""The node client with input and output files, against a scripted hub on a real socket.

The hub side is played by the test, message by message, so that the node's wiring is seen
on the wire: input files fetched after the accept and resumed on the next connection, the
task run with them, its output uploaded before the result; a cancel while a file is still
missing; a file that keeps failing its digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest
from scripted_hub import HubSide, listen, node_config, signed_bundle

from issc.config import load_node_config
from issc.errors import AuthError
from issc.nodeauth import node_id_for
from issc.protocol import (
    Accept,
    BundleChunk,
    Cancel,
    FetchBundle,
    FetchFile,
    FileChunk,
    FileRef,
    Hello,
    Message,
    Offer,
    Result,
    ResultAck,
    TaskOffer,
    Upload,
    UploadAck,
)
from issc.resultmac import check_result_mac, given_of, returned_of, transcript_digest
from node.client import NodeClient

pytestmark = pytest.mark.timeout(30)

M = TypeVar("M", bound=Message)

PROGRAM = """
import json, shutil
shutil.copyfile("in/data.bin", "out/copy.bin")
print(json.dumps({"copied": len(open("in/data.bin", "rb").read())}))
"""
DATA = bytes(range(256)) * 20  # 5120 bytes, served in chunks of 2000
DATA_SHA = hashlib.sha256(DATA).hexdigest()
SERVED_CHUNK = 2000


def serve_file(hub: HubSide, ask: FetchFile, content: bytes = DATA) -> None:
    piece = content[ask.offset : ask.offset + SERVED_CHUNK]
    hub.send(FileChunk(sha256=ask.sha256, offset=ask.offset, total=len(content), data=piece))


@dataclass
class Setup:
    connections: asyncio.Queue[HubSide]
    client: NodeClient
    offer: TaskOffer
    bundle: bytes


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    bundle = signed_bundle(tmp_path, "copy", "process", PROGRAM)
    hub = await listen()
    client = NodeClient(load_node_config(node_config(tmp_path, hub.port, "copy", bundle)))
    stop = asyncio.Event()
    running = asyncio.create_task(client.run(stop))
    offer = TaskOffer(
        lease=1,
        project="copy",
        task="t-1",
        version=1,
        digest=bundle.digest,
        size=len(bundle.content),
        input=None,
        files=[FileRef(name="data.bin", sha256=DATA_SHA, size=len(DATA))],
    )
    try:
        yield Setup(hub.connections, client, offer, bundle.content)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 15)
        hub.server.close()


async def offered(setup: Setup) -> HubSide:
    """A connection on which the node has accepted the offer (bundle served)."""
    hub = await setup.connections.get()
    await hub.handshake(resumed=[])
    hub.send(Offer(tasks=[setup.offer]))
    ask = await hub.expect(FetchBundle)
    hub.send(BundleChunk(digest=ask.digest, offset=0, total=len(setup.bundle), data=setup.bundle))
    assert (await hub.expect(Accept)).leases == [1]
    return hub


async def test_input_fetched_across_a_cut_then_output_uploaded_before_the_result(
    setup: Setup,
) -> None:
    hub = await offered(setup)
    for offset in (0, 2000):
        ask = await hub.expect(FetchFile)
        assert (ask.sha256, ask.offset) == (DATA_SHA, offset)
        serve_file(hub, ask)
    await hub.expect(FetchFile)  # asked for 4000: the connection is cut instead
    hub.close()

    hub = await setup.connections.get()
    hello = await hub.handshake(resumed=[1])
    assert hello.leases == [1]  # the lease waiting for its file is still held
    ask = await hub.expect(FetchFile)
    assert ask.offset == 4000  # resumed from the partial file
    serve_file(hub, ask)

    copy_sha = DATA_SHA  # out/copy.bin is a copy of the input
    probe = await hub.expect(Upload)
    assert (probe.name, probe.offset, probe.data, probe.size) == ("copy.bin", 0, b"", len(DATA))
    hub.send(UploadAck(lease=1, name="copy.bin", received=0))
    chunk = await hub.expect(Upload)
    assert (chunk.offset, chunk.data, chunk.sha256) == (0, DATA, copy_sha)
    hub.send(UploadAck(lease=1, name="copy.bin", received=len(DATA)))
    result = await hub.expect(Result)
    assert result.ok, result.error
    assert result.result == {"copied": len(DATA)}
    assert result.files == [FileRef(name="copy.bin", sha256=copy_sha, size=len(DATA))]
    spool = setup.client.spool
    assert spool.leases() == [1]
    assert (spool.output_dir(1) / "copy.bin").read_bytes() == DATA
    hub.send(ResultAck(lease=1, accepted=True, reason=None))
    await spool_drained(setup)
    assert setup.client.inputs.cache.path(DATA_SHA) is not None  # cached for the next task


async def test_a_cancel_while_the_input_is_missing_ends_the_wait(setup: Setup) -> None:
    hub = await offered(setup)
    await hub.expect(FetchFile)  # never answered
    assert 1 in setup.client.running
    hub.send(Cancel(leases=[1], reason="task completed elsewhere"))
    for _ in range(200):
        if 1 not in setup.client.running:
            break
        await asyncio.sleep(0.02)
    assert 1 not in setup.client.running
    assert setup.client.spool.leases() == []


async def test_an_input_that_fails_its_digest_twice_fails_the_task_naming_the_file(
    setup: Setup,
) -> None:
    hub = await offered(setup)
    wrong = b"x" * len(DATA)
    for _ in range(2):
        for _ in range(3):
            serve_file(hub, await hub.expect(FetchFile), wrong)
    result = await hub.expect(Result)
    assert result.ok is False
    assert result.files == []
    assert result.error is not None and "input file data.bin" in result.error
    assert "SHA-256" in result.error
    hub.send(ResultAck(lease=1, accepted=True, reason=None))
    await spool_drained(setup)


def check_authenticated(key: bytes, hello: Hello, offer: TaskOffer, result: Result) -> None:
    """Raise AuthError unless ``result`` carries the HMAC, under the connection's result
    ``key``, of ``offer`` (as the hub rebuilds it from what it offered) and the result as
    it arrived."""
    given = given_of(offer.lease, offer.project, offer.task, offer.digest, offer.input, offer.files)
    returned = returned_of(
        result.ok,
        result.result,
        result.error,
        result.cpu_seconds,
        result.wall_seconds,
        result.files,
    )
    digest = transcript_digest(node_id_for(hello.public_key), given, returned)
    check_result_mac(key, result.mac, digest)


async def test_the_result_is_authenticated_spooled_with_its_digest_and_resent_alike(
    setup: Setup,
) -> None:
    hub = await setup.connections.get()
    hello = await hub.handshake(resumed=[])
    hub.send(Offer(tasks=[setup.offer]))
    ask = await hub.expect(FetchBundle)
    hub.send(BundleChunk(digest=ask.digest, offset=0, total=len(setup.bundle), data=setup.bundle))
    assert (await hub.expect(Accept)).leases == [1]
    for _ in range(3):
        serve_file(hub, await hub.expect(FetchFile))
    probe = await hub.expect(Upload)
    hub.send(UploadAck(lease=1, name=probe.name, received=probe.size))  # held already
    result = await hub.expect(Result)
    assert result.ok, result.error
    check_authenticated(hub.result_key, hello, setup.offer, result)
    with pytest.raises(AuthError):  # a relay changing the result would be caught
        check_authenticated(hub.result_key, hello, setup.offer, replace(result, result={"c": 1}))
    with pytest.raises(AuthError):  # ... and so would one that had changed the input
        check_authenticated(hub.result_key, hello, replace(setup.offer, input={"n": 1}), result)
    with pytest.raises(AuthError):  # ... and the key is the connection's alone
        check_authenticated(b"k" * 32, hello, setup.offer, result)
    record = setup.client.spool.load(1)
    assert record is not None and len(bytes.fromhex(record["transcript"])) == 32
    hub.close()  # the ack is lost

    hub = await setup.connections.get()
    hello = await hub.handshake(resumed=[])
    assert hello.leases == [1]  # still spooled
    probe = await hub.expect(Upload)
    hub.send(UploadAck(lease=1, name=probe.name, received=probe.size))
    again = await hub.expect(Result)
    assert replace(again, mac=b"") == replace(result, mac=b"")  # the same result ...
    assert again.mac != result.mac  # ... under this connection's key
    check_authenticated(hub.result_key, hello, setup.offer, again)
    hub.send(ResultAck(lease=1, accepted=True, reason=None))
    await spool_drained(setup)


async def spool_drained(setup: Setup) -> None:
    spool = setup.client.spool
    for _ in range(200):
        if not spool.leases() and not spool.output_dir(1).exists():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"spool still holds {spool.leases()}")
