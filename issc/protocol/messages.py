"""The typed messages of the issc wire protocol, and their msgpack encoding.

Each message is a frozen, slotted dataclass with a ``TAG``. On the wire a message is
a msgpack map ``{"t": TAG, field: value, ...}`` with exactly the dataclass's fields.
Decoding is strict because volunteers are untrusted: anything that is not exactly a
known message with well-typed, bounded fields raises ``RemoteProtocolError`` and is
never turned into an object. Field rules come from the type annotations (see
``_schema``), so they cannot drift from the definitions below.

docs/protocol.md describes what each message means.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Final, NoReturn, TypeVar

import msgpack

from issc.errors import LocalProtocolError, RemoteProtocolError
from issc.protocol._schema import SchemaViolation, StructCodec, show, type_name

PROTOCOL_VERSION: Final = 1
"""The protocol version this code speaks; sent in ``hello`` and ``welcome``."""

BUNDLE_CHUNK_SIZE: Final = 1024 * 1024
"""Bytes of bundle data the hub puts in one ``bundle_chunk``; far enough below the
default frame size that the message's other fields always fit beside it."""


RELAY_ENVELOPE_OVERHEAD: Final = 256
"""Bytes a ``relayed`` envelope adds around a frame, generously counted: a peer's frame
limit is its relay's limit minus this, so every envelope fits the relay's frames."""

RESERVED_BYTE: Final = "reserved byte 0xc1 (never used in msgpack)"
"""The detail of a body holding the one byte no msgpack format has (the C unpacker's
FormatError carries no message of its own)."""


class ErrorCode(enum.StrEnum):
    """Values of ``Error.code``. Receivers must accept codes they do not know."""

    PROTOCOL = "protocol"
    """The peer sent something malformed or not allowed in the current state."""
    VERSION = "version"
    """The peer speaks a protocol version we do not."""
    AUTH = "auth"
    """The node's proof failed, or it may not join: unknown volunteer under closed
    registration, a bad or used token, a key enrolled for another volunteer."""
    LIMIT = "limit"
    """A limit was exceeded: too many connections, slots, or a value out of range."""
    INTERNAL = "internal"
    """The sender failed on its own; the peer did nothing wrong and may retry later."""
    RELAY = "relay"
    """Something between the node and the hub (a relay) altered what passed through it:
    a result whose MAC does not check, a bundle that failed the node's checks.
    The node should reach the hub by another address for a while."""


class Message:
    """Base class of every top-level message; subclasses set ``TAG``."""

    __slots__ = ()
    TAG: ClassVar[str]


_CODECS: dict[str, StructCodec] = {}
_M = TypeVar("_M", bound=Message)


def _register(cls: type[_M]) -> type[_M]:
    """Add a message class to the registry (applied after @dataclass, which may
    replace the class when it adds slots)."""
    if cls.TAG in _CODECS:
        raise TypeError(f"duplicate message tag {cls.TAG!r}")
    _CODECS[cls.TAG] = StructCodec(cls, tag=cls.TAG)
    return cls


# ---------------------------------------------------------------- nested records


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRef:
    """A file by name and content: a task's input (``in/NAME``) or output (``out/NAME``).

    Encoded as a map without ``"t"``. ``name`` is a plain file name; ``sha256`` is hex.
    """

    name: str
    sha256: str
    size: int


# ---------------------------------------------------------------- node -> hub


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """First message of a connection: who the node is and what it offers.

    ``volunteer``, ``public_key`` and ``token`` are the claim the node's ``proof``
    signs (issc.nodeauth); the hub believes none of them before the proof verifies.
    """

    TAG: ClassVar[str] = "hello"
    protocol: int
    software: str
    volunteer: str
    token: str | None  # enrollment token; looked at only when the key is new to the hub
    public_key: str  # the node's own key, "ed25519:<base64>"; its node id derives from it
    projects: list[str]
    slots: int
    leases: list[int]  # leases still held: running, or finished and not yet acknowledged


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Proof(Message):
    """The node's answer to ``challenge``: its ephemeral X25519 public key, and its key's
    signature over the transcript of the challenge, that key and the hello's claim
    (issc.nodeauth.transcript)."""

    TAG: ClassVar[str] = "proof"
    signature: bytes  # 64 bytes, Ed25519
    kex: bytes  # 32 bytes, X25519: the node's half of the connection's result key


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """The node is alive; ``running`` lists the leases it holds."""

    TAG: ClassVar[str] = "heartbeat"
    running: list[int]


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(Message):
    """The node has ``free`` slots not covered by outstanding offers (replaces, not adds)."""

    TAG: ClassVar[str] = "ready"
    free: int


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Accept(Message):
    """The node takes these offered leases (TA -> A; an attempt is counted)."""

    TAG: ClassVar[str] = "accept"
    leases: list[int]


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Decline(Message):
    """The node gives these offered or running leases back; no attempt is counted."""

    TAG: ClassVar[str] = "decline"
    leases: list[int]
    reason: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class BundleRefused(Message):
    """A bundle failed verification; the offers in ``leases`` each fail an attempt."""

    TAG: ClassVar[str] = "bundle_refused"
    project: str
    digest: str
    reason: str
    leases: list[int]


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class FetchBundle(Message):
    """Ask for the bundle with ``digest``, starting at byte ``offset``."""

    TAG: ClassVar[str] = "fetch_bundle"
    digest: str
    offset: int


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class FetchFile(Message):
    """Ask for an input file's bytes from ``offset`` (a resumed download starts mid-file)."""

    TAG: ClassVar[str] = "fetch_file"
    sha256: str
    offset: int


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Upload(Message):
    """A chunk of an output file of lease ``lease``, at ``offset`` of ``size`` bytes.

    An empty ``data`` at offset 0 asks the hub how much it already holds (upload_ack).
    """

    TAG: ClassVar[str] = "upload"
    lease: int
    name: str
    sha256: str
    size: int
    offset: int
    data: bytes


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Result(Message):
    """The outcome of one lease."""

    TAG: ClassVar[str] = "result"
    lease: int
    project: str
    task: str
    ok: bool
    result: Any
    error: str | None
    cpu_seconds: float
    wall_seconds: float
    files: list[FileRef]  # output files, uploaded (upload) before the result is sent
    mac: bytes  # HMAC-SHA256 under the connection's result key (issc.resultmac)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(Message):
    """The node closes the connection on purpose."""

    TAG: ClassVar[str] = "goodbye"
    reason: str


# ---------------------------------------------------------------- hub -> node


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge(Message):
    """The hub asks the node to prove it holds the key its hello names."""

    TAG: ClassVar[str] = "challenge"
    nonce: bytes  # 32 random bytes, fresh for every connection
    kex: bytes  # 32 bytes, X25519, fresh for every connection: the hub's half of the result key


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Message):
    """The hub accepts the node; ends the handshake."""

    TAG: ClassVar[str] = "welcome"
    protocol: int
    node_id: str  # derived from the node's key (issc.nodeauth.node_id_for)
    heartbeat_interval: float
    heartbeat_misses: int
    max_frame_size: int
    resumed: list[int]  # the hello's leases the hub still honours


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskOffer:
    """One task inside an ``Offer``; encoded as a map without ``"t"``."""

    lease: int
    project: str
    task: str
    version: int
    digest: str
    size: int
    input: Any
    files: list[FileRef]  # input files, fetched by digest with fetch_file


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Offer(Message):
    """The hub offers tasks; each becomes a TA lease until accepted or declined."""

    TAG: ClassVar[str] = "offer"
    tasks: list[TaskOffer]


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Message):
    """The node must stop these leases and drop their results."""

    TAG: ClassVar[str] = "cancel"
    leases: list[int]
    reason: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class BundleChunk(Message):
    """Bytes ``offset`` .. ``offset + len(data)`` of a bundle of ``total`` bytes."""

    TAG: ClassVar[str] = "bundle_chunk"
    digest: str
    offset: int
    total: int
    data: bytes


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class FileChunk(Message):
    """Bytes ``offset`` .. ``offset + len(data)`` of an input file of ``total`` bytes."""

    TAG: ClassVar[str] = "file_chunk"
    sha256: str
    offset: int
    total: int
    data: bytes


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class UploadAck(Message):
    """The hub holds ``received`` bytes of an output file durably; send from there.

    ``received == size`` means the file is complete and its digest checked. After a
    digest mismatch the hub discards the data and answers ``received: 0``.
    """

    TAG: ClassVar[str] = "upload_ack"
    lease: int
    name: str
    received: int


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class ResultAck(Message):
    """The hub has durably handled a result; the node may forget it."""

    TAG: ClassVar[str] = "result_ack"
    lease: int
    accepted: bool
    reason: str | None


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAck(Message):
    """Answer to a heartbeat."""

    TAG: ClassVar[str] = "heartbeat_ack"


# ---------------------------------------------------------------- relaying


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerOpened(Message):
    """Relay -> hub: a peer connected to the relay; ``relayed`` frames of it follow.

    ``peer`` is the relay's number for this one connection, larger than every number it
    used before on this uplink; ``address`` is where the peer connected from (shown to
    admins, never trusted)."""

    TAG: ClassVar[str] = "peer_opened"
    peer: int
    address: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Relayed(Message):
    """One whole frame (length header and body) of a peer's conversation with the hub,
    carried over the relay's own connection: relay -> hub what the peer sent, hub ->
    relay what the peer is to receive."""

    TAG: ClassVar[str] = "relayed"
    peer: int
    frame: bytes


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerClosed(Message):
    """The peer's connection ended (relay -> hub), or must be ended (hub -> relay)."""

    TAG: ClassVar[str] = "peer_closed"
    peer: int
    reason: str


# ---------------------------------------------------------------- either side


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """A fatal problem; the sender closes the connection after sending it."""

    TAG: ClassVar[str] = "error"
    code: str  # an ErrorCode value, but unknown codes must be tolerated
    message: str


MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = MappingProxyType(
    {tag: codec.cls for tag, codec in _CODECS.items()}
)
"""Every message class by its tag."""


# ---------------------------------------------------------------- encoding


class _ExtTypeRefused(Exception):
    """Raised from msgpack's ext_hook; turned into RemoteProtocolError by the caller."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _refuse_ext_type(code: int, data: bytes) -> NoReturn:
    # Extension types are how msgpack libraries smuggle arbitrary objects in; none of
    # our messages has one, so any occurrence is refused outright.
    raise _ExtTypeRefused(code)


def encode_message(message: Message) -> bytes:
    """Validate ``message`` and return its msgpack body (without the frame header).

    Raises:
        LocalProtocolError: a field has the wrong type or is out of bounds (a bug or
            an unchecked value on our side; the message names tag and field), or the
            value cannot be packed.
    """
    codec = _CODECS.get(getattr(message, "TAG", ""))
    if codec is None or type(message) is not codec.cls:
        raise LocalProtocolError(f"not a registered message: {type(message).__name__}")
    try:
        wire = codec.encode(message)
    except SchemaViolation as violation:
        raise LocalProtocolError(_describe(codec.tag, violation)) from None
    try:
        return msgpack.packb(wire, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:  # what packb raises on bad input
        raise LocalProtocolError(f"{codec.tag}: cannot encode: {exc}") from exc


def decode_message(body: bytes) -> Message:
    """Parse one frame body into a message.

    Raises:
        RemoteProtocolError: the body is not valid msgpack, contains an extension
            type, is not a map, has an unknown tag, or has a missing, extra, ill-typed
            or out-of-bounds field. The message names the tag and the field.
    """
    try:
        wire = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext_type,
            # timestamp=0 yields Timestamp objects (ext type -1 bypasses ext_hook);
            # the field checks then refuse them like any other foreign type.
            timestamp=0,
        )
    except _ExtTypeRefused as exc:
        raise RemoteProtocolError(f"msgpack extension type {exc.code} is not allowed") from None
    except (RecursionError, msgpack.exceptions.StackError):
        # The C unpacker stops at its own depth limit with StackError (a ValueError
        # without a message); the pure-Python one runs into Python's recursion limit.
        raise RemoteProtocolError("message nested too deeply to decode") from None
    except Exception as exc:
        # msgpack raises a mix of ValueError subclasses, TypeError, UnicodeDecodeError
        # and its own exceptions for malformed input; all mean the same thing here.
        # Some of their messages quote the input; keep what reaches logs short.
        detail = str(exc)[:200]
        if not detail and isinstance(exc, msgpack.exceptions.FormatError):
            # The C unpacker's FormatError says nothing: it means a type byte no format
            # has, and 0xc1 is the only such byte ("never used" in the msgpack spec).
            detail = RESERVED_BYTE
        raise RemoteProtocolError(
            f"malformed msgpack body: {type(exc).__name__}: {detail}"
        ) from exc
    if not isinstance(wire, dict):
        raise RemoteProtocolError(f"message body is a {type_name(wire)}, not a map")
    tag = wire.get("t")
    if not isinstance(tag, str):
        raise RemoteProtocolError(f"message has no string tag 't' (got {show(tag)})")
    codec = _CODECS.get(tag)
    if codec is None:
        raise RemoteProtocolError(f"unknown message tag {show(tag)}")
    try:
        message = codec.decode(wire)
    except SchemaViolation as violation:
        raise RemoteProtocolError(_describe(tag, violation)) from None
    assert isinstance(message, Message)  # StructCodec builds codec.cls, a Message
    return message


def _describe(tag: str | None, violation: SchemaViolation) -> str:
    """``"offer.tasks[0].lease: expected int, got bool"``."""
    where = violation.where()
    return f"{tag}.{where}: {violation.problem}" if where else f"{tag}: {violation.problem}"


def check_field_value(tag: str, field: str, value: object) -> None:
    """Check ``value`` against field ``field`` of the message tagged ``tag``.

    The node uses it to vet a task's result before putting it into a ``Result``:
    a program may print NaN or nest too deeply, and that must become a failed
    task, not a broken connection.

    Raises:
        KeyError: no such message or field.
        LocalProtocolError: the value would be refused (the message says why).
    """
    codec = _CODECS[tag].fields[field]
    try:
        codec.encode(value)
    except SchemaViolation as violation:
        violation.location.append(field)
        raise LocalProtocolError(_describe(tag, violation)) from None
