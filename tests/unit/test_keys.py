"""Ed25519 key files and the "ed25519:<base64>" public key string."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from issc.errors import KeyFormatError
from issc.keys import (
    generate_key,
    load_private_key,
    load_public_key_arg,
    parse_public_key,
    public_key_path,
    public_key_string,
)


def _raw(key_text: str) -> bytes:
    return base64.b64decode(key_text.removeprefix("ed25519:"))


def test_generate_key_writes_private_key_and_pub_file_that_match(tmp_path: Path) -> None:
    key_file = tmp_path / "owner.key"
    public = generate_key(key_file)

    assert public.startswith("ed25519:")
    assert len(_raw(public)) == 32
    assert public_key_path(key_file) == tmp_path / "owner.key.pub"
    assert (tmp_path / "owner.key.pub").read_text() == public + "\n"
    assert public_key_string(load_private_key(key_file).public_key()) == public
    assert b"BEGIN PRIVATE KEY" in key_file.read_bytes()  # PKCS8, unencrypted


def test_private_key_file_is_mode_0600(tmp_path: Path) -> None:
    key_file = tmp_path / "owner.key"
    old_umask = os.umask(0)  # a permissive umask must not make the key readable by others
    try:
        generate_key(key_file)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_generate_key_makes_a_new_key_each_time(tmp_path: Path) -> None:
    assert generate_key(tmp_path / "a.key") != generate_key(tmp_path / "b.key")


def test_generate_key_refuses_to_overwrite_a_private_key(tmp_path: Path) -> None:
    key_file = tmp_path / "owner.key"
    key_file.write_text("precious")
    with pytest.raises(KeyFormatError, match=r"owner\.key: already exists"):
        generate_key(key_file)
    assert key_file.read_text() == "precious"
    assert not public_key_path(key_file).exists()


def test_generate_key_refuses_to_overwrite_a_pub_file_and_leaves_no_half_pair(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "owner.key"
    public_key_path(key_file).write_text("ed25519:old\n")
    with pytest.raises(KeyFormatError, match=r"owner\.key\.pub: already exists"):
        generate_key(key_file)
    assert public_key_path(key_file).read_text() == "ed25519:old\n"
    assert not key_file.exists()


def test_load_private_key_names_the_file_when_it_is_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFormatError, match=r"nope\.key: cannot read"):
        load_private_key(tmp_path / "nope.key")


def test_load_private_key_refuses_garbage(tmp_path: Path) -> None:
    key_file = tmp_path / "garbage.key"
    key_file.write_text("not a key at all\n")
    with pytest.raises(KeyFormatError, match=r"garbage\.key: not a PEM private key"):
        load_private_key(key_file)


def test_load_private_key_refuses_other_algorithms(tmp_path: Path) -> None:
    key_file = tmp_path / "ec.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_file.write_bytes(pem)
    with pytest.raises(KeyFormatError, match=r"ec\.key: not an Ed25519 private key"):
        load_private_key(key_file)


def test_load_private_key_refuses_encrypted_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "locked.key"
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    key_file.write_bytes(pem)
    with pytest.raises(KeyFormatError, match=r"locked\.key: encrypted"):
        load_private_key(key_file)


def test_public_key_string_round_trips() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    text = public_key_string(key)
    assert public_key_string(parse_public_key(text)) == text
    assert public_key_string(parse_public_key(f"  {text}\n")) == text


def _non_canonical(text: str) -> str:
    # 32 bytes use 256 of the 258 bits of 43 base64 digits; setting a spare bit keeps the
    # decoded bytes but changes the string.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = text[-2]
    return text[:-2] + alphabet[alphabet.index(last) ^ 1] + text[-1]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "must start with 'ed25519:'"),
        ("rsa:AAAA", "must start with 'ed25519:'"),
        ("ED25519:" + base64.b64encode(bytes(32)).decode(), "must start with"),
        ("ed25519:", "must be 32 bytes, got 0"),
        ("ed25519:not base64!!", "bad base64"),
        ("ed25519:" + base64.b64encode(bytes(31)).decode(), "must be 32 bytes, got 31"),
        ("ed25519:" + base64.b64encode(bytes(33)).decode(), "must be 32 bytes, got 33"),
        ("ed25519:" + base64.urlsafe_b64encode(b"\xff" * 32).decode(), "bad base64"),
        ("ed25519:\u00e9\u00e9", "bad base64"),
    ],
)
def test_parse_public_key_refuses_malformed_strings(bad: str, reason: str) -> None:
    with pytest.raises(KeyFormatError, match=reason):
        parse_public_key(bad)


def test_parse_public_key_refuses_non_canonical_base64() -> None:
    text = public_key_string(Ed25519PrivateKey.generate().public_key())
    odd = _non_canonical(text)
    assert base64.b64decode(odd[len("ed25519:") :]) == _raw(text)  # same key bytes
    with pytest.raises(KeyFormatError, match="non-canonical"):
        parse_public_key(odd)


def test_load_public_key_arg_accepts_a_string_or_a_pub_file(tmp_path: Path) -> None:
    key_file = tmp_path / "owner.key"
    public = generate_key(key_file)
    assert public_key_string(load_public_key_arg(public)) == public
    assert public_key_string(load_public_key_arg(str(public_key_path(key_file)))) == public


def test_load_public_key_arg_points_at_the_pub_file_when_given_the_private_key(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "owner.key"
    generate_key(key_file)
    with pytest.raises(KeyFormatError, match=r"owner\.key\.pub"):
        load_public_key_arg(str(key_file))


def test_load_public_key_arg_names_the_file_holding_a_bad_key(tmp_path: Path) -> None:
    pub = tmp_path / "bad.pub"
    pub.write_text("ed25519:AAAA\n")
    with pytest.raises(KeyFormatError, match=r"bad\.pub: .*must be 32 bytes"):
        load_public_key_arg(str(pub))


def test_load_public_key_arg_refuses_what_is_neither_string_nor_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFormatError, match="neither a public key string"):
        load_public_key_arg(str(tmp_path / "missing.pub"))
