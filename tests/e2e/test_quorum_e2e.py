"""Quorum validation and spot checks end to end: one node of three is a cheater.

Real hub and node processes (see e2e_harness.py). The cheater is ``cheating_node.py``: an
ordinary issc-node whose every successful result is off by one, authenticated with its own
connection's key (so nothing on the wire gives it away). What each test shows:

* ``quorum: 2``, three volunteers, one of them the cheater: every task lands in the
  outbox exactly once, C, with its true result; the cheater's volunteer is untrusted,
  its disagreements counted, and it earns no credit; the honest ones earn credit for
  every task;
* ``quorum: 1`` with known-answer tasks (``expect``) in the task file: the cheater,
  alone at first, answers a spot check wrongly and is distrusted at once; its answers
  since then never count alone, so the outbox holds only true results, and every
  spot-check task carries the right answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from e2e_harness import (
    Cluster,
    Hub,
    Node,
    OwnerKey,
    holds_for,
    pack,
    wait_until,
    write_project,
)

SQUARE = """\
import json, sys
task = json.load(sys.stdin)
print(json.dumps(task["n"] * task["n"]))
"""


class CheatingNode(Node):
    """A node run by tests/e2e/cheating_node.py: its successful results are off by one."""

    def argv(self) -> list[str]:
        script = Path(__file__).with_name("cheating_node.py")
        return [sys.executable, str(script), "--config", str(self.config_path)]


def squares_bundle(tmp_path: Path, key: OwnerKey, quorum: int) -> Path:
    directory = write_project(tmp_path / "squares-src", "squares", SQUARE)
    meta = yaml.safe_load((directory / "project.yaml").read_text())
    meta["quorum"] = quorum
    (directory / "project.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return pack(directory, key, tmp_path / f"squares-q{quorum}.issc")


def start_cheater(cluster: Cluster, hub: Hub, trusted: dict[str, str]) -> CheatingNode:
    cheater = CheatingNode(
        cluster.root / "nodes", "cheater", hub.addr, trusted_keys=trusted, volunteer="mallory"
    )
    cluster.procs.append(cheater)
    cheater.start()
    cheater.wait_joined(hub)
    return cheater


def volunteers(hub: Hub) -> dict[str, dict[str, Any]]:
    """``issc-ctl --json volunteers``, by name."""
    return {v["volunteer"]: v for v in hub.ctl("volunteers")}


def check_outbox(hub: Hub, ids: list[str]) -> list[dict[str, Any]]:
    """Every task exactly once, C, with its true square, never from the cheater."""
    results = hub.wait_results("squares", len(ids), timeout=90)
    holds_for(lambda: len(hub.results("squares")) == len(ids), 1.0, what="no extra lines")
    assert sorted(r["id"] for r in results) == sorted(ids)  # each exactly once
    for r in results:
        n = int(r["id"].split("-")[1])
        assert (r["state"], r["result"], r["error"]) == ("C", n * n, None), r
        assert r["volunteer"] != "mallory", r
    return results


def test_a_cheater_among_three_never_reaches_the_outbox_with_quorum_two(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(squares_bundle(tmp_path, owner_key, quorum=2))
    trusted = {"squares": owner_key.public}
    honest = [
        cluster.node(hub, f"node-{name}", volunteer=name, trusted_keys=trusted)
        for name in ("alice", "bob")
    ]
    cheater = start_cheater(cluster, hub, trusted)
    for node in honest:
        node.wait_joined(hub)

    ids = [f"s-{i}" for i in range(12)]
    lines = [{"project": "squares", "id": t, "input": {"n": i}} for i, t in enumerate(ids)]
    task_file = tmp_path / "squares.jsonl"
    task_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    hub.submit(task_file)
    check_outbox(hub, ids)

    people = volunteers(hub)
    mallory, alice, bob = people["mallory"], people["alice"], people["bob"]
    assert mallory["trusted"] is False and mallory["disagreed"] > 0, mallory
    assert (mallory["credit"], mallory["tasks_completed"], mallory["agreed"]) == (0, 0, 0)
    # Only alice and bob ever agree: each of them confirmed every task and earned for it.
    for honest_one in (alice, bob):
        assert honest_one["trusted"] is True, honest_one
        assert honest_one["tasks_completed"] == honest_one["agreed"] == len(ids), honest_one
        assert honest_one["credit"] > 0
    # A task the cheater answered shows its verdict in the task's history.
    judged = [
        h
        for task_id in ids
        for h in hub.task_detail("squares", task_id)["history"]
        if h.get("verdict") == "disagreed"
    ]
    assert judged, "the cheater answered no task?"
    assert {h["node"] for h in judged} == {cheater.node_id}


def test_a_spot_check_catches_a_cheater_before_its_answers_count(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(squares_bundle(tmp_path, owner_key, quorum=1))
    trusted = {"squares": owner_key.public}
    cheater = start_cheater(cluster, hub, trusted)  # alone, at first

    # Known answers first and last; nothing tells a node which tasks they are.
    checks = {"s-0", "s-1", "s-12", "s-13"}
    ids = [f"s-{i}" for i in range(14)]
    lines = []
    for i, task_id in enumerate(ids):
        line: dict[str, Any] = {"project": "squares", "id": task_id, "input": {"n": i}}
        if task_id in checks:
            line["expect"] = i * i
        lines.append(line)
    task_file = tmp_path / "squares.jsonl"
    task_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    hub.submit(task_file)

    # The cheater takes the first two tasks (its two slots): spot checks, answered wrongly.
    wait_until(
        lambda: volunteers(hub).get("mallory", {}).get("trusted") is False,
        timeout=30,
        what="the cheater to be distrusted",
    )
    assert "volunteer mallory is not trusted" in hub.log_text()
    # The node is told only that its result was not taken, nothing of spot checks.
    refusals = [ln for ln in cheater.log_text().splitlines() if "did not record" in ln]
    assert refusals and all(ln.endswith(": result not accepted") for ln in refusals)
    for name in ("alice", "bob"):
        cluster.node(hub, f"node-{name}", volunteer=name, trusted_keys=trusted)

    results = {r["id"]: r for r in check_outbox(hub, ids)}
    for task_id in sorted(checks):
        n = int(task_id.split("-")[1])
        assert results[task_id]["result"] == n * n
    mallory = volunteers(hub)["mallory"]
    assert mallory["trusted"] is False and mallory["disagreed"] >= 2, mallory
    assert (mallory["credit"], mallory["tasks_completed"]) == (0, 0)
    # The refusals are in the spot-check tasks' histories for the admin, as "rejected".
    outcomes = [h["outcome"] for h in hub.task_detail("squares", "s-0")["history"]]
    assert "rejected" in outcomes
