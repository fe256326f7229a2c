"""The issc wire protocol, sans I/O: bytes in, typed events out, bytes to send.

Typical use by a connection loop::

    conn = Connection(Role.HUB)
    conn.receive_data(chunk)          # b"" at EOF
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            break
        if event is CLOSED:
            ...                       # stop
        handlers[type(event)](event)
    writer.write(conn.send(Welcome(...)))

docs/protocol.md is the specification.
"""

from issc.protocol._schema import MAX_INT, MAX_JSON_DEPTH, MAX_LIST_LEN, MAX_STR_LEN
from issc.protocol.connection import (
    CLOSED,
    NEED_DATA,
    TRANSITIONS,
    Closed,
    Connection,
    Event,
    NeedData,
    Role,
    State,
    transitions_markdown,
)
from issc.protocol.framing import MAX_FRAME_SIZE, FrameDecoder, encode_frame
from issc.protocol.messages import (
    BUNDLE_CHUNK_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    RELAY_ENVELOPE_OVERHEAD,
    Accept,
    BundleChunk,
    BundleRefused,
    Cancel,
    Challenge,
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
    Offer,
    PeerClosed,
    PeerOpened,
    Proof,
    Ready,
    Relayed,
    Result,
    ResultAck,
    TaskOffer,
    Upload,
    UploadAck,
    Welcome,
    check_field_value,
    decode_message,
    encode_message,
)

__all__ = [
    "BUNDLE_CHUNK_SIZE",
    "CLOSED",
    "MAX_FRAME_SIZE",
    "MAX_INT",
    "MAX_JSON_DEPTH",
    "MAX_LIST_LEN",
    "MAX_STR_LEN",
    "MESSAGE_TYPES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "RELAY_ENVELOPE_OVERHEAD",
    "TRANSITIONS",
    "Accept",
    "BundleChunk",
    "BundleRefused",
    "Cancel",
    "Challenge",
    "Closed",
    "Connection",
    "Decline",
    "Error",
    "ErrorCode",
    "Event",
    "FetchBundle",
    "FetchFile",
    "FileChunk",
    "FileRef",
    "FrameDecoder",
    "Goodbye",
    "Heartbeat",
    "HeartbeatAck",
    "Hello",
    "Message",
    "NeedData",
    "Offer",
    "PeerClosed",
    "PeerOpened",
    "Proof",
    "Ready",
    "Relayed",
    "Result",
    "ResultAck",
    "Role",
    "State",
    "TaskOffer",
    "Upload",
    "UploadAck",
    "Welcome",
    "check_field_value",
    "decode_message",
    "encode_frame",
    "encode_message",
    "transitions_markdown",
]
