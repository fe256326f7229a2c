"""Node identity and enrollment with real processes: a closed hub refuses an unknown
volunteer, takes a token from ``issc-ctl volunteer add`` exactly once, and a node keeps
its id (its key) across restarts."""

from __future__ import annotations

import re
import stat

import pytest
from e2e_harness import Cluster, Hub, Node, OwnerKey, run_tool, wait_until

pytestmark = pytest.mark.e2e


def volunteer_add(hub: Hub, name: str) -> str:
    """``issc-ctl volunteer add NAME``: prints just the token."""
    out = run_tool("issc-ctl", "--socket", str(hub.control_socket), "volunteer", "add", name)
    token = out.stdout.strip()
    assert re.fullmatch(r"issc-[A-Za-z0-9_-]{20,}", token), out.stdout
    return token


def refused(node: Node, fragment: str) -> str:
    """Wait for ``node`` to give up; its log, which must name the cause."""
    status = node.wait(20)
    log = node.log_text()
    assert status != 0, log
    assert "issc-node: error: the hub refused node" in log, log
    assert fragment in log, log
    return log


def test_closed_registration_refuses_an_unknown_volunteer(
    cluster: Cluster, owner_key: OwnerKey
) -> None:
    hub = cluster.hub(registration="closed")
    node = cluster.node(hub, volunteer="bob", trusted_keys={"gate": owner_key.public})
    refused(node, "volunteer 'bob' is unknown and registration is closed")
    assert "issc-ctl volunteer add bob" in node.log_text()
    # The hub logged the refusal with the node's address.
    wait_until(lambda: "refused node from 127.0.0.1:" in hub.log_text(), what="the hub's log")
    assert hub.connected_nodes() == set()
    assert hub.alive


def test_a_token_enrolls_one_node_and_the_node_keeps_its_id(
    cluster: Cluster, owner_key: OwnerKey
) -> None:
    hub = cluster.hub(registration="closed")
    token = volunteer_add(hub, "alice")
    keys = {"gate": owner_key.public}
    first = cluster.node(hub, "first", volunteer="alice", token=token, trusted_keys=keys)
    node_id = first.wait_joined(hub)
    key_file = first.data_dir / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()

    # A second machine with the same token is turned away, naming the node that used it.
    second = cluster.node(hub, "second", volunteer="alice", token=token, trusted_keys=keys)
    refused(second, f"already used by node {node_id}; a token enrolls one node")

    # The enrolled node restarts (token still in its config): same key, same id.
    assert first.stop() == 0
    first.start()
    assert first.wait_joined(hub) == node_id
    assert key_file.read_bytes() == key
    # Without the token line too: it is known by its key now.
    assert first.stop() == 0
    del first.settings["token"]
    first.start()
    assert first.wait_joined(hub) == node_id

    # Another token from issc-ctl lets the second machine in, as a node of its own.
    second.settings["token"] = volunteer_add(hub, "alice")
    second.start()
    second_id = second.wait_joined(hub)
    assert second_id != node_id
    assert hub.connected_nodes() == {node_id, second_id}
    assert {n["volunteer"] for n in hub.query("nodes")} == {"alice"}
