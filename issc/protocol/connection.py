"""One end of an issc connection as a sans-I/O state machine.

The caller owns the socket: it passes received bytes to ``receive_data``, drains
``next_event`` until ``NEED_DATA``, and writes what ``send`` returns. This object
never blocks, never touches a socket, and knows nothing of asyncio, so the whole
protocol is testable with plain function calls.

Which message may be sent by whom in which state, and what state follows, is one
table, ``TRANSITIONS``; every check below is a lookup in it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from issc.errors import LocalProtocolError, RemoteProtocolError
from issc.protocol.framing import MAX_FRAME_SIZE, FrameDecoder, check_max_frame_size, encode_frame
from issc.protocol.messages import (
    Accept,
    BundleChunk,
    BundleRefused,
    Cancel,
    Challenge,
    Decline,
    Error,
    FetchBundle,
    FetchFile,
    FileChunk,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    Offer,
    PeerClosed,
    PeerOpened,
    Proof,
    Ready,
    Relayed,
    Result,
    ResultAck,
    Upload,
    UploadAck,
    Welcome,
    decode_message,
    encode_message,
)


class Role(enum.Enum):
    """Which end of the connection."""

    HUB = "hub"
    NODE = "node"


class State(enum.Enum):
    """The state of the whole connection (both ends agree on it)."""

    HANDSHAKE = "HANDSHAKE"
    """Connected; the node has not sent ``hello`` yet."""
    HELLO_SENT = "HELLO_SENT"
    """``hello`` sent; the hub's ``challenge`` (or ``error``) is awaited."""
    CHALLENGED = "CHALLENGED"
    """``challenge`` sent; the node's ``proof`` is awaited."""
    PROOF_SENT = "PROOF_SENT"
    """``proof`` sent; the hub verifies it, enrolls the node, and sends ``welcome`` (or
    ``error``)."""
    OPEN = "OPEN"
    """Handshake done; tasks flow."""
    CLOSED = "CLOSED"
    """``goodbye`` or ``error`` was sent, or the peer hung up; nothing more flows."""


class NeedData:
    """Event: no complete message is buffered; call ``receive_data`` first."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


class Closed:
    """Event: the connection is over; no message will follow."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLOSED"


NEED_DATA: Final = NeedData()
CLOSED: Final = Closed()

Event = Message | NeedData | Closed

_NODE_WORK: Final = (
    Heartbeat, Ready, Accept, Decline, BundleRefused, FetchBundle, FetchFile, Upload, Result,
    PeerOpened, Relayed, PeerClosed,
)  # fmt: skip
_HUB_WORK: Final = (
    Offer, Cancel, BundleChunk, FileChunk, UploadAck, ResultAck, HeartbeatAck,
    Relayed, PeerClosed,
)  # fmt: skip

TRANSITIONS: Final[Mapping[tuple[Role, State, type[Message]], State]] = MappingProxyType(
    {
        # Handshake: hello, challenge, proof, welcome. The hub may refuse at any of its
        # turns (limit, version, protocol, auth), and while it waits for the proof (a
        # timeout); the node may refuse a challenge it cannot answer.
        (Role.NODE, State.HANDSHAKE, Hello): State.HELLO_SENT,
        (Role.HUB, State.HANDSHAKE, Error): State.CLOSED,
        (Role.HUB, State.HELLO_SENT, Challenge): State.CHALLENGED,
        (Role.HUB, State.HELLO_SENT, Error): State.CLOSED,
        (Role.NODE, State.CHALLENGED, Proof): State.PROOF_SENT,
        (Role.NODE, State.CHALLENGED, Error): State.CLOSED,
        (Role.HUB, State.CHALLENGED, Error): State.CLOSED,
        (Role.HUB, State.PROOF_SENT, Welcome): State.OPEN,
        (Role.HUB, State.PROOF_SENT, Error): State.CLOSED,
        # Open: work flows both ways until one side ends it.
        **{(Role.NODE, State.OPEN, kind): State.OPEN for kind in _NODE_WORK},
        (Role.NODE, State.OPEN, Goodbye): State.CLOSED,
        (Role.NODE, State.OPEN, Error): State.CLOSED,
        **{(Role.HUB, State.OPEN, kind): State.OPEN for kind in _HUB_WORK},
        (Role.HUB, State.OPEN, Error): State.CLOSED,
    }
)
"""(sender, state, message type) -> next state. A missing key is an illegal message."""


class Connection:
    """The protocol state of one connection, seen from ``our_role``'s end."""

    __slots__ = (
        "_broken",
        "_closed_by_us",
        "_decoder",
        "_eof",
        "_state",
        "our_role",
        "their_role",
    )

    def __init__(self, our_role: Role, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        """Start in HANDSHAKE.

        Raises:
            ValueError: ``max_frame_size`` is not in 1 .. 2**32 - 1.
        """
        self.our_role: Final = our_role
        self.their_role: Final = Role.NODE if our_role is Role.HUB else Role.HUB
        self._state = State.HANDSHAKE
        self._decoder = FrameDecoder(max_frame_size)
        self._eof = False
        # Set when we sent goodbye/error: whatever the peer had in flight is then a
        # harmless race and is dropped, not an error.
        self._closed_by_us = False
        # The first RemoteProtocolError; once set, receiving is over for good.
        self._broken: RemoteProtocolError | None = None

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def max_frame_size(self) -> int:
        """The largest frame body sent or accepted, in bytes."""
        return self._decoder.max_frame_size

    def set_max_frame_size(self, max_frame_size: int) -> None:
        """Change the frame limit for both directions (after ``welcome`` announced it).

        Raises:
            ValueError: ``max_frame_size`` is not in 1 .. 2**32 - 1.
        """
        self._decoder.max_frame_size = check_max_frame_size(max_frame_size)

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes read from the peer; ``b""`` means the peer closed (EOF).

        Raises:
            RemoteProtocolError: the connection already failed on a protocol error.
            LocalProtocolError: data after EOF was passed in (a bug in the caller).
        """
        if self._broken is not None:
            raise self._unusable()
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() called with data after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._state is State.CLOSED and self._closed_by_us:
            return
        self._decoder.feed(data)

    def next_event(self) -> Message | NeedData | Closed:
        """Return the next message, ``NEED_DATA``, or ``CLOSED``.

        Raises:
            RemoteProtocolError: the peer broke the protocol: a bad frame or body, a
                message its role may not send in the current state (the error names
                role, state and tag), anything after its goodbye or error, or EOF in
                the middle of a frame. The connection is unusable afterwards, except
                that ``send`` still accepts an ``Error`` where the table allows one.
        """
        if self._broken is not None:
            raise self._unusable()
        if self._state is State.CLOSED and self._closed_by_us:
            return CLOSED
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._broken = exc
            raise

    def _next_event(self) -> Message | NeedData | Closed:
        body = self._decoder.next_frame()
        if body is None:
            if not self._eof:
                return CLOSED if self._state is State.CLOSED else NEED_DATA
            if self._decoder.buffered:
                raise RemoteProtocolError("connection closed mid-frame")
            self._state = State.CLOSED
            return CLOSED
        message = decode_message(body)
        key = (self.their_role, self._state, type(message))
        next_state = TRANSITIONS.get(key)
        if next_state is None:
            raise RemoteProtocolError(_illegal(*key))
        self._state = next_state
        return message

    def send(self, message: Message) -> bytes:
        """Return the bytes that put ``message`` on the wire, and advance the state.

        If this raises, nothing was sent and the state is unchanged, so the caller
        may still send something else (e.g. a ``Result`` with ``ok=False`` in place
        of one whose value could not be encoded).

        Raises:
            LocalProtocolError: our role may not send this message in this state (the
                error names role, state and tag); or the connection failed on a
                protocol error and ``message`` is not an ``Error``; or the message
                does not validate or exceeds the maximum frame size.
        """
        if self._broken is not None and not isinstance(message, Error):
            raise LocalProtocolError(
                f"connection failed ({self._broken}); only an error message may be sent"
            )
        key = (self.our_role, self._state, type(message))
        next_state = TRANSITIONS.get(key)
        if next_state is None:
            raise LocalProtocolError(_illegal(*key))
        data = encode_frame(encode_message(message), self._decoder.max_frame_size)
        self._state = next_state
        if next_state is State.CLOSED:
            self._closed_by_us = True
        return data

    def _unusable(self) -> RemoteProtocolError:
        error = RemoteProtocolError(f"connection unusable after protocol error: {self._broken}")
        error.__cause__ = self._broken
        return error


def _illegal(sender: Role, state: State, kind: type[Message]) -> str:
    """``"hub may not send 'offer' in state HANDSHAKE"``."""
    return f"{sender.value} may not send {kind.TAG!r} in state {state.value}"


def transitions_markdown() -> str:
    """``TRANSITIONS`` as a Markdown table; docs/protocol.md embeds it verbatim and a
    test keeps the two identical."""
    lines = ["| sender | state | message | next state |", "|---|---|---|---|"]
    for (sender, state, kind), next_state in TRANSITIONS.items():
        lines.append(f"| {sender.value} | {state.value} | `{kind.TAG}` | {next_state.value} |")
    return "\n".join(lines) + "\n"
