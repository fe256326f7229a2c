"""Framing: length prefix, limits checked before the body, stream splitting."""

from __future__ import annotations

import random
import struct

import pytest

from issc.errors import LocalProtocolError, RemoteProtocolError
from issc.protocol import MAX_FRAME_SIZE, FrameDecoder, encode_frame


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_default_max_frame_size_is_4_mib() -> None:
    assert MAX_FRAME_SIZE == 4 * 1024 * 1024
    assert FrameDecoder().max_frame_size == MAX_FRAME_SIZE


def test_encode_frame_prefixes_big_endian_length() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


def test_roundtrip_one_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"hello"))
    assert decoder.next_frame() == b"hello"
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


def test_byte_at_a_time() -> None:
    wire = encode_frame(b"first") + encode_frame(b"second")
    decoder = FrameDecoder()
    frames: list[bytes] = []
    for index in range(len(wire)):
        decoder.feed(wire[index : index + 1])
        frames += drain(decoder)
    assert frames == [b"first", b"second"]


def test_many_frames_in_one_chunk() -> None:
    bodies = [f"frame-{i}".encode() for i in range(1000)]
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_frame(body) for body in bodies))
    assert drain(decoder) == bodies
    assert decoder.buffered == 0


def test_random_chunking_of_large_stream_keeps_order_and_content() -> None:
    # Frames big enough to push the decoder through its compaction path.
    rng = random.Random(7)
    bodies = [rng.randbytes(rng.randint(1, 40_000)) for _ in range(300)]
    wire = b"".join(encode_frame(body) for body in bodies)
    decoder = FrameDecoder()
    frames: list[bytes] = []
    position = 0
    while position < len(wire):
        step = rng.randint(1, 100_000)
        decoder.feed(wire[position : position + step])
        position += step
        frames += drain(decoder)
        # Never more than one partial frame plus one chunk is held.
        assert decoder.buffered <= 40_004 + 100_000
    assert frames == bodies


def test_oversized_frame_refused_from_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    decoder.feed(struct.pack(">I", 3_000_000_000))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert "3000000000" in str(info.value)
    assert "1024" in str(info.value)


def test_oversized_frame_body_is_not_buffered() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    decoder.feed(struct.pack(">I", 1_000_000))
    for _ in range(10):
        decoder.feed(b"x" * 10_000)
    assert decoder.buffered == 0
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_good_frames_before_an_oversized_one_are_delivered() -> None:
    decoder = FrameDecoder(max_frame_size=16)
    decoder.feed(encode_frame(b"ok") + struct.pack(">I", 17) + b"x" * 17)
    assert decoder.next_frame() == b"ok"
    with pytest.raises(RemoteProtocolError, match="17 bytes"):
        decoder.next_frame()


def test_frame_of_exactly_max_size_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=16)
    decoder.feed(encode_frame(b"y" * 16, max_frame_size=16))
    assert decoder.next_frame() == b"y" * 16


def test_zero_length_frame_is_refused() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match="length 0"):
        decoder.next_frame()


def test_decoder_stays_broken_after_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()
    decoder.feed(encode_frame(b"late"))
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_encode_frame_refuses_too_large_body() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(b"z" * 11, max_frame_size=10)
    assert "11" in str(info.value)
    assert "10" in str(info.value)


def test_encode_frame_refuses_empty_body() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(b"")


def test_lowering_the_limit_applies_to_the_next_header() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"a" * 100)[:10])
    decoder.max_frame_size = 50
    decoder.feed(encode_frame(b"a" * 100)[10:] + encode_frame(b"b" * 51))
    assert decoder.next_frame() == b"a" * 100
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize("bad", [0, -1, 2**32, True])
def test_bad_limit_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=bad)
