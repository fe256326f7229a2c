"""The hub is killed with SIGKILL in the middle of a run and restarted on the same data."""

from __future__ import annotations

import collections
import signal
import time
from pathlib import Path

import pytest
from e2e_harness import (
    Cluster,
    OwnerKey,
    free_port,
    pack,
    wait_until,
    write_project,
    write_tasks,
)

pytestmark = pytest.mark.e2e

# Persistent mode keeps each task cheap, so 200 of them make a run of a few seconds. A task
# whose input names a gate file waits until it exists: the test holds two tasks running
# across the outage, so their results are certain to wait in a node's spool.
DOUBLE_PROGRAM = """\
import json, os, sys, time
for line in sys.stdin:
    message = json.loads(line)
    value = message["input"]
    time.sleep(value["sleep"])
    deadline = time.monotonic() + 60
    while value["gate"] and not os.path.exists(value["gate"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    print(json.dumps({"id": message["id"], "result": value["n"] * 2}), flush=True)
"""
TASKS = 200
HELD = {"d-40", "d-41"}  # two slots of four stay busy; the other two keep the hub busy


def test_hub_killed_mid_run_loses_nothing_and_duplicates_nothing(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    bundle = pack(
        write_project(tmp_path / "double-src", "double", DOUBLE_PROGRAM, mode="persistent"),
        owner_key,
        tmp_path / "double-1.issc",
    )
    gate = tmp_path / "gate"
    # A fixed port, so the nodes find the restarted hub by themselves. A long heartbeat
    # window, so leases restored at restart outlive the nodes' reconnect back-off: this
    # test is about durability, not about lease expiry.
    hub = cluster.hub(port=free_port(), heartbeat_misses=20)
    hub.ingest(bundle)
    keys = {"double": owner_key.public}
    nodes = [cluster.node(hub, f"node{i}", trusted_keys=keys, slots=2) for i in (1, 2)]
    for node in nodes:
        node.wait_joined(hub)
    tasks = [
        (f"d-{n}", {"n": n, "sleep": 0.01, "gate": str(gate) if f"d-{n}" in HELD else None})
        for n in range(TASKS)
    ]
    submitted = time.monotonic()
    hub.submit(write_tasks(tmp_path / "double.jsonl", "double", tasks))

    def held_running_and_a_third_done() -> bool:
        if len(hub.results("double")) < TASKS // 3:
            return False
        states = {t["id"]: t["state"] for t in hub.query("tasks", project="double")}
        return all(states[task_id] == "A" for task_id in HELD)

    wait_until(held_running_and_a_third_done, 30, 0.01, "a third of the results")
    hub.kill(signal.SIGKILL)  # while the two free slots keep results and offers flowing
    killed = time.monotonic()
    at_kill = len(hub.results("double"))
    assert at_kill < TASKS, "the run ended before the hub could be killed"
    held_leases = {h["id"] for t in HELD for h in hub.lease_history("double", t)[-1:]}

    # With no hub, the nodes finish what they hold and keep the results in their spools.
    gate.write_text("")
    wait_until(
        lambda: held_leases <= {lease for node in nodes for lease in node.spooled()},
        10,
        what="the held tasks' results in the spools",
    )
    spooled = {lease for node in nodes for lease in node.spooled()}
    restarted = time.monotonic()
    hub.start()
    results = hub.wait_results("double", TASKS, timeout=60)
    print(
        f"\nhub SIGKILL after {at_kill}/{TASKS} results lines ({killed - submitted:.2f} s); "
        f"{len(spooled)} results spooled while it was down; all {TASKS} lines "
        f"{time.monotonic() - restarted:.2f} s after the restart"
    )

    counts = collections.Counter(r["id"] for r in results)
    assert set(counts) == {f"d-{n}" for n in range(TASKS)}
    assert [i for i, n in counts.items() if n > 1] == []
    assert len(results) == TASKS
    assert {r["state"] for r in results} == {"C"}
    assert all(r["result"] == 2 * int(r["id"][2:]) for r in results)
    assert all(r["attempts"] == 1 for r in results if r["id"] in HELD)

    # Every result spooled during the outage was delivered and accepted once the hub was
    # back: the lease that produced it is the lease that completed its task.
    wait_until(lambda: not any(node.spooled() for node in nodes), what="the spools to empty")
    marks = ",".join("?" * len(spooled))
    accepted = hub.sql(f"SELECT lease_id FROM results WHERE lease_id IN ({marks})", *spooled)
    assert {row[0] for row in accepted} == spooled
    assert hub.query("status")["tasks"]["C"] == TASKS


def test_a_node_rejoins_a_hub_that_restarts_again_and_again(
    cluster: Cluster, owner_key: OwnerKey
) -> None:
    # Back-off starts over after every connection that was welcomed: without that, the
    # delay before a reconnect doubles with every hub restart in the node's life, up to
    # 30 s, and a node of a hub restarted a few times comes back ever more slowly.
    hub = cluster.hub(port=free_port())
    node = cluster.node(hub, "node1", trusted_keys={"gate": owner_key.public}, slots=1)
    node_id = node.wait_joined(hub)
    for restart in range(8):
        hub.kill(signal.SIGKILL)
        hub.wait(10)
        hub.start()
        started = time.monotonic()
        wait_until(
            lambda: node_id in hub.connected_nodes(),
            # Back-off while the hub was down is at most a few doublings from 0.5 s; a
            # count that never started over reaches the 30 s cap after a few restarts.
            timeout=12,
            what=f"the node to rejoin after restart {restart + 1}",
        )
        print(f"restart {restart + 1}: rejoined in {time.monotonic() - started:.2f} s")
