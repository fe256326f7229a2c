"""Node authentication, pure parts: the signed transcript, proofs, the result key, node
ids, the node's key.

The hub's side over a real connection is in test_hub_handshake.py; enrollment rules and
tokens against a real database in tests/store/test_store_contract.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.store_enroll import hash_token
from issc.errors import AuthError, KeyFormatError
from issc.keys import load_or_create_private_key, public_key_bytes, public_key_string
from issc.nodeauth import (
    AUTH_DOMAIN,
    KEX_BYTES,
    NONCE_BYTES,
    Claim,
    Exchange,
    answer_challenge,
    new_kex,
    new_nonce,
    node_id_for,
    result_key,
    sign_proof,
    transcript,
    verify_proof,
)
from node.identity import KEY_FILE, NodeIdentity, node_id_in

ALICE_KEY = Ed25519PrivateKey.from_private_bytes(b"\x0a" * 32)
MALLORY_KEY = Ed25519PrivateKey.from_private_bytes(b"\x0b" * 32)
ALICE_PUB = public_key_string(ALICE_KEY.public_key())
MALLORY_PUB = public_key_string(MALLORY_KEY.public_key())
NONCE = bytes(range(NONCE_BYTES))
HUB_KEX = b"\x11" * KEX_BYTES
NODE_KEX = b"\x22" * KEX_BYTES
EXCHANGE = Exchange(NONCE, HUB_KEX, NODE_KEX)
CLAIM = Claim(volunteer="alice", public_key=ALICE_PUB, token=None)


# ---- transcript ---------------------------------------------------------------------------


def test_transcript_layout() -> None:
    claim = Claim(volunteer="alice", public_key=ALICE_PUB, token="tok")
    expected = (
        b"issc-node-auth-v2\x00"
        + NONCE
        + HUB_KEX
        + NODE_KEX
        + b"\x00\x00\x00\x05alice"
        + len(ALICE_PUB).to_bytes(4, "big")
        + ALICE_PUB.encode()
        + b"\x01\x00\x00\x00\x03tok"
    )
    assert transcript(EXCHANGE, claim) == expected
    assert transcript(EXCHANGE, CLAIM).endswith(ALICE_PUB.encode() + b"\x00")
    assert transcript(EXCHANGE, CLAIM).startswith(AUTH_DOMAIN)


def test_transcript_is_unambiguous() -> None:
    # No token and an empty token, or text moved between fields, give different bytes.
    variants = [
        Claim("alice", ALICE_PUB, None),
        Claim("alice", ALICE_PUB, ""),
        Claim("alic", ALICE_PUB, "e"),
        Claim("alice", ALICE_PUB, "\x00"),
    ]
    assert len({transcript(EXCHANGE, c) for c in variants}) == len(variants)


@pytest.mark.parametrize("field", ["nonce", "hub_kex", "node_kex"])
def test_transcript_needs_full_values(field: str) -> None:
    with pytest.raises(ValueError, match="32 bytes, not 5"):
        transcript(dataclasses.replace(EXCHANGE, **{field: b"short"}), CLAIM)


def test_nonces_are_fresh() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == NONCE_BYTES for n in nonces)


# ---- proofs --------------------------------------------------------------------------------


def test_a_proof_verifies() -> None:
    signature = sign_proof(ALICE_KEY, EXCHANGE, CLAIM)
    assert len(signature) == 64
    verify_proof(EXCHANGE, CLAIM, signature)  # does not raise


def test_a_replayed_proof_for_an_old_nonce_is_refused() -> None:
    old = sign_proof(ALICE_KEY, EXCHANGE, CLAIM)
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(dataclasses.replace(EXCHANGE, nonce=new_nonce()), CLAIM, old)


def test_a_proof_over_another_key_exchange_value_is_refused() -> None:
    # Something in the middle that put its own value in the challenge (to learn the
    # result key) gets a proof over that value, which the hub checks against its own.
    proof = sign_proof(ALICE_KEY, dataclasses.replace(EXCHANGE, hub_kex=b"\x33" * 32), CLAIM)
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(EXCHANGE, CLAIM, proof)
    # ... nor may it swap the node's value in the proof for its own.
    proof = sign_proof(ALICE_KEY, EXCHANGE, CLAIM)
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(dataclasses.replace(EXCHANGE, node_kex=b"\x33" * 32), CLAIM, proof)


def test_a_proof_with_a_short_key_exchange_value_is_refused() -> None:
    proof = sign_proof(ALICE_KEY, EXCHANGE, CLAIM)
    with pytest.raises(AuthError, match="key exchange value is 31 bytes, not 32"):
        verify_proof(dataclasses.replace(EXCHANGE, node_kex=b"\x22" * 31), CLAIM, proof)


def test_a_signature_by_another_key_is_refused() -> None:
    # Mallory claims alice's key but can only sign with his own.
    forged = MALLORY_KEY.sign(transcript(EXCHANGE, CLAIM))
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(EXCHANGE, CLAIM, forged)


def test_a_signature_cannot_be_moved_to_another_key() -> None:
    # Alice's genuine signature, presented with mallory's key in the claim.
    signature = sign_proof(ALICE_KEY, EXCHANGE, CLAIM)
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(EXCHANGE, Claim("alice", MALLORY_PUB, None), signature)


def test_a_signature_for_another_volunteer_is_refused() -> None:
    signature = sign_proof(ALICE_KEY, EXCHANGE, CLAIM)
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(EXCHANGE, Claim("mallory", ALICE_PUB, None), signature)


def test_a_signature_for_another_token_is_refused() -> None:
    signature = sign_proof(ALICE_KEY, EXCHANGE, Claim("alice", ALICE_PUB, "issc-one"))
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(EXCHANGE, Claim("alice", ALICE_PUB, "issc-two"), signature)
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(EXCHANGE, CLAIM, signature)


@pytest.mark.parametrize("length", [0, 63, 65])
def test_a_signature_of_the_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(AuthError, match=f"{length} bytes, not 64"):
        verify_proof(EXCHANGE, CLAIM, b"\x00" * length)


def test_a_malformed_public_key_is_refused() -> None:
    with pytest.raises(AuthError, match="public key is not valid"):
        verify_proof(EXCHANGE, Claim("alice", "ed25519:AAAA", None), b"\x00" * 64)


def test_a_node_does_not_sign_a_claim_for_another_key() -> None:
    with pytest.raises(ValueError, match="another public key"):
        sign_proof(MALLORY_KEY, EXCHANGE, CLAIM)


# ---- node ids ------------------------------------------------------------------------------


def test_node_id_is_derived_from_the_key() -> None:
    raw = public_key_bytes(ALICE_KEY.public_key())
    assert node_id_for(ALICE_PUB) == "n-" + hashlib.sha256(raw).hexdigest()[:8]
    assert node_id_for(ALICE_PUB) != node_id_for(MALLORY_PUB)


def test_node_id_of_a_malformed_key_is_an_error() -> None:
    with pytest.raises(KeyFormatError):
        node_id_for("ed25519:not-base64!")


# ---- tokens --------------------------------------------------------------------------------


def test_token_hash_is_sha256_hex() -> None:
    assert hash_token("issc-abc") == hashlib.sha256(b"issc-abc").hexdigest()
    assert hash_token("issc-abc") != hash_token("issc-abd")


# ---- the node's key ------------------------------------------------------------------------


def test_the_node_key_is_made_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert first.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()
    assert content.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = NodeIdentity.load_or_create(tmp_path)
    assert path.read_bytes() == content
    assert (again.node_id, again.public_key) == (first.node_id, first.public_key)
    assert first.node_id == node_id_for(first.public_key) == node_id_in(tmp_path)
    assert not (tmp_path / "node.key.pub").exists()  # the hub learns it from the hello


def test_each_data_dir_is_another_node(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = NodeIdentity.load_or_create(tmp_path / "a")
    two = NodeIdentity.load_or_create(tmp_path / "b")
    assert one.node_id != two.node_id


def test_a_node_key_is_made_with_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _, created = load_or_create_private_key(tmp_path / KEY_FILE)
    finally:
        os.umask(old)
    assert created
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_a_broken_node_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(b"not a key")
    with pytest.raises(KeyFormatError, match="not a PEM private key"):
        NodeIdentity.load_or_create(tmp_path)
    assert path.read_bytes() == b"not a key"


def test_a_node_key_readable_by_others_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = NodeIdentity.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="node.identity"):
        again = NodeIdentity.load_or_create(tmp_path)
    assert again.node_id == made.node_id
    assert "chmod 600" in caplog.text


def test_no_node_id_before_the_key_exists(tmp_path: Path) -> None:
    assert node_id_in(tmp_path) is None
    assert not (tmp_path / KEY_FILE).exists()  # asking does not make one


def test_the_identity_answers_challenges_the_hub_accepts(tmp_path: Path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    nonce = new_nonce()
    hub_private, hub_kex = new_kex()
    answer = identity.answer(nonce, hub_kex, "alice", "issc-tok")
    exchange = Exchange(nonce, hub_kex, answer.kex)
    verify_proof(exchange, Claim("alice", identity.public_key, "issc-tok"), answer.signature)
    assert answer.result_key == result_key(hub_private, exchange, answer.kex)
    with pytest.raises(ValueError):
        identity.answer(b"\x00" * 8, hub_kex, "alice", None)
    with pytest.raises(ValueError):
        identity.answer(nonce, hub_kex[:31], "alice", None)


# ---- the result key --------------------------------------------------------------------------


def test_both_sides_derive_the_same_result_key_and_nobody_else_does() -> None:
    hub_private, hub_kex = new_kex()
    answer = answer_challenge(ALICE_KEY, NONCE, hub_kex, CLAIM)
    exchange = Exchange(NONCE, hub_kex, answer.kex)
    assert len(answer.result_key) == 32
    assert result_key(hub_private, exchange, answer.kex) == answer.result_key
    # Someone who saw both public values but holds neither private key gets another key.
    other_private, _ = new_kex()
    assert result_key(other_private, exchange, answer.kex) != answer.result_key
    # A fresh exchange gives a fresh key: a key learnt on one connection is no use later.
    again = answer_challenge(ALICE_KEY, NONCE, hub_kex, CLAIM)
    assert again.kex != answer.kex and again.result_key != answer.result_key


@pytest.mark.parametrize("point", [bytes(32), b"\x01" + bytes(31)])
def test_a_key_exchange_value_of_small_order_is_refused(point: bytes) -> None:
    # Its secret is all zeros whoever the other side is: known to anyone in the middle.
    hub_private, hub_kex = new_kex()
    with pytest.raises(ValueError):
        result_key(hub_private, Exchange(NONCE, hub_kex, point), point)
    with pytest.raises(ValueError):
        answer_challenge(ALICE_KEY, NONCE, point, CLAIM)
