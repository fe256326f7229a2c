"""One error tree for issc; foreign exceptions are translated at layer edges."""

from __future__ import annotations


class IsscError(Exception):
    """Base of every error issc raises on purpose."""


class ConfigError(IsscError):
    """A config file is missing, unreadable, or has a bad key or value.

    The message names the file and the key path, e.g. ``hub.yaml: heartbeat_interval: ...``.
    """


class ProtocolError(IsscError):
    """The wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or not allowed in the current state."""


class KeyFormatError(IsscError):
    """A key file or a public key string is malformed."""


class AuthError(IsscError):
    """A node failed to prove who it is, or may not join: a signature that does not
    verify, an unknown volunteer under closed registration, a bad or used token."""


class BundleError(IsscError):
    """A project bundle is malformed, tampered with, or signed by an untrusted key."""


class TaskFileError(IsscError):
    """A task file in the inbox is malformed; ``line`` is 1-based where known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class StoreError(IsscError):
    """The database refused an operation."""


class ExecutionError(IsscError):
    """Project code could not be started or was killed by a limit."""


class FileTransferError(IsscError):
    """A task's input or output file could not be moved between hub and node: a chunk
    out of order, a size over its bound, a digest that does not match, a stalled peer."""
