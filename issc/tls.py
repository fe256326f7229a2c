"""TLS for node connections: contexts, certificate fingerprints, self-signed certificates.

The hub listens with ``tls: {cert, key}``; a node checks the hub either against a CA
file (``tls: {ca: FILE}``, chain and host name verified) or by pinning the SHA-256 of
the hub certificate (``tls: {fingerprint: "sha256:..."}``). TLS 1.3 only, both ways,
and every handshake has a deadline (``HANDSHAKE_TIMEOUT``).

A fingerprint is written ``sha256:`` and 64 lowercase hex digits of the SHA-256 of the
certificate's DER bytes. On input, upper case and colons between the bytes (the form
``openssl x509 -fingerprint -sha256`` prints) are accepted too.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from issc.errors import ConfigError

HANDSHAKE_TIMEOUT = 10.0  # seconds from TCP connect to a finished TLS handshake
SELF_SIGNED_DAYS = 3650
_PREFIX = "sha256:"
_HEX = frozenset("0123456789abcdef")


class PinMismatchError(ConnectionError):
    """The hub's certificate is not the one pinned by ``tls.fingerprint``."""

    def __init__(self, expected: str, got: str) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"TLS certificate fingerprint mismatch: expected {expected}, got {got}")


def fingerprint(der: bytes) -> str:
    """``sha256:<64 lowercase hex>`` of a DER-encoded certificate."""
    return _PREFIX + hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """The canonical form of a pinned fingerprint; raises ValueError if it is not one."""
    value = text.strip().lower()
    if not value.startswith(_PREFIX):
        raise ValueError('expected "sha256:" and 64 hex digits')
    digits = value[len(_PREFIX) :].replace(":", "")
    if len(digits) != 64 or not set(digits) <= _HEX:
        raise ValueError('expected "sha256:" and 64 hex digits (colons allowed)')
    return _PREFIX + digits


def peer_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The fingerprint of the certificate the other side presented."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ConnectionError("the hub presented no TLS certificate")
    return fingerprint(der)


# ---- the hub's side -------------------------------------------------------------------


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def certificate_fingerprint(cert: Path) -> str:
    """The fingerprint of the first (leaf) certificate in a PEM file. Raises ConfigError."""
    text = _read(cert, "tls.cert").decode("ascii", errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ConfigError(f"tls.cert: {cert} holds no PEM certificate")
    try:
        der = ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)])
    except ValueError as exc:
        raise ConfigError(f"tls.cert: {cert} is not a usable PEM certificate: {exc}") from None
    return fingerprint(der)


def server_context(cert: Path, key: Path) -> tuple[ssl.SSLContext, str]:
    """The hub's TLS 1.3 context and its certificate's fingerprint. Raises ConfigError
    naming the key (``tls.cert``/``tls.key``) and the file."""
    digest = certificate_fingerprint(cert)
    _read(key, "tls.key")  # unreadable: say so plainly, not as an OpenSSL error
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls.key: {key} is not the private key of tls.cert {cert}, or not a PEM key "
            f"without a passphrase ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"tls: cannot load {cert} and {key}: {exc}") from None
    return context, digest


def ensure_self_signed(cert: Path, key: Path, host: str) -> bool:
    """Make a self-signed certificate and its key unless both files exist; True if made.

    The key is ECDSA P-256, written with mode 0600; the certificate names ``host`` (when
    it is not a wildcard address), this machine's host name, ``localhost``, 127.0.0.1 and
    ::1 as subject alternative names, so a node can also use it as ``tls.ca``.

    Raises:
        ConfigError: exactly one of the two files exists, or they cannot be written.
    """
    if cert.exists() and key.exists():
        return False
    if cert.exists() or key.exists():
        there, missing = (cert, key) if cert.exists() else (key, cert)
        raise ConfigError(
            f"tls.self_signed: {there} exists but {missing} does not; remove {there} to "
            "make a new pair (nodes that pinned the old fingerprint must pin the new one)"
        )
    pem_cert, pem_key = _make_self_signed(host)
    try:
        for path in (cert, key):
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem_key)
        tmp = cert.with_name(f".{cert.name}.tmp")
        tmp.write_bytes(pem_cert)
        os.replace(tmp, cert)
    except OSError as exc:
        where = exc.filename or cert
        raise ConfigError(f"tls.self_signed: cannot write {where}: {exc.strerror}") from None
    return True


def _make_self_signed(host: str) -> tuple[bytes, bytes]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    dns: list[str] = ["localhost", socket.gethostname()]
    ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        dns.insert(0, host)
    else:
        if not ip.is_unspecified:
            ips.insert(0, ip)
    for name in dict.fromkeys(dns):
        if name and name.isascii():
            names.append(x509.DNSName(name))
    names.extend(x509.IPAddress(a) for a in dict.fromkeys(ips))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issc-hub")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256())
    )
    pem_key = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), pem_key


# ---- the node's side ------------------------------------------------------------------


def client_context(ca: Path | None) -> ssl.SSLContext:
    """A node's TLS 1.3 context: verifying against ``ca`` (chain and host name), or,
    without one, verifying nothing during the handshake, for a pinned fingerprint to
    be compared after it (``open_connection``). Raises ConfigError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    _read(ca, "tls.ca")
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"tls.ca: {ca} holds no usable PEM certificate ({exc})") from None
    return context


async def open_connection(
    host: str, port: int, context: ssl.SSLContext | None, pin: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, with TLS when ``context`` is given, and check ``pin`` if given.

    Raises:
        PinMismatchError: the certificate is not the pinned one (the connection is closed).
        OSError: cannot connect, or the TLS handshake failed (ssl.SSLError).
        TimeoutError: the handshake did not finish within HANDSHAKE_TIMEOUT.
    """
    if context is None:
        return await asyncio.open_connection(host, port)
    reader, writer = await asyncio.open_connection(
        host,
        port,
        ssl=context,
        server_hostname=host,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
    )
    if pin is not None:
        try:
            got = peer_fingerprint(writer.get_extra_info("ssl_object"))
        except ConnectionError:
            writer.close()
            raise
        if got != pin:
            writer.close()
            raise PinMismatchError(pin, got)
    return reader, writer
