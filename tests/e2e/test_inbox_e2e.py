"""Malformed inbox files are rejected one by one, with reasons, while the hub keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from e2e_harness import Cluster, GateProject, OwnerKey, wait_until, write_tasks

pytestmark = pytest.mark.e2e


def jsonl(*entries: dict[str, object]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in entries).encode()


def test_bad_inbox_files_are_rejected_and_the_hub_keeps_serving(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(gate_project.bundle)
    node = cluster.node(hub, trusted_keys={"gate": owner_key.public}, slots=2)
    node.wait_joined(hub)
    gate_project.open_gate()  # every task finishes at once
    good = write_tasks(
        tmp_path / "good.jsonl", "gate", [(f"g-{i}", gate_project.task_input(i)) for i in range(4)]
    )
    hub.ingest(good)

    task = {"project": "gate", "input": gate_project.task_input()}
    bad: dict[str, tuple[bytes, list[str]]] = {
        # name: (content, what its .error.txt must say)
        "broken.yaml": (
            b"project: gate\ntasks:\n  - {id: y-1, input: 1}\n  - {id: y-2, input: [1\n",
            ["line 5", "not valid YAML"],
        ),
        "line3.jsonl": (
            jsonl({**task, "id": "j-1"}, {**task, "id": "j-2"}) + b'{"project": "gate", "id": \n',
            ["line 3", "not valid JSON"],
        ),
        "nosuch.jsonl": (
            jsonl({"project": "nosuch", "id": "n-1", "input": 1}),
            ["unknown project", "nosuch"],
        ),
        "twice-in-file.yaml": (
            b"project: gate\ntasks:\n  - {id: d-1, input: 1}\n  - {id: d-2, input: 2}\n"
            b"  - {id: d-1, input: 3}\n",
            ["line 5", "duplicate task id 'd-1'"],
        ),
        "known-id.jsonl": (
            jsonl({**task, "id": "k-1"}, {**task, "id": "g-2"}),
            ["line 2", "duplicate task id 'g-2'"],
        ),
        "slash.jsonl": (jsonl({**task, "id": "a/b"}), ["line 1", "task id 'a/b'"]),
    }
    # Neither a bundle nor a task file: taken for an input file on its way and left alone
    # (rejected only after the grace period, which tests/unit/test_inbox_files.py covers).
    hub.drop("notes.txt", b"hello\n")
    for name, (content, _) in bad.items():
        hub.drop(name, content)
    # While the hub reads all that, more good work arrives and gets done.
    more = write_tasks(
        tmp_path / "more.yaml", "gate", [(f"m-{i}", gate_project.task_input(i)) for i in range(4)]
    )
    hub.submit(more)

    for name, (_, expected) in bad.items():
        assert hub.wait_ingested(name) == "rejected", name
        error = (hub.inbox / "rejected" / f"{name}.error.txt").read_text()
        for fragment in expected:
            assert fragment in error, f"{name}: {fragment!r} not in {error!r}"
    assert hub.wait_ingested(more.name) == "accepted"
    assert (hub.inbox / "notes.txt").exists()

    results = hub.wait_results("gate", 8)
    assert sorted(r["id"] for r in results) == sorted(
        [f"g-{i}" for i in range(4)] + [f"m-{i}" for i in range(4)]
    )
    assert {r["state"] for r in results} == {"C"}
    # All or nothing: no task of a rejected file got in (k-1 was fine, its file was not).
    assert sorted(t["id"] for t in hub.tasks("gate")) == sorted(r["id"] for r in results)

    # The same file dropped again adds nothing, under its own name or another.
    hub.submit(good)
    assert hub.wait_ingested(good.name) == "accepted"
    assert (hub.inbox / "accepted" / f"{good.name}.1").exists()
    renamed = shutil.copyfile(good, tmp_path / "good-again.jsonl")
    hub.submit(renamed)
    assert hub.wait_ingested(renamed.name) == "rejected"
    error = (hub.inbox / "rejected" / f"{renamed.name}.error.txt").read_text()
    assert "already ingested" in error and good.name in error
    assert len(hub.query("tasks", project="gate")) == 8
    wait_until(lambda: hub.query("status")["tasks"]["C"] == 8, what="8 completed tasks")
    assert len(hub.results("gate")) == 8
