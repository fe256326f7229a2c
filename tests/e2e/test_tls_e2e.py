"""TLS between nodes and the hub, with real processes on 127.0.0.1: a node that pins the
hub's fingerprint or trusts its CA works; a wrong pin, a plain node, a TLS 1.2 client and
a client that never finishes its handshake are all turned away while the good node keeps
working; the control socket is unaffected; a relay's peers reach it in clear."""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import (
    Cluster,
    GateProject,
    Hub,
    OwnerKey,
    free_port,
    holds_for,
    run_tool,
    wait_until,
    write_tasks,
)

from issc.tls import HANDSHAKE_TIMEOUT

pytestmark = pytest.mark.e2e

FINGERPRINT_RE = re.compile(r"fingerprint (sha256:[0-9a-f]{64})")


def tls_hub(cluster: Cluster, **settings: Any) -> tuple[Hub, str]:
    """A hub with a self-signed certificate it makes itself; (hub, its fingerprint)."""
    hub = cluster.hub(tls={"cert": "tls/hub.crt", "key": "tls/hub.key", "self_signed": True},
                      **settings)  # fmt: skip
    printed = run_tool("issc-hub", "--config", str(hub.config_path), "--fingerprint")
    pin = printed.stdout.strip()
    logged = FINGERPRINT_RE.search(hub.log_text())
    assert logged is not None, hub.log_text()
    assert logged.group(1) == pin
    return hub, pin


def run_tasks(hub: Hub, gate_project: GateProject, tmp_path: Path, count: int, tag: str) -> None:
    gate_project.open_gate()
    tasks = [(f"{tag}-{i}", gate_project.task_input(i)) for i in range(count)]
    hub.submit(write_tasks(tmp_path / f"{tag}.jsonl", "gate", tasks))

    def done() -> bool:
        from e2e_harness import read_results

        ids = {r["id"] for r in read_results(hub.outbox, "gate") if r["state"] == "C"}
        return ids >= {t for t, _ in tasks}

    wait_until(done, 30, what=f"tasks {tag}-* to complete")


def test_pinned_node_works_and_wrong_pin_plain_and_tls12_clients_are_refused(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, pin = tls_hub(cluster)
    hub.ingest(gate_project.bundle)
    keys = {"gate": owner_key.public}
    good = cluster.node(hub, "good", trusted_keys=keys, tls={"fingerprint": pin.upper()})
    good_id = good.wait_joined(hub)
    run_tasks(hub, gate_project, tmp_path, 4, "pinned")

    wrong = "sha256:" + "ab" * 32
    impostor = cluster.node(hub, "wrongpin", trusted_keys=keys, tls={"fingerprint": wrong})
    plain = cluster.node(hub, "plain", trusted_keys=keys)
    wait_until(
        lambda: f"expected {wrong}, got {pin}" in impostor.log_text(),
        what="the wrong-pin node to name the mismatch",
    )
    wait_until(
        lambda: "is it a TLS hub? this node has no tls:" in plain.log_text(),
        what="the plain node to fail",
    )

    # A TLS 1.2-only client does not get a handshake.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    host, port = hub.addr.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        old.wrap_socket(raw, server_hostname=host)

    # Nobody but the good node ever got in; it keeps working; the control socket answers.
    holds_for(lambda: hub.connected_nodes() == {good_id}, 1.5, what="only the good node")
    assert impostor.alive and plain.alive  # they retry with backoff, as for a hub that is down
    run_tasks(hub, gate_project, tmp_path, 2, "after")
    status = run_tool("issc-ctl", "--socket", str(hub.control_socket), "status").stdout
    assert "1 connected" in status, status
    assert hub.alive


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a hub certificate it signed for 127.0.0.1: (ca.pem, hub.crt, hub.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issc test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    hub_key = ec.generate_private_key(ec.SECP256R1())
    hub_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub")]))
        .issuer_name(ca_name)
        .public_key(hub_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "hub.crt", directory / "hub.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(hub_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        hub_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


def test_node_trusting_the_ca_works_and_one_trusting_another_ca_does_not(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    ca, cert, key = make_ca(tmp_path / "pki")
    other_ca, _, _ = make_ca(tmp_path / "other-pki")
    hub = cluster.hub(tls={"cert": str(cert), "key": str(key)})
    hub.ingest(gate_project.bundle)
    keys = {"gate": owner_key.public}
    good = cluster.node(hub, "good", trusted_keys=keys, tls={"ca": str(ca)})
    good_id = good.wait_joined(hub)
    stranger = cluster.node(hub, "stranger", trusted_keys=keys, tls={"ca": str(other_ca)})
    wait_until(
        lambda: "certificate verify failed" in stranger.log_text(),
        what="the node trusting another CA to refuse the hub",
    )
    run_tasks(hub, gate_project, tmp_path, 4, "ca")
    assert hub.connected_nodes() == {good_id}


def test_a_stalled_handshake_is_dropped_while_the_good_node_keeps_working(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, pin = tls_hub(cluster)
    hub.ingest(gate_project.bundle)
    good = cluster.node(hub, "good", trusted_keys={"gate": owner_key.public},
                        tls={"fingerprint": pin})  # fmt: skip
    good_id = good.wait_joined(hub)
    host, port = hub.addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as stalled:
        started = time.monotonic()
        run_tasks(hub, gate_project, tmp_path, 3, "meanwhile")  # served while one stalls
        stalled.settimeout(HANDSHAKE_TIMEOUT + 10)
        assert stalled.recv(1024) == b""  # the hub hung up: no handshake, no bytes
        waited = time.monotonic() - started
    assert HANDSHAKE_TIMEOUT - 1 <= waited <= HANDSHAKE_TIMEOUT + 8, waited
    assert hub.connected_nodes() == {good_id}
    run_tasks(hub, gate_project, tmp_path, 2, "after")


def test_a_relay_reaches_a_tls_hub_and_its_peers_reach_it_in_clear(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, pin = tls_hub(cluster)
    hub.ingest(gate_project.bundle)
    keys = {"gate": owner_key.public}
    relay_port = free_port()
    relay = cluster.node(hub, "relay", trusted_keys=keys, volunteer="rita", slots=1,
                         relay={"listen": f"127.0.0.1:{relay_port}"},
                         tls={"fingerprint": pin})  # fmt: skip
    relay_id = relay.wait_joined(hub)
    wait_until((relay.data_dir / "relay.addr").exists, what="the relay to accept peers")
    peer = cluster.node(f"127.0.0.1:{relay_port}", "peer", trusted_keys=keys, volunteer="pat")
    peer_id = peer.wait_joined(hub)
    via = {n["node"]: n["via"] for n in hub.query("nodes")}
    assert via == {relay_id: None, peer_id: relay_id}
    run_tasks(hub, gate_project, tmp_path, 4, "relayed")
