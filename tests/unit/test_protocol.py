"""The sans-I/O protocol: message encoding, strict decoding, and the connection table.

No event loop and no sockets: a ConnectionPair hands bytes from one Connection to
the other, the way h11's tests do.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from issc.errors import LocalProtocolError, RemoteProtocolError
from issc.protocol import (
    CLOSED,
    MAX_JSON_DEPTH,
    MAX_LIST_LEN,
    MAX_STR_LEN,
    MESSAGE_TYPES,
    NEED_DATA,
    PROTOCOL_VERSION,
    TRANSITIONS,
    Accept,
    BundleChunk,
    BundleRefused,
    Cancel,
    Challenge,
    Closed,
    Connection,
    Decline,
    Error,
    ErrorCode,
    FetchBundle,
    FetchFile,
    FileChunk,
    FileRef,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    NeedData,
    Offer,
    PeerClosed,
    PeerOpened,
    Proof,
    Ready,
    Relayed,
    Result,
    ResultAck,
    Role,
    State,
    TaskOffer,
    Upload,
    UploadAck,
    Welcome,
    check_field_value,
    decode_message,
    encode_frame,
    encode_message,
    transitions_markdown,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

HELLO = Hello(
    protocol=PROTOCOL_VERSION,
    software="issc-node/0.1.0",
    volunteer="alice",
    token=None,
    public_key="ed25519:" + "A" * 43 + "=",
    projects=["primes", "pi"],
    slots=2,
    leases=[7, 9],
)
CHALLENGE = Challenge(nonce=bytes(range(32)), kex=bytes(range(32, 64)))
PROOF = Proof(signature=b"\x01" * 64, kex=b"\x03" * 32)
WELCOME = Welcome(
    protocol=PROTOCOL_VERSION,
    node_id="n-3f2a0b1c",
    heartbeat_interval=5.0,
    heartbeat_misses=3,
    max_frame_size=4 * 1024 * 1024,
    resumed=[7],
)
RESULT = Result(
    lease=7,
    project="primes",
    task="r-17",
    ok=True,
    result={"count": 1229, "primes": [2, 3, 5], "ratio": 0.5, "note": None, "ok": True},
    error=None,
    cpu_seconds=0.41,
    wall_seconds=0.5,
    files=[FileRef(name="counts.json", sha256=DIGEST, size=120)],
    mac=b"\x02" * 32,
)

OFFER = Offer(
    tasks=[
        TaskOffer(
            lease=11,
            project="primes",
            task="r-17",
            version=3,
            digest=DIGEST,
            size=2048,
            input={"from": 0, "to": 10000},
            files=[FileRef(name="stopwords.txt", sha256=DIGEST, size=4096)],
        ),
        TaskOffer(
            lease=12,
            project="primes",
            task="r-18",
            version=3,
            digest=DIGEST,
            size=2048,
            input=[1, "two", 3.0, None, [], {}],
            files=[],
        ),
    ]
)

# One sample per message type; the registry test below fails when a new message
# is added without one.
SAMPLES: dict[str, Message] = {
    "hello": HELLO,
    "proof": PROOF,
    "heartbeat": Heartbeat(running=[7, 9]),
    "ready": Ready(free=2),
    "accept": Accept(leases=[11, 12]),
    "decline": Decline(leases=[13], reason="shutting down"),
    "bundle_refused": BundleRefused(
        project="primes", digest=DIGEST, reason="bad signature", leases=[14]
    ),
    "fetch_bundle": FetchBundle(digest=DIGEST, offset=1024),
    "fetch_file": FetchFile(sha256=DIGEST, offset=4096),
    "upload": Upload(lease=7, name="out.png", sha256=DIGEST, size=10, offset=4, data=b"abcdef"),
    "result": RESULT,
    "goodbye": Goodbye(reason="volunteer stopped the node"),
    "peer_opened": PeerOpened(peer=1, address="192.0.2.7:50312"),
    "relayed": Relayed(peer=1, frame=b"\x00\x00\x00\x01\x80"),
    "peer_closed": PeerClosed(peer=1, reason="the peer disconnected"),
    "challenge": CHALLENGE,
    "welcome": WELCOME,
    "offer": OFFER,
    "cancel": Cancel(leases=[9], reason="task cancelled by owner"),
    "bundle_chunk": BundleChunk(digest=DIGEST, offset=0, total=3, data=b"\x00\xff\x10"),
    "file_chunk": FileChunk(sha256=DIGEST, offset=0, total=3, data=b"abc"),
    "upload_ack": UploadAck(lease=7, name="out.png", received=10),
    "result_ack": ResultAck(lease=7, accepted=True, reason=None),
    "heartbeat_ack": HeartbeatAck(),
    "error": Error(code=ErrorCode.PROTOCOL, message="bad frame"),
}


class ConnectionPair:
    """A hub Connection and a node Connection wired back to back."""

    def __init__(self) -> None:
        self.hub = Connection(Role.HUB)
        self.node = Connection(Role.NODE)

    def conn(self, role: Role) -> Connection:
        return self.hub if role is Role.HUB else self.node

    def peer(self, role: Role) -> Connection:
        return self.node if role is Role.HUB else self.hub

    def send(self, sender: Role, *messages: Message) -> list[Message | NeedData | Closed]:
        """Send from ``sender``; return every event the other side sees, up to NEED_DATA."""
        data = b"".join(self.conn(sender).send(message) for message in messages)
        receiver = self.peer(sender)
        receiver.receive_data(data)
        return drain(receiver)

    def handshake(self) -> None:
        assert self.send(Role.NODE, HELLO) == [HELLO, NEED_DATA]
        assert self.send(Role.HUB, CHALLENGE) == [CHALLENGE, NEED_DATA]
        assert self.send(Role.NODE, PROOF) == [PROOF, NEED_DATA]
        assert self.send(Role.HUB, WELCOME) == [WELCOME, NEED_DATA]
        assert self.hub.state is self.node.state is State.OPEN

    def to_state(self, state: State) -> None:
        """Drive both ends into ``state`` by legal messages."""
        steps = [
            (State.HELLO_SENT, Role.NODE, HELLO),
            (State.CHALLENGED, Role.HUB, CHALLENGE),
            (State.PROOF_SENT, Role.NODE, PROOF),
            (State.OPEN, Role.HUB, WELCOME),
            (State.CLOSED, Role.NODE, Goodbye(reason="done")),
        ]
        for reached, sender, message in steps:
            if self.hub.state is state:
                return
            self.send(sender, message)
            assert self.hub.state is self.node.state is reached


def drain(conn: Connection) -> list[Message | NeedData | Closed]:
    events: list[Message | NeedData | Closed] = []
    while True:
        event = conn.next_event()
        events.append(event)
        if isinstance(event, NeedData | Closed):
            return events


def frame_of(wire: Any) -> bytes:
    """A frame holding any msgpack value, bypassing our encoder's checks."""
    return encode_frame(msgpack.packb(wire, use_bin_type=True))


def wire_of(message: Message) -> dict[str, Any]:
    decoded = msgpack.unpackb(encode_message(message), raw=False)
    assert isinstance(decoded, dict)
    return decoded


def remote_error(body: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(body)
    return str(info.value)


def nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# ------------------------------------------------------------------ messages


def test_every_registered_message_has_a_sample() -> None:
    assert set(SAMPLES) == set(MESSAGE_TYPES)
    for tag, sample in SAMPLES.items():
        assert type(sample) is MESSAGE_TYPES[tag]
        assert tag == sample.TAG


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
def test_roundtrip(tag: str) -> None:
    message = SAMPLES[tag]
    body = encode_message(message)
    assert decode_message(body) == message
    assert wire_of(message)["t"] == tag


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
def test_every_message_is_legal_somewhere(tag: str) -> None:
    assert any(kind is MESSAGE_TYPES[tag] for (_, _, kind) in TRANSITIONS)


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        HELLO.slots = 3  # type: ignore[misc]


def test_float_field_accepts_int_and_yields_float() -> None:
    wire = wire_of(RESULT) | {"cpu_seconds": 2}
    decoded = decode_message(msgpack.packb(wire))
    assert isinstance(decoded, Result)
    assert decoded.cpu_seconds == 2.0
    assert type(decoded.cpu_seconds) is float


def test_nested_task_offer_has_no_tag() -> None:
    assert set(wire_of(OFFER)["tasks"][0]) == {
        "lease",
        "project",
        "task",
        "version",
        "digest",
        "size",
        "input",
        "files",
    }


def test_error_code_roundtrips_as_plain_string() -> None:
    assert wire_of(Error(code=ErrorCode.AUTH, message="bad token"))["code"] == "auth"
    assert {code.value for code in ErrorCode} == {
        "protocol",
        "version",
        "auth",
        "limit",
        "internal",
        "relay",
    }


def test_unknown_error_code_is_tolerated() -> None:
    decoded = decode_message(msgpack.packb({"t": "error", "code": "future", "message": "x"}))
    assert decoded == Error(code="future", message="x")


def test_unknown_tag() -> None:
    assert "unknown message tag 'launch_missiles'" in remote_error(
        msgpack.packb({"t": "launch_missiles"})
    )


def test_unknown_tag_is_truncated_in_the_error() -> None:
    assert len(remote_error(msgpack.packb({"t": "x" * 10_000}))) < 200


@pytest.mark.parametrize("wire", [{}, {"t": 1}, {"t": None}, {"t": b"hello"}])
def test_missing_or_non_string_tag(wire: dict[str, Any]) -> None:
    assert "tag" in remote_error(msgpack.packb(wire, use_bin_type=True))


@pytest.mark.parametrize("wire", [[1, 2], 5, "hello", None, b"raw"])
def test_non_map_body(wire: Any) -> None:
    assert "not a map" in remote_error(msgpack.packb(wire, use_bin_type=True))


def test_missing_field_is_named() -> None:
    wire = wire_of(HELLO)
    del wire["slots"]
    assert remote_error(msgpack.packb(wire)) == "hello: missing field 'slots'"


def test_extra_field_is_named() -> None:
    wire = wire_of(Ready(free=1)) | {"bonus": 1}
    assert remote_error(msgpack.packb(wire)) == "ready: unexpected field 'bonus'"


def test_missing_field_in_nested_offer() -> None:
    wire = wire_of(OFFER)
    del wire["tasks"][1]["digest"]
    assert remote_error(msgpack.packb(wire)) == "offer.tasks[1]: missing field 'digest'"


WRONG_TYPES = [
    ("ready", "free", True, "expected int, got bool"),
    ("ready", "free", "2", "expected int, got str"),
    ("ready", "free", 1.0, "expected int, got float"),
    ("ready", "free", None, "expected int, got NoneType"),
    ("ready", "free", -1, "outside"),
    ("ready", "free", 2**63, "outside"),
    ("result", "cpu_seconds", math.nan, "not finite"),
    ("result", "cpu_seconds", math.inf, "not finite"),
    ("result", "cpu_seconds", -0.5, "negative"),
    ("result", "cpu_seconds", False, "expected float, got bool"),
    ("result", "ok", 1, "expected bool, got int"),
    ("result", "error", 5, "expected str, got int"),
    ("goodbye", "reason", b"bytes", "expected str, got bytes"),
    ("goodbye", "reason", "x" * (MAX_STR_LEN + 1), "exceeds"),
    ("bundle_chunk", "data", "text", "expected bytes, got str"),
    ("accept", "leases", 5, "expected list, got int"),
    ("accept", "leases", {"a": 1}, "expected list, got dict"),
    ("accept", "leases", [1] * (MAX_LIST_LEN + 1), "exceeds"),
    ("welcome", "resumed", [1, True], "expected int, got bool"),
    ("hello", "projects", ["ok", 3], "expected str, got int"),
    ("offer", "tasks", [5], "expected map, got int"),
]


@pytest.mark.parametrize(("tag", "field", "value", "problem"), WRONG_TYPES)
def test_wrong_type_is_refused_naming_tag_and_field(
    tag: str, field: str, value: Any, problem: str
) -> None:
    wire = wire_of(SAMPLES[tag]) | {field: value}
    error = remote_error(msgpack.packb(wire, use_bin_type=True))
    assert error.startswith(f"{tag}.{field}")
    assert problem in error


@pytest.mark.parametrize(("tag", "field", "value", "problem"), WRONG_TYPES)
def test_wrong_type_is_refused_on_send(tag: str, field: str, value: Any, problem: str) -> None:
    # Dataclasses do not check types at construction; encode_message does.
    sample: Any = SAMPLES[tag]
    bad = dataclasses.replace(sample, **{field: value})
    with pytest.raises(LocalProtocolError) as info:
        encode_message(bad)
    assert str(info.value).startswith(f"{tag}.{field}")
    assert problem.replace("expected map", "expected TaskOffer") in str(info.value)


def test_wrong_type_in_nested_offer_names_the_path() -> None:
    wire = wire_of(OFFER)
    wire["tasks"][1]["lease"] = True
    assert remote_error(msgpack.packb(wire)) == "offer.tasks[1].lease: expected int, got bool"


def test_str_and_list_at_their_limits_are_accepted() -> None:
    message = Decline(leases=[1] * MAX_LIST_LEN, reason="x" * MAX_STR_LEN)
    assert decode_message(encode_message(message)) == message


BAD_ANY = [
    ([math.nan], "not finite"),
    ({"x": math.inf}, "not finite"),
    (b"bytes", "bytes is not a JSON-like value"),
    ({"k": [b"nested bytes"]}, "bytes is not a JSON-like value"),
    ({b"key": 1}, "map key b'key' is not a str"),
    (msgpack.Timestamp(1, 0), "msgpack extension type (Timestamp)"),
    ([msgpack.Timestamp(1, 0)], "msgpack extension type (Timestamp)"),
    (nested_list(MAX_JSON_DEPTH + 1), "nested deeper than 64"),
]


@pytest.mark.parametrize(("value", "problem"), BAD_ANY)
def test_bad_any_value_is_refused(value: Any, problem: str) -> None:
    wire = wire_of(RESULT) | {"result": value}
    error = remote_error(msgpack.packb(wire, use_bin_type=True, datetime=False))
    assert error.startswith("result.result")
    assert problem in error


@pytest.mark.parametrize(("value", "problem"), BAD_ANY)
def test_bad_any_value_is_refused_on_send(value: Any, problem: str) -> None:
    with pytest.raises(LocalProtocolError, match=r"^result\.result"):
        check_field_value("result", "result", value)


def test_any_at_max_depth_is_accepted() -> None:
    message = Result(**{**vars_of(RESULT), "result": nested_list(MAX_JSON_DEPTH)})
    assert decode_message(encode_message(message)) == message


def test_any_refuses_tuples_on_send() -> None:
    with pytest.raises(LocalProtocolError):
        check_field_value("result", "result", (1, 2))


def test_check_field_value_accepts_good_values() -> None:
    check_field_value("result", "result", {"a": [1, 2.5, "x", None, True]})


def vars_of(message: Message) -> dict[str, Any]:
    return {name: getattr(message, name) for name in wire_of(message) if name != "t"}


def test_timestamp_in_int_field_is_refused() -> None:
    wire = wire_of(Ready(free=1)) | {"free": msgpack.Timestamp(5, 0)}
    assert "msgpack extension type" in remote_error(msgpack.packb(wire))


@pytest.mark.parametrize("code", [0, 5, 127])
def test_ext_type_is_refused(code: int) -> None:
    wire = wire_of(RESULT) | {"result": msgpack.ExtType(code, b"payload")}
    assert f"extension type {code}" in remote_error(msgpack.packb(wire))


def test_reserved_negative_ext_type_is_refused() -> None:
    # fixext 1 with type -2: msgpack.ExtType cannot even build it.
    assert "extension type -2" in remote_error(b"\xd4\xfe\x00")


def test_ext_type_in_a_key_position_is_refused() -> None:
    # A map whose key is an ext value: refused before any field check.
    body = b"\x81" + msgpack.packb(msgpack.ExtType(1, b"k")) + b"\x01"
    remote_error(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used byte
        b"\x82\xa1t",  # truncated map
        msgpack.packb({"t": "ready", "free": 1}) + b"\x00",  # trailing data
        b"\x81\xa1t\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x91" * 100_000 + b"\x00",  # arrays nested far deeper than any stack
        b"\x81" + b"\x90" + b"\x01",  # a list as a map key
    ],
)
def test_malformed_msgpack_is_refused(body: bytes) -> None:
    remote_error(body)


def test_encode_refuses_unregistered_objects() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(OFFER.tasks[0])  # type: ignore[arg-type]


def test_encode_refuses_unpackable_strings() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(Goodbye(reason="\udc80 lone surrogate"))


# ------------------------------------------------------------------ connection


def test_handshake_opens_both_ends() -> None:
    pair = ConnectionPair()
    assert pair.hub.state is pair.node.state is State.HANDSHAKE
    assert pair.hub.their_role is Role.NODE
    assert pair.node.their_role is Role.HUB
    pair.handshake()


def test_next_event_without_data_needs_data() -> None:
    assert Connection(Role.HUB).next_event() is NEED_DATA


def test_full_conversation() -> None:
    pair = ConnectionPair()
    pair.handshake()
    assert pair.send(Role.NODE, Ready(free=2)) == [Ready(free=2), NEED_DATA]
    offer = OFFER
    assert pair.send(Role.HUB, offer) == [offer, NEED_DATA]
    node_messages = [Accept(leases=[11, 12]), Heartbeat(running=[11, 12]), RESULT]
    assert pair.send(Role.NODE, *node_messages) == [*node_messages, NEED_DATA]
    ack = ResultAck(lease=7, accepted=True, reason=None)
    assert pair.send(Role.HUB, ack, HeartbeatAck()) == [ack, HeartbeatAck(), NEED_DATA]
    assert pair.send(Role.NODE, Goodbye(reason="bye")) == [Goodbye(reason="bye"), CLOSED]
    assert pair.hub.state is pair.node.state is State.CLOSED


def test_byte_at_a_time_through_a_connection() -> None:
    pair = ConnectionPair()
    data = pair.node.send(HELLO)
    events: list[Message | NeedData | Closed] = []
    for index in range(len(data)):
        pair.hub.receive_data(data[index : index + 1])
        events += [event for event in drain(pair.hub) if event is not NEED_DATA]
    assert events == [HELLO]


def test_many_messages_in_one_chunk() -> None:
    pair = ConnectionPair()
    pair.handshake()
    beats = [Heartbeat(running=[i]) for i in range(500)]
    assert pair.send(Role.NODE, *beats) == [*beats, NEED_DATA]


def _expected_illegal(sender: Role, state: State, tag: str) -> str:
    return f"{sender.value} may not send '{tag}' in state {state.value}"


ALL_CASES = list(
    itertools.product(
        [Role.HUB, Role.NODE],
        [State.HANDSHAKE, State.HELLO_SENT, State.CHALLENGED, State.PROOF_SENT, State.OPEN],
        sorted(SAMPLES),
    )
)


@pytest.mark.parametrize(("sender", "state", "tag"), ALL_CASES)
def test_send_and_receive_follow_the_table(sender: Role, state: State, tag: str) -> None:
    pair = ConnectionPair()
    pair.to_state(state)
    message = SAMPLES[tag]
    next_state = TRANSITIONS.get((sender, state, type(message)))
    if next_state is None:
        with pytest.raises(LocalProtocolError) as sent:
            pair.conn(sender).send(message)
        assert str(sent.value) == _expected_illegal(sender, state, tag)
        assert pair.conn(sender).state is state  # a refused send changes nothing
        # The same message forced onto the wire is refused by the receiver.
        receiver = pair.peer(sender)
        receiver.receive_data(encode_frame(encode_message(message)))
        with pytest.raises(RemoteProtocolError) as received:
            receiver.next_event()
        assert str(received.value) == _expected_illegal(sender, state, tag)
    else:
        assert pair.send(sender, message)[0] == message
        assert pair.hub.state is pair.node.state is next_state


def test_result_before_hello_names_role_state_and_tag() -> None:
    hub = Connection(Role.HUB)
    hub.receive_data(encode_frame(encode_message(RESULT)))
    with pytest.raises(RemoteProtocolError, match="node may not send 'result' in state HANDSHAKE"):
        hub.next_event()


def test_hub_may_not_offer_during_handshake() -> None:
    with pytest.raises(LocalProtocolError, match="hub may not send 'offer' in state HANDSHAKE"):
        Connection(Role.HUB).send(OFFER)


def test_second_hello_is_refused() -> None:
    pair = ConnectionPair()
    pair.send(Role.NODE, HELLO)
    with pytest.raises(LocalProtocolError, match="HELLO_SENT"):
        pair.node.send(HELLO)


def test_no_welcome_without_a_proof() -> None:
    # The hub cannot skip the challenge, nor welcome a node that has not answered it.
    pair = ConnectionPair()
    pair.send(Role.NODE, HELLO)
    with pytest.raises(LocalProtocolError, match="hub may not send 'welcome' in state HELLO_SENT"):
        pair.hub.send(WELCOME)
    pair.send(Role.HUB, CHALLENGE)
    with pytest.raises(LocalProtocolError, match="hub may not send 'welcome' in state CHALLENGED"):
        pair.hub.send(WELCOME)


def test_proof_before_the_challenge_is_refused() -> None:
    pair = ConnectionPair()
    pair.send(Role.NODE, HELLO)
    pair.hub.receive_data(encode_frame(encode_message(PROOF)))
    with pytest.raises(RemoteProtocolError, match="node may not send 'proof' in state HELLO_SENT"):
        pair.hub.next_event()


def test_hub_may_refuse_a_proof_with_auth() -> None:
    pair = ConnectionPair()
    pair.to_state(State.PROOF_SENT)
    refusal = Error(code=ErrorCode.AUTH, message="the proof does not verify")
    assert pair.send(Role.HUB, refusal) == [refusal, CLOSED]
    assert pair.hub.state is pair.node.state is State.CLOSED


def test_hub_may_refuse_before_hello() -> None:
    pair = ConnectionPair()
    refusal = Error(code=ErrorCode.LIMIT, message="too many connections")
    assert pair.send(Role.HUB, refusal) == [refusal, CLOSED]
    assert pair.hub.state is pair.node.state is State.CLOSED


def test_nothing_may_be_sent_after_goodbye() -> None:
    pair = ConnectionPair()
    pair.to_state(State.CLOSED)
    with pytest.raises(LocalProtocolError, match="node may not send 'heartbeat' in state CLOSED"):
        pair.node.send(Heartbeat(running=[]))
    with pytest.raises(LocalProtocolError, match="hub may not send 'error' in state CLOSED"):
        pair.hub.send(Error(code=ErrorCode.INTERNAL, message="x"))


def test_anything_received_after_goodbye_is_refused() -> None:
    pair = ConnectionPair()
    pair.handshake()
    forged = encode_message(Heartbeat(running=[]))
    pair.hub.receive_data(pair.node.send(Goodbye(reason="bye")) + encode_frame(forged))
    assert pair.hub.next_event() == Goodbye(reason="bye")
    with pytest.raises(RemoteProtocolError, match="node may not send 'heartbeat' in state CLOSED"):
        pair.hub.next_event()


def test_after_their_goodbye_the_connection_reports_closed() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(Role.NODE, Goodbye(reason="bye"))
    assert pair.hub.next_event() is CLOSED
    pair.hub.receive_data(b"")
    assert pair.hub.next_event() is CLOSED


def test_messages_in_flight_after_our_goodbye_are_dropped() -> None:
    pair = ConnectionPair()
    pair.handshake()
    in_flight = pair.hub.send(OFFER)
    pair.node.send(Goodbye(reason="bye"))
    pair.node.receive_data(in_flight)
    assert pair.node.next_event() is CLOSED
    pair.node.receive_data(b"")
    assert pair.node.next_event() is CLOSED


def test_eof_between_frames_is_a_clean_close() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.node.receive_data(pair.hub.send(HeartbeatAck()))
    pair.node.receive_data(b"")
    assert pair.node.next_event() == HeartbeatAck()
    assert pair.node.next_event() is CLOSED
    assert pair.node.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        pair.node.send(Heartbeat(running=[]))


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
def test_peer_closes_mid_frame(cut: int) -> None:
    hub = Connection(Role.HUB)
    hub.receive_data(Connection(Role.NODE).send(HELLO)[:cut])
    hub.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="connection closed mid-frame"):
        hub.next_event()


def test_data_after_eof_is_a_caller_bug() -> None:
    hub = Connection(Role.HUB)
    hub.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        hub.receive_data(b"more")


def test_oversized_frame_refused_by_a_connection_from_its_header() -> None:
    hub = Connection(Role.HUB, max_frame_size=1000)
    hub.receive_data(struct.pack(">I", 2**31))
    with pytest.raises(RemoteProtocolError, match=r"2147483648 bytes.*1000 bytes"):
        hub.next_event()


def test_zero_length_frame_refused_by_a_connection() -> None:
    hub = Connection(Role.HUB)
    hub.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError):
        hub.next_event()


def test_unknown_tag_through_a_connection() -> None:
    hub = Connection(Role.HUB)
    hub.receive_data(frame_of({"t": "bogus"}))
    with pytest.raises(RemoteProtocolError, match="unknown message tag 'bogus'"):
        hub.next_event()


def test_connection_is_unusable_after_a_remote_error_except_for_sending_error() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.hub.receive_data(frame_of({"t": "ready", "free": True}))
    with pytest.raises(RemoteProtocolError, match=r"ready\.free"):
        pair.hub.next_event()
    with pytest.raises(RemoteProtocolError):
        pair.hub.next_event()
    with pytest.raises(RemoteProtocolError):
        pair.hub.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        pair.hub.send(HeartbeatAck())
    refusal = Error(code=ErrorCode.PROTOCOL, message="ready.free: expected int")
    pair.node.receive_data(pair.hub.send(refusal))
    assert pair.hub.state is State.CLOSED
    assert drain(pair.node) == [refusal, CLOSED]


def test_failed_send_leaves_state_unchanged() -> None:
    pair = ConnectionPair()
    pair.handshake()
    bad = Result(**{**vars_of(RESULT), "result": [math.nan]})
    with pytest.raises(LocalProtocolError, match=r"result\.result\[0\]: float nan is not finite"):
        pair.node.send(bad)
    failure = Result(**{**vars_of(RESULT), "ok": False, "result": None, "error": "NaN"})
    assert pair.send(Role.NODE, failure) == [failure, NEED_DATA]


def test_send_refuses_frames_over_the_limit() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.hub.set_max_frame_size(1024)
    with pytest.raises(LocalProtocolError, match="exceeds the maximum frame size"):
        pair.hub.send(BundleChunk(digest="d", offset=0, total=2000, data=b"x" * 2000))
    assert pair.hub.state is State.OPEN


def test_lowered_limit_applies_to_received_frames() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.node.set_max_frame_size(1024)
    pair.node.receive_data(
        pair.hub.send(BundleChunk(digest="d", offset=0, total=2000, data=b"x" * 2000))
    )
    with pytest.raises(RemoteProtocolError, match="maximum frame size is 1024"):
        pair.node.next_event()


def test_set_max_frame_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Connection(Role.NODE).set_max_frame_size(0)


def test_docs_embed_the_transition_table() -> None:
    assert transitions_markdown() in DOCS.read_text(encoding="utf-8")


def test_docs_embed_the_task_lifecycle_table() -> None:
    # docs/protocol.md describes the lifecycle the hub runs; keep it in step with the code.
    from hub.lifecycle import transition_table_markdown

    assert transition_table_markdown() in DOCS.read_text(encoding="utf-8")
