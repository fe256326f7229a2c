"""How a node proves who it is, the key its results are authenticated with, and node ids.

A node owns an Ed25519 key (``<data_dir>/node.key``). On every connection the hub sends
a fresh random nonce and an ephemeral X25519 public key (``challenge``); the node makes
an ephemeral X25519 key of its own and signs a transcript that binds both to everything
its ``hello`` claims about who it is (``proof``, which carries the node's X25519 key):

    b"issc-node-auth-v2\\0" || nonce (32 bytes) || hub_kex (32) || node_kex (32)
        || str(volunteer) || str(public_key) || opt(token)

    str(s) = uint32 big-endian length of the UTF-8 bytes || the UTF-8 bytes
    opt(x) = b"\\x00" if x is null, else b"\\x01" || str(x)

Length prefixes make the encoding unambiguous (no two claims give the same bytes), the
domain string keeps the signature from meaning anything in another protocol, and the
nonce makes every proof good for one connection only: a recorded handshake replayed
later meets a new nonce and fails. Because the volunteer and the key are inside the
signed bytes, a proof cannot be moved to another volunteer or another key.

Both sides then derive the connection's *result key* from the X25519 exchange
(``result_key``: HKDF-SHA256 of the shared secret, salted with the nonce, bound to both
public keys). Each ``result`` carries an HMAC under it (issc.resultmac) instead of a
signature of its own: a relay or anyone else in the middle sees both public keys but
not the secret, and cannot put its own key in the exchange, since the node's proof
signs the hub's public key as the node received it and the hub checks it against its
own. An HMAC costs microseconds where an Ed25519 verification costs a quarter of a
millisecond on this hardware, for every result.

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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from issc.errors import AuthError, KeyFormatError
from issc.keys import parse_public_key, public_key_bytes, public_key_string

AUTH_DOMAIN: Final = b"issc-node-auth-v2\0"
"""Prefix of every signed transcript; a new transcript layout gets a new version here."""
KEY_DOMAIN: Final = b"issc-result-key-v1\0"
"""HKDF's info prefix for a connection's result key."""
NONCE_BYTES: Final = 32
"""Length of the hub's ``challenge.nonce``."""
KEX_BYTES: Final = 32
"""Length of an X25519 public key (``challenge.kex``, ``proof.kex``)."""
SIGNATURE_BYTES: Final = 64
"""Length of an Ed25519 signature (``proof.signature``)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """Who a node says it is: the fields of its ``hello`` that its proof covers."""

    volunteer: str
    public_key: str  # "ed25519:<base64>"
    token: str | None


@dataclass(frozen=True, slots=True)
class Exchange:
    """One connection's handshake values: the hub's nonce and both ephemeral X25519
    public keys (raw bytes)."""

    nonce: bytes
    hub_kex: bytes
    node_kex: bytes

    def check(self) -> None:
        """Raises ValueError unless every value has its length."""
        for name, value, size in (
            ("nonce", self.nonce, NONCE_BYTES),
            ("hub key exchange value", self.hub_kex, KEX_BYTES),
            ("node key exchange value", self.node_kex, KEX_BYTES),
        ):
            if len(value) != size:
                raise ValueError(f"a challenge {name} is {size} bytes, not {len(value)}")


def new_nonce() -> bytes:
    """A fresh challenge nonce from the operating system's CSPRNG."""
    return secrets.token_bytes(NONCE_BYTES)


def new_kex() -> tuple[X25519PrivateKey, bytes]:
    """A fresh ephemeral X25519 key for one connection, and its public half's raw bytes."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public


def result_key(own: X25519PrivateKey, exchange: Exchange, peer_kex: bytes) -> bytes:
    """The connection's result key: HKDF-SHA256 of the X25519 secret of ``own`` and the
    peer's public key ``peer_kex``, salted with the nonce, bound to both public keys.

    Raises:
        ValueError: a value has the wrong length, or ``peer_kex`` is a point of small
            order (the secret would be all zeros, known to anyone).
    """
    exchange.check()
    secret = own.exchange(X25519PublicKey.from_public_bytes(peer_kex))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=exchange.nonce,
        info=KEY_DOMAIN + exchange.hub_kex + exchange.node_kex,
    ).derive(secret)


def node_id_for(public_key: str) -> str:
    """The node id that belongs to a public key string.

    Raises:
        KeyFormatError: not a canonical ``ed25519:`` public key string.
    """
    raw = public_key_bytes(parse_public_key(public_key))
    return "n-" + hashlib.sha256(raw).hexdigest()[:8]


def transcript(exchange: Exchange, claim: Claim) -> bytes:
    """The bytes a node signs to answer a challenge.

    Raises:
        ValueError: a value of ``exchange`` has the wrong length.
    """
    exchange.check()
    token = b"\x00" if claim.token is None else b"\x01" + _field(claim.token)
    return (
        AUTH_DOMAIN
        + exchange.nonce
        + exchange.hub_kex
        + exchange.node_kex
        + _field(claim.volunteer)
        + _field(claim.public_key)
        + token
    )


def _field(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def sign_proof(key: Ed25519PrivateKey, exchange: Exchange, claim: Claim) -> bytes:
    """Sign the transcript of ``claim`` for ``exchange`` (the node's side).

    Raises:
        ValueError: ``claim.public_key`` is not the public half of ``key`` (signing a
            claim for another key would only be refused by the hub), or a value of
            ``exchange`` has the wrong length.
    """
    if public_key_string(key.public_key()) != claim.public_key:
        raise ValueError("the claim names another public key than the signing key's")
    return key.sign(transcript(exchange, claim))


@dataclass(frozen=True, slots=True)
class Answer:
    """The node's side of a challenge: what its ``proof`` carries, and the result key."""

    signature: bytes
    kex: bytes
    result_key: bytes


def answer_challenge(key: Ed25519PrivateKey, nonce: bytes, hub_kex: bytes, claim: Claim) -> Answer:
    """A fresh key exchange value, the proof's signature over it, and the result key.

    Raises:
        ValueError: as sign_proof and result_key (a value of the wrong length, a claim
            for another key, a hub key exchange value of small order).
    """
    kex_private, node_kex = new_kex()
    exchange = Exchange(nonce, hub_kex, node_kex)
    signature = sign_proof(key, exchange, claim)
    return Answer(signature, node_kex, result_key(kex_private, exchange, hub_kex))


def verify_proof(exchange: Exchange, claim: Claim, signature: bytes) -> None:
    """Check a node's proof (the hub's side); returns only if it is good.

    Raises:
        AuthError: the public key is malformed, the signature has the wrong length, or
            it does not verify: made for another nonce (a replay), another key
            exchange value (one put in by something in the middle), another volunteer,
            another token, or by another key; or the node's key exchange value has the
            wrong length.
    """
    try:
        public = parse_public_key(claim.public_key)
    except KeyFormatError as exc:
        raise AuthError(f"the node's public key is not valid: {exc}") from None
    if len(signature) != SIGNATURE_BYTES:
        raise AuthError(f"the proof's signature is {len(signature)} bytes, not {SIGNATURE_BYTES}")
    if len(exchange.node_kex) != KEX_BYTES:
        raise AuthError(
            f"the proof's key exchange value is {len(exchange.node_kex)} bytes, not {KEX_BYTES}"
        )
    try:
        public.verify(signature, transcript(exchange, claim))
    except InvalidSignature:
        raise AuthError(
            "the proof does not verify: the signature was not made by this node's key "
            "over this connection's challenge and this hello's volunteer and token"
        ) from None
