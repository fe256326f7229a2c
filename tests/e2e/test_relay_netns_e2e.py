"""Peers in a network namespace with no route to the hub: only the relay can reach it.

The test makes its own namespace and a veth pair (10.231.<n>.0/30, on no real network):
the relay listens on the root side of the pair, the peers run inside the namespace with
``ip netns exec``, and the hub listens on the root namespace's 127.0.0.1, which the
namespace cannot see. Needs root and a working ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import Cluster, GateProject, Node, OwnerKey, free_port, wait_until, write_tasks

pytestmark = pytest.mark.e2e


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _netns_usable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root to make a network namespace"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"issc-probe-{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"ip netns does not work here: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@pytest.fixture
def lan() -> Iterator[tuple[str, str, str]]:
    """(namespace, relay-side address, peer-side address) of a fresh veth LAN."""
    why = _netns_usable()
    if why is not None:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]
    ns, outer, inner = f"issc-lan-{tag}", f"issr{tag}", f"issp{tag}"
    subnet = int(tag[:2], 16)
    relay_ip, peer_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    steps = [
        ("netns", "add", ns),
        ("link", "add", outer, "type", "veth", "peer", "name", inner),
        ("link", "set", inner, "netns", ns),
        ("addr", "add", f"{relay_ip}/30", "dev", outer),
        ("link", "set", outer, "up"),
        ("-n", ns, "addr", "add", f"{peer_ip}/30", "dev", inner),
        ("-n", ns, "link", "set", inner, "up"),
        ("-n", ns, "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot build the test LAN (ip {' '.join(step)}): {done.stderr}")
        yield ns, relay_ip, peer_ip
    finally:
        _ip("link", "del", outer)  # takes its peer end with it
        _ip("netns", "del", ns)


class NamespacedNode(Node):
    """A node run inside network namespace ``ns``."""

    def __init__(self, *args: Any, ns: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ns = ns

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *super().argv()]


def test_peers_without_a_route_to_the_hub_work_through_the_relay(
    cluster: Cluster,
    owner_key: OwnerKey,
    gate_project: GateProject,
    tmp_path: Path,
    lan: tuple[str, str, str],
) -> None:
    ns, relay_ip, _peer_ip = lan
    hub = cluster.hub()
    hub.ingest(gate_project.bundle)
    hub_port = int(hub.addr.rsplit(":", 1)[1])
    unreachable = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c",
         f"import socket; socket.create_connection(('127.0.0.1', {hub_port}), timeout=2)"],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert unreachable.returncode != 0, "the namespace can reach the hub: the test proves nothing"

    port = free_port()
    relay = cluster.node(
        hub,
        "relay",
        trusted_keys={"gate": owner_key.public},
        volunteer="rita",
        slots=1,
        relay={"listen": f"{relay_ip}:{port}"},
    )
    relay_id = relay.wait_joined(hub)
    wait_until((relay.data_dir / "relay.addr").exists, what="the relay to accept peers")
    peers = []
    for i in (1, 2):
        peer = NamespacedNode(
            cluster.root / "nodes",
            f"peer{i}",
            [f"{relay_ip}:{port}", hub.addr],  # the hub's address leads nowhere from inside
            ns=ns,
            trusted_keys={"gate": owner_key.public},
            volunteer=f"vol{i}",
            slots=1,
        )
        cluster.procs.append(peer)
        peers.append(peer.start())
    peer_ids = [peer.wait_joined(hub) for peer in peers]
    view = {n["node"]: n for n in hub.query("nodes")}
    assert all(view[p]["via"] == relay_id for p in peer_ids), view

    gate_project.open_gate()
    tasks = [(f"t-{i}", gate_project.task_input(i)) for i in range(8)]
    hub.submit(write_tasks(tmp_path / "tasks.jsonl", "gate", tasks))
    results = hub.wait_results("gate", 8)
    assert sorted(r["id"] for r in results) == sorted(t for t, _ in tasks)
    assert all(r["state"] == "C" for r in results)
