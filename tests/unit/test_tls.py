"""TLS helpers: fingerprints, the hub's certificate and key, self-signed certificates, and
the node's connection (pin and CA) against a real TLS server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import stat
from pathlib import Path

import pytest

from hub.cli import main as hub_main
from issc.errors import ConfigError
from issc.tls import (
    PinMismatchError,
    certificate_fingerprint,
    client_context,
    ensure_self_signed,
    fingerprint,
    normalize_fingerprint,
    open_connection,
    server_context,
)

HEX = "0123456789abcdef" * 4


def test_fingerprint_is_sha256_of_der_in_lowercase_hex() -> None:
    assert fingerprint(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + HEX,
        "SHA256:" + HEX.upper(),
        "sha256:" + ":".join(HEX[i : i + 2] for i in range(0, 64, 2)),
        "  sha256:" + HEX + "\n",
    ],
)
def test_fingerprint_forms_accepted(text: str) -> None:
    assert normalize_fingerprint(text) == "sha256:" + HEX


@pytest.mark.parametrize(
    "text", ["", HEX, "sha256:", "sha256:" + HEX[:-1], "sha256:" + HEX + "00", "sha1:" + HEX,
             "sha256:" + "g" * 64],
)  # fmt: skip
def test_fingerprint_forms_refused(text: str) -> None:
    with pytest.raises(ValueError):
        normalize_fingerprint(text)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls" / "hub.crt", tmp_path / "tls" / "hub.key"
    assert ensure_self_signed(cert, key, "127.0.0.1")
    return cert, key


def test_self_signed_pair_is_made_once_with_a_private_key(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = cert.read_bytes()
    assert not ensure_self_signed(cert, key, "127.0.0.1")  # both exist: kept
    assert cert.read_bytes() == before
    _context, digest = server_context(cert, key)
    assert digest == certificate_fingerprint(cert)
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert digest == fingerprint(der)


def test_self_signed_refuses_to_replace_half_a_pair(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    key.unlink()
    with pytest.raises(ConfigError, match=r"tls\.self_signed: .*hub\.crt exists but .*hub\.key"):
        ensure_self_signed(cert, key, "127.0.0.1")


def test_unreadable_cert_or_key_names_the_key_and_the_file(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    cert, key = pair
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"tls\.cert: cannot read {missing}"):
        server_context(missing, key)
    with pytest.raises(ConfigError, match=rf"tls\.key: cannot read {missing}"):
        server_context(cert, missing)
    with pytest.raises(ConfigError, match=rf"tls\.cert: {key} holds no PEM certificate"):
        server_context(key, key)


def test_a_key_of_another_certificate_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    cert, _key = pair
    other_cert, other_key = tmp_path / "o.crt", tmp_path / "o.key"
    ensure_self_signed(other_cert, other_key, "127.0.0.1")
    with pytest.raises(ConfigError, match=rf"tls\.key: {other_key} is not the private key"):
        server_context(cert, other_key)


def test_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls\.ca: "):
        client_context(bad)
    with pytest.raises(ConfigError, match=r"tls\.ca: cannot read"):
        client_context(tmp_path / "missing.pem")


def test_client_contexts_are_tls13_only(pair: tuple[Path, Path]) -> None:
    assert client_context(None).minimum_version == ssl.TLSVersion.TLSv1_3
    ca = client_context(pair[0])
    assert ca.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ca.check_hostname and ca.verify_mode == ssl.CERT_REQUIRED
    assert server_context(*pair)[0].minimum_version == ssl.TLSVersion.TLSv1_3


def test_pin_and_ca_against_a_real_server(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    context, digest = server_context(cert, key)

    async def scenario() -> None:
        async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"hello")
            await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await open_connection("127.0.0.1", port, client_context(None), digest)
            assert await reader.read() == b"hello"
            assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            writer.close()
            reader, writer = await open_connection("127.0.0.1", port, client_context(cert), None)
            assert await reader.read() == b"hello"
            writer.close()
            wrong = "sha256:" + "00" * 32
            with pytest.raises(PinMismatchError) as caught:
                await open_connection("127.0.0.1", port, client_context(None), wrong)
            assert caught.value.expected == wrong and caught.value.got == digest
            assert wrong in str(caught.value) and digest in str(caught.value)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_hub_cli_prints_the_fingerprint_of_a_new_self_signed_cert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text("tls: {cert: hub.crt, key: hub.key, self_signed: true}\n")
    assert hub_main(["--config", str(config), "--fingerprint"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == certificate_fingerprint(tmp_path / "hub.crt")
    assert hub_main(["--config", str(config), "--fingerprint"]) == 0  # the same cert again
    assert capsys.readouterr().out.strip() == printed


def test_hub_cli_refuses_a_missing_cert_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ndata_dir: {tmp_path / 'd'}\n"
                      "tls: {cert: hub.crt, key: hub.key}\n")  # fmt: skip
    assert hub_main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("issc-hub: error: tls.cert: cannot read ") and "hub.crt" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "d").exists()  # refused before anything was made
