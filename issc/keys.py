"""Ed25519 key files and the ``"ed25519:<base64>"`` public key string.

A project owner signs bundles with a private key kept in a PEM file (PKCS8, unencrypted,
mode 0600). Nodes pin the matching public key, written as ``ed25519:`` followed by the
standard base64 of the 32 raw public key bytes; that string is what ``issc-project keygen``
prints and what ``trusted_keys`` in node.yaml holds.

A node keeps its own key the same way (``<data_dir>/node.key``, made on first start by
``load_or_create_private_key``) and proves who it is with it (``issc.nodeauth``).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from issc.errors import KeyFormatError

PUBLIC_KEY_PREFIX = "ed25519:"
PUBLIC_KEY_BYTES = 32
# Key files are tiny; a bound keeps a mistaken path (a disk image, say) from being slurped.
MAX_KEY_FILE_BYTES = 64 * 1024


def public_key_path(private_key_path: Path) -> Path:
    """Return where ``generate_key`` writes the public key: the private key path plus ``.pub``."""
    return private_key_path.with_name(private_key_path.name + ".pub")


def generate_key(path: Path) -> str:
    """Create an Ed25519 key pair at ``path`` (private) and ``path.pub``; return the public string.

    Neither file is ever overwritten: both are created with O_EXCL.

    Raises:
        KeyFormatError: either file already exists or cannot be written (names the path).
    """
    key = Ed25519PrivateKey.generate()
    public = public_key_string(key.public_key())
    pub_path = public_key_path(path)
    _write_new_file(path, _private_pem(key), 0o600)
    try:
        _write_new_file(pub_path, (public + "\n").encode("ascii"), 0o644)
    except KeyFormatError:
        # Leave no half-made pair behind: a private key without its .pub would confuse.
        path.unlink(missing_ok=True)
        raise
    return public


def load_or_create_private_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The private key at ``path``, made there first if there is none; (key, created).

    A new key is written like ``generate_key`` writes one (PEM, mode 0600, O_EXCL) but
    without a ``.pub`` file. An existing file is never overwritten, not even when it is
    unreadable or not a key: that is an error for a person to look at, because a
    replaced key is a lost identity.

    Raises:
        KeyFormatError: the file exists but is not a usable key, or cannot be created.
    """
    if not os.path.lexists(path):
        key = Ed25519PrivateKey.generate()
        try:
            _write_new_file(path, _private_pem(key), 0o600)
            return key, True
        except KeyFormatError:
            if not os.path.lexists(path):
                raise
            # Another process made it between our check and our create: use theirs.
    return load_private_key(path), False


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a file that must not exist yet, with exactly ``mode``.

    Raises:
        KeyFormatError: the file exists or the write fails.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFormatError(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFormatError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            # The umask may have cleared bits; set the mode we promise explicitly.
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyFormatError(f"{path}: cannot write: {exc.strerror}") from None


def _read_key_file(path: Path) -> bytes:
    """Read a small key file.

    Raises:
        KeyFormatError: unreadable or larger than MAX_KEY_FILE_BYTES.
    """
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFormatError(f"{path}: cannot read key file: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFormatError(f"{path}: too large to be a key file")
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS8 PEM Ed25519 private key.

    Raises:
        KeyFormatError: the file is unreadable, not PEM, encrypted, or not an Ed25519 key.
    """
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when the PEM is encrypted and no password was given.
        raise KeyFormatError(f"{path}: encrypted private keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"{path}: not an Ed25519 private key")
    return key


def public_key_string(key: Ed25519PublicKey) -> str:
    """Return ``"ed25519:" + base64(raw 32 public bytes)``."""
    return PUBLIC_KEY_PREFIX + base64.b64encode(public_key_bytes(key)).decode("ascii")


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Parse an ``"ed25519:<base64>"`` string (surrounding whitespace is ignored).

    Only the canonical encoding is accepted, so that one key has exactly one string and
    string comparison of keys is sound.

    Raises:
        KeyFormatError: wrong prefix, bad or non-canonical base64, or not 32 bytes.
    """
    text = text.strip()
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise KeyFormatError(
            f"public key {_shorten(text)!r}: must start with {PUBLIC_KEY_PREFIX!r}"
        )
    encoded = text[len(PUBLIC_KEY_PREFIX) :]
    try:
        raw = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeyFormatError(f"public key {_shorten(text)!r}: bad base64") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise KeyFormatError(
            f"public key {_shorten(text)!r}: must be {PUBLIC_KEY_BYTES} bytes, got {len(raw)}"
        )
    if base64.b64encode(raw).decode("ascii") != encoded:
        raise KeyFormatError(f"public key {_shorten(text)!r}: non-canonical base64")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key_arg(value: str) -> Ed25519PublicKey:
    """Accept a public key string, or the path of a file holding one (e.g. ``KEYFILE.pub``).

    Raises:
        KeyFormatError: neither a valid key string nor a readable file holding one.
    """
    if value.strip().startswith(PUBLIC_KEY_PREFIX):
        return parse_public_key(value)
    path = Path(value)
    if not path.is_file():
        raise KeyFormatError(
            f"{value!r} is neither a public key string ({PUBLIC_KEY_PREFIX}...) nor a key file"
        )
    data = _read_key_file(path)
    if data.lstrip().startswith(b"-----BEGIN"):
        # The most likely slip: handing over the private key file instead of its .pub.
        raise KeyFormatError(
            f"{path}: holds a PEM key, not a public key string; use {public_key_path(path)}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFormatError(f"{path}: not a public key file (not UTF-8 text)") from None
    try:
        return parse_public_key(text)
    except KeyFormatError as exc:
        raise KeyFormatError(f"{path}: {exc}") from None


def _shorten(text: str, limit: int = 60) -> str:
    """Keep error messages readable when someone pastes something huge."""
    return text if len(text) <= limit else text[:limit] + "..."
