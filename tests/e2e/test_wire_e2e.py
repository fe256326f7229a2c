"""Malformed frames from raw TCP clients: each gets an error and a closed connection, while
a real node on the same hub keeps its leases and finishes its work."""

from __future__ import annotations

import dataclasses
import socket
import struct
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from e2e_harness import Cluster, GateProject, OwnerKey, wait_until, write_tasks

from issc.keys import public_key_string
from issc.nodeauth import Claim, answer_challenge
from issc.protocol import (
    PROTOCOL_VERSION,
    Challenge,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    Message,
    Proof,
    Result,
    ResultAck,
    Welcome,
    decode_message,
    encode_frame,
    encode_message,
)

pytestmark = pytest.mark.e2e


def frame(message: Message) -> bytes:
    data: bytes = encode_frame(encode_message(message))
    return data


def raw_frame(obj: object) -> bytes:
    body: bytes = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


MALLORY_KEY = Ed25519PrivateKey.generate()
HELLO = Hello(
    protocol=PROTOCOL_VERSION,
    software="raw-client/0",
    volunteer="mallory",
    token=None,
    public_key=public_key_string(MALLORY_KEY.public_key()),
    projects=["gate"],
    slots=1,
    leases=[],
)
RESULT = Result(
    lease=1,
    project="gate",
    task="t-0",
    ok=True,
    result=42,
    error=None,
    cpu_seconds=0.0,
    wall_seconds=0.0,
    files=[],
    mac=b"\x00" * 32,
)

# name: (bytes to send, fragment of the hub's error message)
CASES: dict[str, tuple[bytes, str]] = {
    "garbage body": (b"\x00\x00\x00\x08" + b"\xc1" * 8, ""),
    "http request": (b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n", "maximum frame size"),
    "oversized length": (struct.pack(">I", 64 * 1024 * 1024) + b"\x00" * 16, "maximum frame size"),
    "zero length": (b"\x00\x00\x00\x00", "length 0"),
    "unknown tag": (raw_frame({"t": "frobnicate", "x": 1}), "frobnicate"),
    "result before hello": (frame(RESULT), "'result'"),
    "unknown tag after hello": (frame(HELLO) + raw_frame({"t": "frobnicate"}), "frobnicate"),
}


def read_messages(
    sock: socket.socket, decoder: FrameDecoder, until: type[Message]
) -> list[Message]:
    """Read from ``sock`` until a message of type ``until`` arrives; all messages so far."""
    messages: list[Message] = []
    while not any(isinstance(m, until) for m in messages):
        while (body := decoder.next_frame()) is not None:
            messages.append(decode_message(body))
        if not any(isinstance(m, until) for m in messages):
            chunk = sock.recv(65536)
            assert chunk, f"the hub hung up before sending {until.TAG}: {messages}"
            decoder.feed(chunk)
    return messages


def exchange(address: str, payload: bytes, timeout: float = 10.0) -> list[Message]:
    """Send ``payload``, read until the hub closes the connection; the messages it sent."""
    host, _, port = address.rpartition(":")
    data = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        while chunk := sock.recv(65536):  # a timeout here means the hub never hung up
            data += chunk
    decoder = FrameDecoder()
    decoder.feed(data)
    messages = []
    while (body := decoder.next_frame()) is not None:
        messages.append(decode_message(body))
    assert decoder.buffered == 0, f"trailing bytes after the hub's frames: {data!r}"
    return messages


def test_malformed_frames_get_an_error_and_the_hub_keeps_serving(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(gate_project.bundle)
    node = cluster.node(hub, trusted_keys={"gate": owner_key.public}, slots=2)
    node_id = node.wait_joined(hub)
    tasks = [(f"t-{i}", gate_project.task_input(i)) for i in range(2)]
    hub.submit(write_tasks(tmp_path / "two.jsonl", "gate", tasks))
    wait_until(
        lambda: [t["state"] for t in hub.query("tasks", project="gate")] == ["A", "A"],
        what="both tasks running on the real node",
    )

    for name, (payload, fragment) in CASES.items():
        messages = exchange(hub.addr, payload)
        assert messages, f"{name}: the hub closed without saying why"
        *before, last = messages
        assert isinstance(last, Error), f"{name}: {messages}"
        assert last.code == ErrorCode.PROTOCOL, f"{name}: {last}"
        assert fragment in last.message, f"{name}: {fragment!r} not in {last.message!r}"
        assert all(isinstance(m, Challenge) for m in before), f"{name}: {messages}"

    # A peer that hangs up in the middle of a frame costs the hub nothing.
    host, _, port = hub.addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(frame(HELLO)[:7])

    # A node may speak only for its own leases: a well-formed result for the real node's
    # lease, sent by another node, is turned down and changes nothing.
    leases = [h["id"] for t, _ in tasks for h in hub.lease_history("gate", t)]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        decoder = FrameDecoder()
        sock.sendall(frame(HELLO))
        challenge = read_messages(sock, decoder, Challenge)[-1]
        assert isinstance(challenge, Challenge)
        claim = Claim(HELLO.volunteer, HELLO.public_key, HELLO.token)
        answer = answer_challenge(MALLORY_KEY, challenge.nonce, challenge.kex, claim)
        sock.sendall(frame(Proof(signature=answer.signature, kex=answer.kex)))
        assert isinstance(read_messages(sock, decoder, Welcome)[-1], Welcome)
        forged = dataclasses.replace(RESULT, lease=leases[0], result="forged")
        sock.sendall(frame(forged))
        acks = [m for m in read_messages(sock, decoder, ResultAck) if isinstance(m, ResultAck)]
        assert [(a.lease, a.accepted) for a in acks] == [(leases[0], False)]

    assert hub.alive
    assert node_id in hub.connected_nodes()
    gate_project.open_gate()
    results = hub.wait_results("gate", 2)
    assert sorted(r["id"] for r in results) == ["t-0", "t-1"]
    # Never lost a lease over it: one attempt each, on the real node.
    assert {(r["state"], r["node"], r["attempts"]) for r in results} == {("C", node_id, 1)}
    assert all(r["result"] != "forged" for r in results)
