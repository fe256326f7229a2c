"""Bundles that must never run: tampered with, or signed by a key the node does not pin."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from e2e_harness import (
    Cluster,
    GateProject,
    OwnerKey,
    flip_byte,
    make_key,
    pack,
    processes_naming,
    rewrite_bundle,
    run_tool,
    write_project,
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


ROTATING_PROGRAM = """import json, sys
task = json.load(sys.stdin)
print(json.dumps({"version": VERSION, "input": task}))
"""


def rotating_project(directory: Path, version: int) -> Path:
    return write_project(
        directory / f"v{version}",
        "rot",
        ROTATING_PROGRAM.replace("VERSION", str(version)),
        version=version,
    )


def test_owner_rotates_its_key_mid_project_and_nodes_keep_working(
    cluster: Cluster, tmp_path: Path
) -> None:
    """v1 signed by K0; the owner rotates to K1 and ships v2 with the endorsement; nodes that
    pin K0 run v2, remember K1 across a restart, and a rollback to K0 is refused. A cached
    bundle changed on a node's disk is fetched again, never run."""
    k0 = make_key(tmp_path / "keys" / "k0.key")
    hub = cluster.hub()
    hub.ingest(pack(rotating_project(tmp_path, 1), k0, tmp_path / "rot-v1.issc"))
    pins = {"rot": k0.public}
    nodes = [cluster.node(hub, f"pin{i}", trusted_keys=pins, slots=1) for i in (1, 2)]
    for node in nodes:
        node.wait_joined(hub)
    hub.submit(write_tasks(tmp_path / "a.jsonl", "rot", [(f"a-{i}", i) for i in range(4)]))
    results = hub.wait_results("rot", 4)
    assert {r["result"]["version"] for r in results} == {1}, results

    # The rotation: K0 endorses K1, and v2 carries the chain.
    k1 = make_key(tmp_path / "keys" / "k1.key")
    chain = tmp_path / "keys" / "rot.chain.json"
    run_tool("issc-project", "rotate", "--project", "rot", "--old", str(k0.path),
             "--new", k1.public, "--out", str(chain))  # fmt: skip
    v2 = tmp_path / "rot-v2.issc"
    run_tool("issc-project", "pack", str(rotating_project(tmp_path, 2)), "--key", str(k1.path),
             "--out", str(v2), "--endorsements", str(chain))  # fmt: skip
    hub.ingest(v2)
    hub.submit(write_tasks(tmp_path / "b.jsonl", "rot", [(f"b-{i}", i) for i in range(4)]))
    results = hub.wait_results("rot", 8)
    assert all(r["state"] == "C" for r in results), results
    assert {r["result"]["version"] for r in results if r["id"].startswith("b-")} == {2}
    for node in nodes:
        state = json.loads((node.data_dir / "bundles" / "owner_keys.json").read_text())
        assert state["rot"] == {"current": k1.public, "superseded": [k0.public]}

    # One node stops; while it is down its cached v2 is changed on disk. The other stops
    # too, so that the next tasks go to the restarted one.
    for node in nodes:
        assert node.stop() == 0
    digest = hashlib.sha256(v2.read_bytes()).hexdigest()
    main = nodes[0].data_dir / "bundles" / digest / "main.py"
    main.chmod(0o644)
    main.write_text(ROTATING_PROGRAM.replace("VERSION", "666"))
    main.chmod(0o444)
    nodes[0].start()
    nodes[0].wait_joined(hub)
    hub.submit(write_tasks(tmp_path / "c.jsonl", "rot", [(f"c-{i}", i) for i in range(3)]))
    results = hub.wait_results("rot", 11)
    assert {r["result"]["version"] for r in results if r["id"].startswith("c-")} == {2}, results
    assert "corrupt" in nodes[0].log_text()
    assert "666" not in main.read_text()  # fetched again from the hub

    # The old key, stolen: a v3 signed by K0 is refused by the hub...
    v3 = pack(rotating_project(tmp_path, 3), k0, tmp_path / "rot-v3.issc")
    hub.submit(v3)
    assert hub.wait_ingested(v3.name) == "rejected"
    error = (hub.inbox / "rejected" / f"{v3.name}.error.txt").read_text()
    assert "rollback" in error, error
    assert [p["version"] for p in hub.query("projects")] == [2]
