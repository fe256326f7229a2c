"""Bundles that must never run: tampered with, or signed by a key the node does not pin."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import pytest
from e2e_harness import (
    Cluster,
    GateProject,
    OwnerKey,
    flip_byte,
    processes_naming,
    rewrite_bundle,
    run_tool,
    write_tasks,
)

pytestmark = pytest.mark.e2e


def tampered_copy(bundle: Path, out: Path) -> Path:
    """The bundle with one byte of main.py flipped; manifest and signature untouched."""
    return rewrite_bundle(
        bundle, out, lambda name, data: flip_byte(data) if name == "files/main.py" else data
    )


def test_hub_rejects_a_tampered_bundle(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    tampered = tampered_copy(gate_project.bundle, tmp_path / "gate-tampered.issc")
    # The signature over the manifest is still good; only a file's hash gives it away.
    verified = run_tool(
        "issc-project", "verify", str(tampered), "--pubkey", owner_key.public, check=False
    )
    assert verified.returncode != 0 and "main.py" in verified.stderr

    hub = cluster.hub()
    hub.submit(tampered)
    assert hub.wait_ingested(tampered.name) == "rejected"
    error = (hub.inbox / "rejected" / f"{tampered.name}.error.txt").read_text()
    assert "main.py" in error and "SHA-256" in error, error
    assert hub.query("projects") == []

    hub.ingest(gate_project.bundle)  # the genuine bundle is still welcome
    assert [p["name"] for p in hub.query("projects")] == ["gate"]


def test_node_refuses_a_tampered_bundle_that_the_hub_serves(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub = cluster.hub(max_attempts=1)
    hub.ingest(gate_project.bundle)
    assert hub.stop() == 0

    # Play a compromised hub: swap the stored bundle for a tampered copy under a matching
    # digest, so nothing but the node's own verification stands between it and execution.
    tampered = tampered_copy(gate_project.bundle, tmp_path / "tampered.issc").read_bytes()
    digest = hashlib.sha256(tampered).hexdigest()
    with contextlib.closing(sqlite3.connect(hub.db_path)) as db, db:
        [(old,)] = db.execute("SELECT digest FROM projects WHERE name = 'gate'").fetchall()
        db.execute(
            "UPDATE bundles SET content = ?, digest = ?, size = ? WHERE digest = ?",
            (tampered, digest, len(tampered), old),
        )
        db.execute(
            "UPDATE projects SET digest = ?, size = ? WHERE name = 'gate'", (digest, len(tampered))
        )
    hub.start()

    node = cluster.node(hub, trusted_keys={"gate": owner_key.public}, slots=1)
    node_id = node.wait_joined(hub)
    gate_project.open_gate()  # were it run, it would finish at once and leave its marker
    hub.submit(write_tasks(tmp_path / "one.jsonl", "gate", [("t-1", gate_project.task_input())]))
    [line] = hub.wait_results("gate", 1)

    assert (line["state"], line["attempts"]) == ("F", 1)
    assert "bundle_refused" in line["error"] and "main.py" in line["error"], line["error"]
    assert gate_project.started() == []
    history = hub.lease_history("gate", "t-1")
    assert [(h["outcome"], h["node"]) for h in history] == [("bundle_refused", node_id)]
    bundles = node.data_dir / "bundles"
    assert not (bundles / digest).exists() and not (bundles / f"{digest}.issc").exists()
    assert processes_naming(str(bundles)) == []
    assert node.alive  # refusing is routine, not a crash


def test_bundle_signed_by_an_untrusted_key_never_runs(
    cluster: Cluster,
    owner_key: OwnerKey,
    other_key: OwnerKey,
    gate_project: GateProject,
    tmp_path: Path,
) -> None:
    hub = cluster.hub(max_attempts=2)
    hub.ingest(gate_project.bundle)  # signed by owner_key
    wary = {"gate": other_key.public}  # ...while the volunteers pin another key
    nodes = [cluster.node(hub, f"wary{i}", trusted_keys=wary, slots=1) for i in (1, 2)]
    node_ids = {node.wait_joined(hub) for node in nodes}
    gate_project.open_gate()
    hub.submit(write_tasks(tmp_path / "one.jsonl", "gate", [("t-1", gate_project.task_input())]))
    [line] = hub.wait_results("gate", 1)

    assert (line["id"], line["state"], line["attempts"]) == ("t-1", "F", 2)
    assert "bundle_refused" in line["error"] and "trusted key" in line["error"], line["error"]
    assert gate_project.started() == []
    # The task's history (the admin's view) names each refusal; each node refused once
    # (a node that refused a bundle is not offered it again).
    detail = hub.task_detail("gate", "t-1")
    assert (detail["state"], detail["attempts"]) == ("F", 2)
    history = detail["history"]
    assert [h["outcome"] for h in history] == ["bundle_refused", "bundle_refused"]
    assert {h["node"] for h in history} == node_ids
    assert all("trusted key" in str(h["detail"]) for h in history)
    for node in nodes:
        assert [p.name for p in (node.data_dir / "bundles").iterdir() if p.is_dir()] == []
        assert node.alive
