"""How a node proves who it is: the signed transcript of the handshake, and node ids.

A node owns an Ed25519 key (``<data_dir>/node.key``). On every connection the hub sends
a fresh random nonce (``challenge``) and the node signs a transcript that binds that
nonce to everything its ``hello`` claims about who it is (``proof``):

    b"issc-node-auth-v1\\0" || nonce (32 bytes) || str(volunteer) || str(public_key)
        || opt(token)

    str(s) = uint32 big-endian length of the UTF-8 bytes || the UTF-8 bytes
    opt(x) = b"\\x00" if x is null, else b"\\x01" || str(x)

Length prefixes make the encoding unambiguous (no two claims give the same bytes), the
domain string keeps the signature from meaning anything in another protocol, and the
nonce makes every proof good for one connection only: a recorded handshake replayed
later meets a new nonce and fails. Because the volunteer and the key are inside the
signed bytes, a proof cannot be moved to another volunteer or another key.

A node's id is derived from its key, ``n-`` + the first 8 hex digits of the SHA-256 of
the 32 raw public key bytes, so it is stable across restarts and nobody can claim
another node's id without its key.

docs/protocol.md (section 5) is the specification.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from issc.errors import AuthError, KeyFormatError
from issc.keys import parse_public_key, public_key_bytes, public_key_string

AUTH_DOMAIN: Final = b"issc-node-auth-v1\0"
"""Prefix of every signed transcript; a new transcript layout gets a new version here."""
NONCE_BYTES: Final = 32
"""Length of the hub's ``challenge.nonce``."""
SIGNATURE_BYTES: Final = 64
"""Length of an Ed25519 signature (``proof.signature``)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """Who a node says it is: the fields of its ``hello`` that its proof covers."""

    volunteer: str
    public_key: str  # "ed25519:<base64>"
    token: str | None


def new_nonce() -> bytes:
    """A fresh challenge nonce from the operating system's CSPRNG."""
    return secrets.token_bytes(NONCE_BYTES)


def node_id_for(public_key: str) -> str:
    """The node id that belongs to a public key string.

    Raises:
        KeyFormatError: not a canonical ``ed25519:`` public key string.
    """
    raw = public_key_bytes(parse_public_key(public_key))
    return "n-" + hashlib.sha256(raw).hexdigest()[:8]


def transcript(nonce: bytes, claim: Claim) -> bytes:
    """The bytes a node signs to answer the challenge ``nonce``.

    Raises:
        ValueError: the nonce is not NONCE_BYTES long.
    """
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a challenge nonce is {NONCE_BYTES} bytes, not {len(nonce)}")
    token = b"\x00" if claim.token is None else b"\x01" + _field(claim.token)
    return AUTH_DOMAIN + nonce + _field(claim.volunteer) + _field(claim.public_key) + token


def _field(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def sign_proof(key: Ed25519PrivateKey, nonce: bytes, claim: Claim) -> bytes:
    """Sign the transcript of ``claim`` for ``nonce`` (the node's side).

    Raises:
        ValueError: ``claim.public_key`` is not the public half of ``key`` (signing a
            claim for another key would only be refused by the hub), or the nonce is
            not NONCE_BYTES long.
    """
    if public_key_string(key.public_key()) != claim.public_key:
        raise ValueError("the claim names another public key than the signing key's")
    return key.sign(transcript(nonce, claim))


def verify_proof(nonce: bytes, claim: Claim, signature: bytes) -> None:
    """Check a node's proof (the hub's side); returns only if it is good.

    Raises:
        AuthError: the public key is malformed, the signature has the wrong length, or
            it does not verify: made for another nonce (a replay), another volunteer,
            another token, or by another key.
    """
    try:
        public = parse_public_key(claim.public_key)
    except KeyFormatError as exc:
        raise AuthError(f"the node's public key is not valid: {exc}") from None
    if len(signature) != SIGNATURE_BYTES:
        raise AuthError(f"the proof's signature is {len(signature)} bytes, not {SIGNATURE_BYTES}")
    try:
        public.verify(signature, transcript(nonce, claim))
    except InvalidSignature:
        raise AuthError(
            "the proof does not verify: the signature was not made by this node's key "
            "over this connection's challenge and this hello's volunteer and token"
        ) from None
