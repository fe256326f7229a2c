"""A node that freezes, dies, or stops cleanly in the middle of a task.

All three use the gate project (see GATE_PROGRAM): the task holds its lease until the test
opens the gate, so "mid-task" is a state the test waits for, not a guess about timing.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from e2e_harness import (
    HEARTBEAT_INTERVAL,
    LEASE_WINDOW,
    Cluster,
    GateProject,
    Hub,
    Node,
    OwnerKey,
    holds_for,
    pid_alive,
    processes_naming,
    wait_until,
    write_tasks,
)

pytestmark = pytest.mark.e2e

# The hub checks heartbeats every 0.25 s (its tick); add commit time and the scheduling
# noise of a loaded 2-core machine.
LOSS_MARGIN = 1.0
# The node's last word came at most one heartbeat interval (plus noise) before the freeze
# or the kill, so the loss comes no sooner than this after it. A lease dropped as soon as
# the connection breaks would come in well under it.
LOSS_EARLIEST = LEASE_WINDOW - 2 * HEARTBEAT_INTERVAL


def start_one_task(
    cluster: Cluster, gate: GateProject, owner_key: OwnerKey, tmp_path: Path, node_name: str
) -> tuple[Hub, Node, str]:
    """A hub, one node with one slot, and task t-1 running on it (waiting at the gate)."""
    hub = cluster.hub()
    hub.ingest(gate.bundle)
    node = cluster.node(hub, node_name, trusted_keys={"gate": owner_key.public}, slots=1)
    node_id = node.wait_joined(hub)
    hub.submit(write_tasks(tmp_path / "one.jsonl", "gate", [("t-1", gate.task_input())]))
    wait_until(gate.started, what="the task to start on the first node")
    wait_until(lambda: hub.task("gate", "t-1")["state"] == "A", what="the lease to be confirmed")
    assert hub.task("gate", "t-1")["node"] == node_id
    return hub, node, node_id


def wait_lease_ended(hub: Hub, index: int = 0, timeout: float = 10.0) -> dict[str, object]:
    """The ``index``-th lease of t-1, once the hub has ended it."""

    def ended() -> dict[str, object] | None:
        history = hub.lease_history("gate", "t-1")
        if len(history) > index and history[index]["ended_at"] is not None:
            return history[index]
        return None

    return wait_until(ended, timeout, what=f"lease #{index + 1} of t-1 to end")


def test_frozen_node_loses_its_lease_and_another_node_finishes(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, frozen, frozen_id = start_one_task(cluster, gate_project, owner_key, tmp_path, "frozen")

    frozen.kill(signal.SIGSTOP)
    frozen_at = time.time()
    # Started only now, so the task cannot have gone to it before the freeze.
    rescuer = cluster.node(hub, "rescuer", trusted_keys={"gate": owner_key.public}, slots=1)

    lost = wait_lease_ended(hub)
    lost_after = float(lost["ended_at"]) - frozen_at  # type: ignore[arg-type]
    print(
        f"\nSIGSTOP: lease lost {lost_after:.2f} s after the freeze "
        f"(window {LEASE_WINDOW:g} s = {HEARTBEAT_INTERVAL:g} s x misses); {lost['detail']}"
    )
    assert lost["outcome"] == "lost" and lost["node"] == frozen_id
    assert LOSS_EARLIEST <= lost_after <= LEASE_WINDOW + LOSS_MARGIN

    gate_project.open_gate()
    rescuer_id = rescuer.wait_joined(hub)
    [line] = hub.wait_results("gate", 1)
    assert line["id"] == "t-1" and line["state"] == "C"
    assert line["node"] == rescuer_id
    assert line["attempts"] == 2  # the frozen node's lease counted as a failed attempt

    # The frozen node wakes up, reconnects and reports its stale result: the hub
    # acknowledges it without recording anything, and the node forgets it.
    frozen.kill(signal.SIGCONT)
    wait_until(
        lambda: frozen_id in hub.connected_nodes() and not frozen.spooled(),
        what="the frozen node to reconnect and empty its spool",
    )
    wait_until(
        lambda: "did not record result of lease" in frozen.log_text(),
        what="the hub to turn down the frozen node's stale result",
    )
    holds_for(lambda: len(hub.results("gate")) == 1, 1.0, what="exactly one results line")
    task = hub.task("gate", "t-1")
    assert (task["state"], task["node"], task["attempts"]) == ("C", rescuer_id, 2)


def test_late_result_of_a_frozen_node_wins_and_the_rescuer_is_cancelled(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, frozen, frozen_id = start_one_task(cluster, gate_project, owner_key, tmp_path, "frozen")
    [frozen_run] = gate_project.started()
    frozen.kill(signal.SIGSTOP)
    rescuer = cluster.node(hub, "rescuer", trusted_keys={"gate": owner_key.public}, slots=1)
    assert wait_lease_ended(hub)["outcome"] == "lost"
    rescuer_id = rescuer.wait_joined(hub)
    rescuer_run = wait_until(
        lambda: next((r for r in gate_project.started() if r.node == "rescuer"), None),
        what="the rescuer to run the task",
    )

    # The frozen node's run finishes while its node is still frozen; once thawed, the node
    # delivers that result for a lease the hub has already given to the rescuer.
    gate_project.open_gate("frozen")
    wait_until(lambda: not pid_alive(frozen_run.pid), what="the frozen node's run to end")
    frozen.kill(signal.SIGCONT)
    [line] = hub.wait_results("gate", 1)
    assert (line["state"], line["node"], line["attempts"]) == ("C", frozen_id, 2)
    assert line["result"]["node"] == "frozen"
    history = hub.lease_history("gate", "t-1")
    assert [(h["outcome"], h["node"]) for h in history] == [
        ("lost", frozen_id),
        ("superseded", rescuer_id),
    ]
    # The hub cancels the rescuer's now useless run, and nothing more is recorded.
    wait_until(lambda: not pid_alive(rescuer_run.pid), what="the rescuer's run to be killed")
    holds_for(lambda: len(hub.results("gate")) == 1, 1.0, what="exactly one results line")
    assert rescuer.alive and rescuer_id in hub.connected_nodes()


def test_killed_node_task_goes_back_and_completes_elsewhere(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, victim, victim_id = start_one_task(cluster, gate_project, owner_key, tmp_path, "victim")
    rescuer = cluster.node(hub, "rescuer", trusted_keys={"gate": owner_key.public}, slots=1)
    rescuer_id = rescuer.wait_joined(hub)
    [run] = gate_project.started()

    victim.kill(signal.SIGKILL)
    killed_at = time.time()
    lost = wait_lease_ended(hub)
    lost_after = float(lost["ended_at"]) - killed_at  # type: ignore[arg-type]
    print(f"\nSIGKILL: lease lost {lost_after:.2f} s after the kill; {lost['detail']}")
    # The kernel kills the task with its node (PR_SET_PDEATHSIG): nothing runs on unwatched.
    wait_until(lambda: not pid_alive(run.pid), timeout=5, what="the task to die with its node")
    assert lost["outcome"] == "lost" and lost["node"] == victim_id
    # The operator's log names the task, the node and the volunteer, and says why.
    wait_until(
        lambda: f"of task gate/t-1 on node {victim_id} (volunteer alice) ended: lost"
        in hub.log_text(),
        timeout=5,
        what="the hub's log line for the lost lease",
    )
    # The dropped connection alone does not end the lease (the node may come back and
    # resume it); the missed heartbeats do.
    assert LOSS_EARLIEST <= lost_after <= LEASE_WINDOW + LOSS_MARGIN

    # Back to NA, then offered to the rescuer, which now runs it (it waits at the gate).
    wait_until(lambda: hub.task("gate", "t-1")["node"] == rescuer_id, what="the re-offer")
    gate_project.open_gate()
    [line] = hub.wait_results("gate", 1)
    assert (line["id"], line["state"], line["node"]) == ("t-1", "C", rescuer_id)
    assert line["attempts"] == 2
    history = hub.lease_history("gate", "t-1")
    assert [h["outcome"] for h in history] == ["lost", "completed"]


@pytest.mark.parametrize("gate_project", ["process", "persistent"], indirect=True)
def test_clean_stop_gives_the_lease_back(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, leaver, leaver_id = start_one_task(cluster, gate_project, owner_key, tmp_path, "leaver")
    [run] = gate_project.started()
    assert pid_alive(run.pid)

    stopped_at = time.monotonic()
    leaver.kill(signal.SIGTERM)
    status = leaver.wait(timeout=5)
    took = time.monotonic() - stopped_at
    print(f"\nSIGTERM: node exited with status {status} after {took:.2f} s")
    assert status == 0
    # Its task process (or persistent worker) is gone with it, and so is anything else
    # that ran from its bundles.
    assert not pid_alive(run.pid)
    assert processes_naming(str(leaver.data_dir)) == []

    given_back = wait_lease_ended(hub)
    assert given_back["outcome"] == "declined" and given_back["node"] == leaver_id
    task = hub.task("gate", "t-1")
    assert (task["state"], task["attempts"]) == ("NA", 0)  # given back: no attempt used

    successor = cluster.node(hub, "successor", trusted_keys={"gate": owner_key.public}, slots=1)
    gate_project.open_gate()
    successor_id = successor.wait_joined(hub)
    [line] = hub.wait_results("gate", 1)
    assert (line["state"], line["node"], line["attempts"]) == ("C", successor_id, 1)
