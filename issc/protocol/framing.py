"""Length-prefixed framing: a 4-byte big-endian length N, then N bytes of body.

The decoder never buffers the body of a frame whose announced length exceeds the
limit: the header is judged as soon as its four bytes are in, so a peer cannot make
us hold gigabytes by announcing a large frame and trickling it in.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Final

from issc.errors import LocalProtocolError, RemoteProtocolError

MAX_FRAME_SIZE: Final = 4 * 1024 * 1024
"""Default upper bound on a frame's body, in bytes (4 MiB)."""

HEADER_SIZE: Final = 4
"""Bytes of the length prefix."""

# The length prefix is an unsigned 32-bit integer, so no limit can exceed this.
_LARGEST_ENCODABLE: Final = 0xFFFF_FFFF

# Consumed bytes are dropped from the front of the buffer only once they are both
# numerous and at least half the buffer: compaction is then amortised O(1) per byte,
# instead of one memmove of the whole buffer per frame.
_COMPACT_THRESHOLD: Final = 64 * 1024

_HEADER: Final = struct.Struct(">I")


def check_max_frame_size(max_frame_size: int) -> int:
    """Return ``max_frame_size`` if it is a usable limit.

    Raises:
        ValueError: it is not an int in 1 .. 2**32 - 1 (a bug in the caller, not
            something the peer did).
    """
    if (
        isinstance(max_frame_size, bool)
        or not isinstance(max_frame_size, int)
        or not 1 <= max_frame_size <= _LARGEST_ENCODABLE
    ):
        raise ValueError(
            f"max_frame_size must be an int in 1..{_LARGEST_ENCODABLE}, got {max_frame_size!r}"
        )
    return max_frame_size


def encode_frame(body: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Prefix ``body`` with its length.

    Raises:
        LocalProtocolError: ``body`` is empty or longer than ``max_frame_size``
            (the peer would refuse it, so it must never reach the wire).
    """
    size = len(body)
    if size == 0:
        raise LocalProtocolError("refusing to send an empty frame")
    if size > max_frame_size:
        raise LocalProtocolError(
            f"frame of {size} bytes exceeds the maximum frame size of {max_frame_size} bytes"
        )
    return _HEADER.pack(size) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies; bytes in, ``bytes`` frames out.

    ``feed`` never raises for what the peer sent; the first bad header is reported by
    the ``next_frame`` call that reaches it, after every good frame before it.
    """

    __slots__ = ("_buffer", "_error", "_max_frame_size", "_offset", "_pending_size")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        """Create an empty decoder.

        Raises:
            ValueError: ``max_frame_size`` is not in 1 .. 2**32 - 1.
        """
        self._max_frame_size = check_max_frame_size(max_frame_size)
        self._buffer = bytearray()
        # Start of the first unconsumed byte in _buffer.
        self._offset = 0
        # Body length of the frame at _offset once its header has been judged, so a
        # later change of the limit does not re-judge a frame already under way.
        self._pending_size: int | None = None
        # Once set, every later next_frame() raises it and feed() stops buffering.
        self._error: RemoteProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        """The largest body accepted, in bytes."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        # A frame whose header was already accepted keeps being buffered; the new
        # limit applies from the next header on.
        self._max_frame_size = check_max_frame_size(value)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes) -> None:
        """Append received bytes; raises nothing."""
        if self._error is not None:
            # The stream is already known to be bad: holding more of it helps no one.
            return
        self._buffer += data
        # Judge the pending header now, so a huge announced length stops buffering at
        # once even if the caller feeds several chunks before asking for a frame. The
        # error is remembered and raised by next_frame(), where callers expect it.
        with contextlib.suppress(RemoteProtocolError):
            self._check_pending_header()

    def next_frame(self) -> bytes | None:
        """Return the next complete frame body, or ``None`` if more bytes are needed.

        Raises:
            RemoteProtocolError: the next frame announces a length of zero or more
                than ``max_frame_size`` (the message names both numbers). The
                decoder stays broken: every later call raises the same error.
        """
        size = self._check_pending_header()
        if size is None:
            return None
        start = self._offset + HEADER_SIZE
        end = start + size
        if end > len(self._buffer):
            return None
        # One copy of exactly the frame's bytes; the views are released before any
        # later resize of the bytearray (a live export would make it raise BufferError).
        with memoryview(self._buffer) as view, view[start:end] as frame_view:
            frame = bytes(frame_view)
        self._offset = end
        self._pending_size = None
        self._compact()
        return frame

    def _check_pending_header(self) -> int | None:
        """Return the length of the pending frame, or None if its header is incomplete.

        Raises:
            RemoteProtocolError: the length is zero or too large (also remembered).
        """
        if self._error is not None:
            raise self._error
        if self._pending_size is not None:
            return self._pending_size
        if len(self._buffer) - self._offset < HEADER_SIZE:
            return None
        (size,) = _HEADER.unpack_from(self._buffer, self._offset)
        if size == 0:
            self._fail(RemoteProtocolError("peer sent a frame of length 0"))
        if size > self._max_frame_size:
            self._fail(
                RemoteProtocolError(
                    f"peer announced a frame of {size} bytes; the maximum frame size is "
                    f"{self._max_frame_size} bytes"
                )
            )
        self._pending_size = int(size)
        return self._pending_size

    def _fail(self, error: RemoteProtocolError) -> None:
        """Remember ``error``, drop the buffer, and raise it."""
        self._error = error
        self._buffer = bytearray()
        self._offset = 0
        raise error

    def _compact(self) -> None:
        """Drop consumed bytes when that is cheap relative to the work done."""
        if self._offset == len(self._buffer):
            # The common case: everything consumed; clearing costs nothing.
            self._buffer.clear()
            self._offset = 0
        elif self._offset >= _COMPACT_THRESHOLD and self._offset * 2 >= len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0
