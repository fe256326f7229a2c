"""Property tests of the wire decoder: whatever a peer sends, the hub and the node get
messages or a ``RemoteProtocolError``, in bounded time and memory.

The entry point under test is the one both ends use: ``Connection.receive_data`` then
``Connection.next_event`` until ``NEED_DATA`` (hub/session.py, node/client.py), and
``FrameDecoder`` + ``decode_message`` for a relayed frame (node/relay.py). Inputs range
from arbitrary bytes to near-valid frames: mutated msgpack of real messages, valid
msgpack of the wrong shape, huge announced lengths, deep nesting, extension types.

Hypothesis runs derandomized and without an example database, so CI sees the same
examples every run; ``ISSC_FUZZ=deep`` runs many more random ones locally.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import struct
import tracemalloc
import typing
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from issc.errors import ProtocolError, RemoteProtocolError
from issc.protocol import (
    CLOSED,
    MAX_FRAME_SIZE,
    MAX_INT,
    MESSAGE_TYPES,
    NEED_DATA,
    TRANSITIONS,
    Challenge,
    Connection,
    FileRef,
    FrameDecoder,
    Hello,
    Message,
    Offer,
    Proof,
    Result,
    Role,
    State,
    TaskOffer,
    Welcome,
    decode_message,
    encode_frame,
    encode_message,
)

# ---- Hypothesis settings ------------------------------------------------------------------

DEEP = os.environ.get("ISSC_FUZZ") == "deep"


def fuzz(examples: int) -> Callable[[Any], Any]:
    """Settings for one property: fixed examples in CI, ``ISSC_FUZZ=deep`` for more."""
    return settings(
        max_examples=examples * 50 if DEEP else examples,
        derandomize=not DEEP,
        database=None,
        # "Never hangs": one example (a whole byte stream) has a second, on a slow box.
        deadline=timedelta(seconds=2),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# ---- strategies: valid messages, from the dataclasses themselves ----------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
"""What an ``Any`` field may hold: JSON-like, str keys, 64-bit ints, finite floats."""


def strategy_for(annotation: Any) -> st.SearchStrategy[Any]:
    """Valid values of one field type, mirroring issc.protocol._schema's rules."""
    if annotation is Any:
        return json_values
    if annotation is str:
        return st.text(max_size=12)
    if annotation is int:
        return st.integers(0, MAX_INT)
    if annotation is float:
        return st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
    if annotation is bool:
        return st.booleans()
    if annotation is bytes:
        return st.binary(max_size=40)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=3)
    if args and type(None) in args:
        (inner,) = (arg for arg in args if arg is not type(None))
        return st.none() | strategy_for(inner)
    if dataclasses.is_dataclass(annotation):
        return builds_dataclass(annotation)  # type: ignore[arg-type]
    raise TypeError(f"no strategy for {annotation!r}")


def builds_dataclass(cls: type[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.builds(cls, **fields)


MESSAGE_STRATEGIES = {cls: builds_dataclass(cls) for cls in MESSAGE_TYPES.values()}
messages: st.SearchStrategy[Message] = st.one_of(*MESSAGE_STRATEGIES.values())


def messages_of(kinds: frozenset[type[Message]]) -> st.SearchStrategy[Message]:
    return st.one_of(*(MESSAGE_STRATEGIES[k] for k in sorted(kinds, key=lambda k: k.TAG)))


def open_work(sender: Role) -> frozenset[type[Message]]:
    """What ``sender`` may send on an open connection without ending it."""
    return frozenset(
        kind
        for (role, state, kind), after in TRANSITIONS.items()
        if role is sender and state is State.OPEN and after is State.OPEN
    )


# ---- strategies: hostile input ----------------------------------------------------------------

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()  # NaN and infinities included
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
    | st.builds(msgpack.Timestamp, st.integers(-(2**33), 2**34), st.integers(0, 999_999_999))
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.binary(max_size=4) | st.integers(-5, 5), inner, max_size=4
        )
    ),
    max_leaves=12,
)
"""Anything msgpack can carry, most of it the wrong shape for a message."""


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def wire_of(message: Message) -> dict[str, Any]:
    unpacked = msgpack.unpackb(encode_message(message), raw=False)
    assert isinstance(unpacked, dict)
    return unpacked


@st.composite
def wrong_shapes(draw: st.DrawFn) -> bytes:
    """A real message's map with one field removed, added, or of another type, or a
    map with a known tag and random fields, or any msgpack value at all."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return pack(draw(msgpack_values))
    wire = wire_of(draw(messages))
    keys = sorted(k for k in wire if k != "t")
    if choice == 1 and keys:
        wire[draw(st.sampled_from(keys))] = draw(msgpack_values)
    elif choice == 2 and keys:
        del wire[draw(st.sampled_from(keys))]
    else:
        wire[draw(st.text(max_size=6))] = draw(msgpack_values)
    return pack(wire)


@st.composite
def mutated(draw: st.DrawFn, body: st.SearchStrategy[bytes]) -> bytes:
    """A body with bytes overwritten, inserted or deleted, or cut short."""
    data = bytearray(draw(body))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        at = draw(st.integers(0, len(data)))
        if op == 0 and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            data[at:at] = draw(st.binary(min_size=1, max_size=5))
        elif op == 2:
            del data[at : at + draw(st.integers(1, 5))]
        else:
            del data[at:]
    return bytes(data)


def deep(opener: bytes, depth: int, leaf: bytes = b"\xc0") -> bytes:
    """``depth`` nested containers: b"\\x91" is a 1-list, b"\\x81\\xa1t" a 1-map of "t"."""
    return opener * depth + leaf


def pack_with(wire: dict[str, Any], key: str, raw: bytes) -> bytes:
    """``wire`` packed as a map, with the packed value of ``key`` replaced by ``raw``
    (msgpack's packer refuses to nest as deep as a hostile peer may)."""
    assert len(wire) < 16
    parts = [bytes([0x80 | len(wire)])]
    for name, value in wire.items():
        parts += [pack(name), raw if name == key else pack(value)]
    return b"".join(parts)


@st.composite
def deep_fields(draw: st.DrawFn) -> bytes:
    """A real message with a JSON-like (``Any``) field nested around MAX_JSON_DEPTH, or
    far past it (msgpack itself stops at 1024 levels)."""
    depth = draw(st.sampled_from([63, 64, 65, 500, 1000, 1023, 1024, 1025, 3000]))
    value = b"\x91" * depth + b"\x01"
    if draw(st.booleans()):
        return pack_with(wire_of(draw(MESSAGE_STRATEGIES[Result])), "result", value)
    task = wire_of(Offer(tasks=[draw(builds_dataclass(TaskOffer))]))["tasks"][0]
    return pack_with(
        {"t": "offer", "tasks": None}, "tasks", b"\x91" + pack_with(task, "input", value)
    )


nested = st.builds(
    deep,
    st.sampled_from([b"\x91", b"\x81\xa1t", b"\x81\xc0", b"\xdc\x00\x01"]),
    st.integers(1, 5000),
)
"""Nesting deeper than msgpack's stack, Python's recursion and MAX_JSON_DEPTH."""

lying_lengths = st.sampled_from(
    [
        b"\xdd\xff\xff\xff\xff",  # array of 2**32 - 1 items
        b"\xdf\xff\xff\xff\xff",  # map of 2**32 - 1 pairs
        b"\xdb\xff\xff\xff\xff",  # str of 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin of 4 GiB
        b"\xc9\xff\xff\xff\xff\x05",  # ext of 4 GiB
        b"\xd7\xff",  # fixext 8 timestamp, no data
        b"\xc7\x05\xff\x00\x00\x00\x00\x00",  # timestamp of a length msgpack does not define
        b"\xc1",  # the one byte msgpack never uses
        b"\xd4\x80\x00",  # fixext 1 of the reserved negative type -128
        b"\xc7\x00\xfe",  # ext 8 of type -2, empty
    ]
).flatmap(lambda head: st.binary(max_size=16).map(lambda tail: head + tail))

bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(encode_message, messages),
    mutated(st.builds(encode_message, messages)),
    wrong_shapes(),
    mutated(wrong_shapes()),
    nested,
    deep_fields(),
    lying_lengths,
)
"""Frame bodies, valid and not."""


@st.composite
def frames(draw: st.DrawFn, limit: int) -> bytes:
    """One frame: mostly an honest header, now and then one that lies."""
    body: bytes = draw(bodies)
    kind = draw(st.integers(0, 9))
    if kind == 0:  # an announced length larger than the limit, or zero
        size = draw(st.sampled_from([0, limit + 1, 2**32 - 1]) | st.integers(limit + 1, 2**32 - 1))
    elif kind == 1:  # a length that does not match what follows
        size = draw(st.integers(1, max(1, len(body) * 2)))
    else:
        size = len(body)
    return struct.pack(">I", size) + body


@st.composite
def streams(draw: st.DrawFn, limit: int) -> bytes:
    """A byte stream: frames back to back, or raw bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))
    return b"".join(draw(st.lists(frames(limit), min_size=1, max_size=4)))


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split at arbitrary points (every chunk non-empty)."""
    if not data:
        return []
    cuts = (
        draw(st.lists(st.integers(1, len(data) - 1), max_size=8, unique=True))
        if len(data) > 1
        else []
    )
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ---- connections in a given state ----------------------------------------------------------------

HELLO = Hello(
    protocol=1,
    software="fuzz",
    volunteer="v",
    token=None,
    public_key="ed25519:k",
    projects=["p"],
    slots=1,
    leases=[],
)
RESULT = Result(
    lease=1,
    project="p",
    task="t",
    ok=True,
    result=None,
    error=None,
    cpu_seconds=0.0,
    wall_seconds=0.0,
    files=[],
    mac=b"",
)
WELCOME = Welcome(
    protocol=1,
    node_id="n",
    heartbeat_interval=5.0,
    heartbeat_misses=3,
    max_frame_size=MAX_FRAME_SIZE,
    resumed=[],
)


def frame_of(message: Message) -> bytes:
    return encode_frame(encode_message(message))


def connection(role: Role, opened: bool, limit: int) -> Connection:
    """A connection at ``role``'s end, fresh or through the handshake (OPEN)."""
    conn = Connection(role, limit)
    if not opened:
        return conn
    if role is Role.HUB:
        conn.receive_data(frame_of(HELLO))
        assert conn.next_event() == HELLO
        conn.send(Challenge(nonce=b"n" * 32, kex=b"k" * 32))
        conn.receive_data(frame_of(Proof(signature=b"s" * 64, kex=b"x" * 32)))
        assert isinstance(conn.next_event(), Proof)
        conn.send(WELCOME)
    else:
        conn.send(HELLO)
        conn.receive_data(frame_of(Challenge(nonce=b"n" * 32, kex=b"k" * 32)))
        assert isinstance(conn.next_event(), Challenge)
        conn.send(Proof(signature=b"s" * 64, kex=b"x" * 32))
        conn.receive_data(frame_of(WELCOME))
        assert conn.next_event() == WELCOME
    assert conn.state is State.OPEN
    return conn


def drain(conn: Connection) -> Iterator[Message]:
    """What the session loops do: next_event until NEED_DATA or CLOSED."""
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return
        assert isinstance(event, Message), event
        yield event


def run(conn: Connection, chunks: list[bytes]) -> tuple[list[Message], ProtocolError | None]:
    """Feed the chunks, then EOF, as a session would; stop at the first protocol error.

    Anything but a ``RemoteProtocolError`` escapes and fails the property.
    """
    received: list[Message] = []
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            received.extend(drain(conn))
    except RemoteProtocolError as exc:
        # Broken for good: every later call says so, with the same error type.
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        with pytest.raises(RemoteProtocolError):
            conn.receive_data(b"more")
        return received, exc
    return received, None


def check_decoded(message: Message) -> None:
    """What the decoder accepted, the encoder accepts too, and it comes back the same."""
    assert type(message) in MESSAGE_TYPES.values()
    assert decode_message(encode_message(message)) == message


roles = st.sampled_from([Role.HUB, Role.NODE])
limits = st.sampled_from([MAX_FRAME_SIZE, 4096, 64, 1])

# ---- properties ---------------------------------------------------------------------------


@fuzz(300)
@given(body=bodies)
@example(body=deep(b"\x91", 100_000))
@example(body=deep(b"\x81\xa1t", 3000))
@example(body=pack({"t": "result", "result": msgpack.ExtType(5, b"")}))
@example(body=pack({"t": "error", "code": msgpack.Timestamp(0), "message": ""}))
@example(body=pack({"t": "heartbeat", "running": [2**64 - 1]}))
@example(body=pack({"t": "fetch_file", "sha256": ""}))  # a field missing
@example(body=pack_with({"t": "error", "code": "", "message": ""}, "code", b"\xc4\x00"))
@example(body=pack_with(wire_of(RESULT), "result", b"\x91" * 1000 + b"\x01"))  # deep Any
@example(body=pack_with(wire_of(RESULT), "result", b"\x91" * 64 + b"\x01"))  # at the limit
def test_any_body_decodes_to_a_message_or_a_remote_protocol_error(body: bytes) -> None:
    try:
        message = decode_message(body)
    except RemoteProtocolError as exc:
        assert len(str(exc)) < 1000  # peer-chosen text reaches logs only in short
        return
    check_decoded(message)


@fuzz(300)
@given(role=roles, opened=st.booleans(), limit=limits, data=st.data())
def test_any_stream_yields_messages_or_a_remote_protocol_error(
    role: Role, opened: bool, limit: int, data: st.DataObject
) -> None:
    conn = connection(role, opened, MAX_FRAME_SIZE)
    conn.set_max_frame_size(limit)
    stream = data.draw(streams(limit), label="stream")
    received, error = run(conn, data.draw(chunked(stream), label="chunks"))
    for message in received:
        check_decoded(message)
    if error is None:
        assert conn.state is State.CLOSED  # EOF with nothing pending ends the connection


@fuzz(120)
@given(role=roles, opened=st.booleans(), data=st.data())
def test_a_stream_split_anywhere_gives_the_same_outcome(
    role: Role, opened: bool, data: st.DataObject
) -> None:
    """Chunking is invisible: the same messages, and the same error, however it is cut."""
    stream = data.draw(streams(4096), label="stream")
    whole = run(connection(role, opened, 4096), [stream] if stream else [])
    pieces = run(connection(role, opened, 4096), data.draw(chunked(stream), label="chunks"))
    assert pieces[0] == whole[0]
    assert (pieces[1] is None) == (whole[1] is None)
    assert str(pieces[1]) == str(whole[1])


@fuzz(120)
@given(limit=limits, stream=streams(4096), data=st.data())
def test_a_relayed_frame_decodes_to_one_message_or_a_remote_protocol_error(
    limit: int, stream: bytes, data: st.DataObject
) -> None:
    """node/relay.py's path: a whole frame in one piece, one message out."""
    decoder = FrameDecoder(limit)
    decoder.feed(stream)
    try:
        body = decoder.next_frame()
        if body is None:
            return
        check_decoded(decode_message(body))
    except RemoteProtocolError:
        pass


# Memory: the decoder holds at most what it was fed, never what a header announces, and
# a body becomes Python objects at most AMPLIFICATION times its size. The worst case is a
# body of empty maps (one byte each, an 80-byte dict each once decoded): about 73 times
# (measured on CPython 3.11 with msgpack 1.1). The property pins that bound, so a change
# that makes it worse (buffering the announced length, copying per chunk) fails here.
AMPLIFICATION = 96
SLACK = 256 * 1024  # interpreter noise: frames of the test itself, small caches


@fuzz(60)
@given(role=roles, opened=st.booleans(), data=st.data())
@example(role=Role.HUB, opened=True, data=None)
def test_memory_stays_bounded_by_what_was_fed(
    role: Role, opened: bool, data: st.DataObject | None
) -> None:
    if data is None:
        # The worst known body: a map of one-byte empty maps, one frame, default limit.
        count = 50_000
        body = (
            b"\xdf"
            + struct.pack(">I", count)
            + b"".join(pack(str(i)) + b"\x80" for i in range(count))
        )
        chunks = [struct.pack(">I", len(body)) + body]
    else:
        kind = data.draw(st.integers(0, 2), label="kind")
        if kind == 0:
            # A large announced frame, trickled in: only what arrived may be held.
            announced = data.draw(st.integers(1, MAX_FRAME_SIZE), label="announced")
            sent = data.draw(st.integers(0, 50_000), label="sent")
            head = struct.pack(">I", announced)
            chunks = [head, *(b"\x91" * 1000 for _ in range(sent // 1000))]
        elif kind == 1:
            # Big containers of tiny items in one frame.
            count = data.draw(st.integers(1, 50_000), label="count")
            item = data.draw(st.sampled_from([b"\x80", b"\x90", b"\xc0", b"\x00"]), label="item")
            body = b"\xdd" + struct.pack(">I", count) + item * count
            chunks = [struct.pack(">I", len(body)) + body]
        else:
            stream = data.draw(streams(MAX_FRAME_SIZE), label="stream")
            chunks = data.draw(chunked(stream), label="chunks")
    conn = connection(role, opened, MAX_FRAME_SIZE)
    fed = sum(len(c) for c in chunks)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run(conn, chunks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= AMPLIFICATION * fed + SLACK, (peak, fed)


@fuzz(150)
@given(message=messages)
def test_every_valid_message_roundtrips(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


@fuzz(100)
@given(role=roles, data=st.data())
def test_valid_messages_survive_any_split_of_the_stream(role: Role, data: st.DataObject) -> None:
    """An open connection receives exactly what the peer sent, however the bytes arrive."""
    peer = Role.NODE if role is Role.HUB else Role.HUB
    sent = data.draw(st.lists(messages_of(open_work(peer)), max_size=6), label="sent")
    stream = b"".join(frame_of(m) for m in sent)
    conn = connection(role, True, MAX_FRAME_SIZE)
    received, error = run(conn, data.draw(chunked(stream), label="chunks"))
    assert error is None
    assert received == sent


def test_the_strategies_cover_every_message_and_nested_record() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES.values())
    assert {FileRef, TaskOffer} <= {
        typing.get_args(h)[0] if typing.get_origin(h) is list else h
        for cls in MESSAGE_TYPES.values()
        for h in typing.get_type_hints(cls).values()
    }
