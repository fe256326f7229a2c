"""LAN relays end to end: a hub, a relay node, peers that reach the hub only through it.

Real processes on 127.0.0.1. The gate project holds tasks "running" until the test opens
the gate, so "mid-run" (for the relay's kill -9) is a state the test waits for.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import (
    Cluster,
    GateProject,
    Hub,
    Node,
    OwnerKey,
    free_port,
    pack,
    wait_until,
    write_project,
    write_tasks,
)

pytestmark = pytest.mark.e2e


def start_relay(
    cluster: Cluster,
    hub: Hub | str | list[str],
    owner_key: OwnerKey,
    name: str = "relay",
    *,
    port: int | None = None,
    slots: int = 1,
    **extra: Any,
) -> tuple[Node, str]:
    """A relay node listening on 127.0.0.1; (node, "127.0.0.1:port") once it accepts peers."""
    port = port or free_port()
    relay = cluster.node(
        hub,
        name,
        trusted_keys={"gate": owner_key.public},
        volunteer="rita",
        slots=slots,
        relay={"listen": f"127.0.0.1:{port}", **extra.pop("relay_settings", {})},
        **extra,
    )
    addr_file = relay.data_dir / "relay.addr"
    wait_until(addr_file.exists, what=f"{name} to accept peers")
    return relay, f"127.0.0.1:{port}"


def start_peers(
    cluster: Cluster, hubs: list[str], owner_key: OwnerKey, count: int = 3, **extra: Any
) -> list[Node]:
    return [
        cluster.node(
            hubs,
            f"peer{i}",
            trusted_keys={"gate": owner_key.public},
            volunteer=f"vol{i}",
            slots=1,
            **extra,
        )
        for i in range(1, count + 1)
    ]


def nodes_by_id(hub: Hub) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in hub.query("nodes")}


def test_peers_work_through_the_relay_and_the_hub_sends_each_bundle_once(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(gate_project.bundle)
    relay, relay_addr = start_relay(cluster, hub, owner_key)
    relay_id = relay.wait_joined(hub)
    peers = start_peers(cluster, [relay_addr], owner_key)
    peer_ids = [peer.wait_joined(hub) for peer in peers]

    view = nodes_by_id(hub)
    assert view[relay_id]["via"] is None
    for peer_id in peer_ids:
        assert view[peer_id]["via"] == relay_id
        assert view[peer_id]["address"].startswith("127.0.0.1:")

    tasks = [(f"t-{i}", gate_project.task_input(i)) for i in range(12)]
    hub.submit(write_tasks(tmp_path / "tasks.jsonl", "gate", tasks))
    # Every peer has a task running before any finishes: each fetched the bundle.
    wait_until(
        lambda: {run.node for run in gate_project.started()} >= {p.name for p in peers},
        what="every peer to start a task",
    )
    gate_project.open_gate()
    results = hub.wait_results("gate", 12)

    assert sorted(r["id"] for r in results) == sorted(t for t, _ in tasks)
    assert all(r["state"] == "C" for r in results)
    status = hub.query("status")
    assert status["transfers"]["bundles_sent"] == 1, status["transfers"]
    assert status["transfers"]["bundle_bytes_sent"] == gate_project.bundle.stat().st_size

    ran_on = Counter(r["result"]["node"] for r in results)
    credited = {v["volunteer"]: v for v in hub.query("volunteers")}
    for peer in peers:
        volunteer = peer.settings["volunteer"]
        assert credited[volunteer]["tasks_completed"] == ran_on[peer.name], credited


def test_relay_killed_mid_run_peers_fail_over_and_come_back(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(gate_project.bundle)
    port = free_port()
    relay, relay_addr = start_relay(cluster, hub, owner_key, port=port, slots=1)
    relay_id = relay.wait_joined(hub)
    peers = start_peers(cluster, [relay_addr, hub.addr], owner_key)
    peer_ids = [peer.wait_joined(hub) for peer in peers]
    assert all(nodes_by_id(hub)[p]["via"] == relay_id for p in peer_ids)

    tasks = [(f"t-{i}", gate_project.task_input(i)) for i in range(8)]
    hub.submit(write_tasks(tmp_path / "tasks.jsonl", "gate", tasks))
    wait_until(
        lambda: {run.node for run in gate_project.started()} >= {p.name for p in peers},
        what="every peer to start a task",
    )
    relay.kill(signal.SIGKILL)
    relay.wait(10)

    # The peers reach the hub directly, their running leases resumed.
    wait_until(
        lambda: all(nodes_by_id(hub).get(p, {}).get("via", "x") is None for p in peer_ids),
        what="the peers to connect to the hub directly",
    )
    gate_project.open_gate()
    results = hub.wait_results("gate", 8)
    ids = [r["id"] for r in results]
    assert sorted(ids) == sorted(t for t, _ in tasks)
    assert len(ids) == len(set(ids)), "a task is in the outbox twice"

    # The relay comes back and its peers move back to it.
    relay.start()
    wait_until(
        lambda: all(nodes_by_id(hub).get(p, {}).get("via") == relay_id for p in peer_ids),
        timeout=30,
        what="the peers to return to the relay",
    )


class TamperingRelay(Node):
    """A relay node run by tests/e2e/tampering_relay.py, which alters what it passes on."""

    def __init__(self, *args: Any, tamper: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper

    def argv(self) -> list[str]:
        script = Path(__file__).with_name("tampering_relay.py")
        return [sys.executable, str(script), self.tamper, "--config", str(self.config_path)]


def start_tampering_relay(
    cluster: Cluster, hub: Hub, tamper: str, trusted: dict[str, str]
) -> tuple[TamperingRelay, str]:
    """A relay that only relays (it runs nothing itself) and alters ``tamper``."""
    port = free_port()
    relay = TamperingRelay(
        cluster.root / "nodes",
        "relay",
        hub.addr,
        tamper=tamper,
        trusted_keys=trusted,
        projects=[],
        volunteer="mallory",
        relay={"listen": f"127.0.0.1:{port}"},
    )
    cluster.procs.append(relay)
    relay.start()
    relay.wait_joined(hub)
    wait_until((relay.data_dir / "relay.addr").exists, what="the relay to accept peers")
    return relay, f"127.0.0.1:{port}"


@pytest.mark.parametrize("tamper", ["bundle", "result"])
def test_a_relay_that_alters_bundles_or_results_is_caught(
    cluster: Cluster,
    owner_key: OwnerKey,
    gate_project: GateProject,
    tmp_path: Path,
    tamper: str,
) -> None:
    hub = cluster.hub()
    hub.ingest(gate_project.bundle)
    trusted = {"gate": owner_key.public}
    _relay, relay_addr = start_tampering_relay(cluster, hub, tamper, trusted)
    peers = start_peers(cluster, [relay_addr, hub.addr], owner_key, count=2)
    peer_ids = [peer.wait_joined(hub) for peer in peers]

    gate_project.open_gate()
    tasks = [(f"t-{i}", gate_project.task_input(i)) for i in range(6)]
    hub.submit(write_tasks(tmp_path / "tasks.jsonl", "gate", tasks))
    results = hub.wait_results("gate", 6, timeout=60)

    # Only true results reached the owner, each once, none failed for the relay's deeds.
    assert sorted(r["id"] for r in results) == sorted(t for t, _ in tasks)
    for r in results:
        assert r["state"] == "C", r
        expected = {"task": r["id"], "node": r["result"]["node"], "value": int(r["id"][2:])}
        assert r["result"] == expected
        assert r["node"] in peer_ids
    caught = "fetched via relay" if tamper == "bundle" else "HMAC does not match"
    assert caught in hub.log_text(), hub.tail()
    # The peers left the relay that altered their traffic and reached the hub directly.
    wait_until(
        lambda: all(nodes_by_id(hub).get(p, {"via": "?"})["via"] is None for p in peer_ids),
        what="the peers to reach the hub directly",
    )


DIGEST_PROGRAM = """\
import hashlib, json, sys
json.load(sys.stdin)
print(json.dumps({"sha256": hashlib.sha256(open("in/data", "rb").read()).hexdigest()}))
"""


def test_a_relay_that_alters_input_files_costs_no_attempt(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    bundle = pack(
        write_project(tmp_path / "src", "digest", DIGEST_PROGRAM), owner_key, tmp_path / "d.issc"
    )
    data = tmp_path / "work" / "data.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(300_000))
    want = hashlib.sha256(data.read_bytes()).hexdigest()
    lines = [
        {"project": "digest", "id": f"t-{i}", "input": {}, "files": {"data": "data.bin"}}
        for i in range(4)
    ]
    task_file = data.parent / "tasks.jsonl"
    task_file.write_text("".join(json.dumps(line) + "\n" for line in lines))

    hub = cluster.hub()
    hub.ingest(bundle)
    trusted = {"digest": owner_key.public}
    _relay, relay_addr = start_tampering_relay(cluster, hub, "file", trusted)
    peers = [
        cluster.node(
            [relay_addr, hub.addr], f"peer{i}", trusted_keys=trusted, volunteer=f"vol{i}", slots=1
        )
        for i in (1, 2)
    ]
    peer_ids = [peer.wait_joined(hub) for peer in peers]
    hub.submit(task_file)
    results = hub.wait_results("digest", 4, timeout=60)

    for r in results:  # true answers only, and the relay's deeds cost no attempt
        assert r["state"] == "C" and r["result"] == {"sha256": want}, r
        assert r["attempts"] == 1, r
    assert any("giving lease" in peer.log_text() for peer in peers)
    wait_until(
        lambda: all(nodes_by_id(hub).get(p, {"via": "?"})["via"] is None for p in peer_ids),
        what="the peers to reach the hub directly",
    )


def test_a_relay_of_a_relay_forms_a_tree(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(gate_project.bundle)
    upper, upper_addr = start_relay(cluster, hub, owner_key, "upper", slots=1)
    upper_id = upper.wait_joined(hub)
    lower, lower_addr = start_relay(cluster, [upper_addr], owner_key, "lower", slots=1)
    lower_id = lower.wait_joined(hub)
    (peer,) = start_peers(cluster, [lower_addr], owner_key, count=1)
    peer_id = peer.wait_joined(hub)

    view = nodes_by_id(hub)
    assert view[upper_id]["via"] is None
    assert view[lower_id]["via"] == upper_id
    assert view[peer_id]["via"] == lower_id

    gate_project.open_gate()
    tasks = [(f"t-{i}", gate_project.task_input(i)) for i in range(9)]
    hub.submit(write_tasks(tmp_path / "tasks.jsonl", "gate", tasks))
    results = hub.wait_results("gate", 9)
    assert sorted(r["id"] for r in results) == sorted(t for t, _ in tasks)
    assert {r["node"] for r in results} <= {upper_id, lower_id, peer_id}
    assert hub.query("status")["transfers"]["bundles_sent"] == 1


def test_a_peer_finds_the_relay_by_broadcast(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(gate_project.bundle)
    discovery_port = free_port()
    relay, _ = start_relay(
        cluster, hub, owner_key, relay_settings={"discovery": f"0.0.0.0:{discovery_port}"}
    )
    relay_id = relay.wait_joined(hub)
    # Only the hub is configured; the broadcast (on loopback only) finds the relay first.
    discover = {"address": "127.255.255.255", "port": discovery_port, "timeout": 0.5}
    (peer,) = start_peers(cluster, [hub.addr], owner_key, count=1, discover=discover)
    peer_id = peer.wait_joined(hub)
    assert nodes_by_id(hub)[peer_id]["via"] == relay_id
