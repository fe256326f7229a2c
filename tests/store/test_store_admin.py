"""What issc-ctl reads and changes through the store: pause flags, cancelled tasks,
volunteers and the export of everything held about one volunteer."""

from __future__ import annotations

import json

import pytest
from storekit import KEY1, KEY2, N1, N2, T0, add, finished, register, task_row, volunteer_row

from hub.changes import LeaseAccepted, LeaseEnded, LeaseOffered, ProjectPauseChanged, TaskFinished
from hub.lifecycle import TaskState
from hub.store import Store
from issc.errors import StoreError

CANCELLED = "cancelled by admin"


def cancelled(pk: int, lease: int | None = None, node: str | None = None) -> TaskFinished:
    return TaskFinished(
        task_pk=pk,
        state=TaskState.X,
        attempts=1 if lease else 0,
        lease=lease,
        node_id=node,
        volunteer="alice" if node else None,
        result=None,
        error=CANCELLED,
        cpu_seconds=0.0,
        wall_seconds=0.0,
        at=T0 + 20,
    )


def test_the_pause_flag_is_written_and_restored(store: Store) -> None:
    project, _ = register(store)
    store.apply([ProjectPauseChanged(project.id, True)])
    assert store.project_summary("primes")["paused"] is True
    assert [p.paused for p in store.load_snapshot().projects] == [True]
    # A newer bundle keeps the flag: pausing is the admin's, not the owner's.
    newer, changed = register(store, version=2)
    assert changed and newer.paused
    store.apply([ProjectPauseChanged(project.id, True), ProjectPauseChanged(project.id, False)])
    assert store.project_summary("primes")["paused"] is False  # the last change wins


def test_project_summary_of_one_project(store: Store) -> None:
    register(store)
    register(store, "other")
    add(store, "primes", ["a", "b"])
    add(store, "other", ["c"])
    assert store.project_summary("primes") == {
        "name": "primes",
        "version": 1,
        "paused": False,
        "tasks": {"NA": 2, "TA": 0, "A": 0, "C": 0, "F": 0, "X": 0},
    }
    with pytest.raises(StoreError, match="no project named 'nosuch'"):
        store.project_summary("nosuch")


def test_cancelled_tasks_are_x_with_the_reason_earn_nothing_and_go_to_the_outbox(
    store: Store,
) -> None:
    register(store)
    store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0)
    waiting, running = add(store, "primes", ["w", "r"])
    store.apply([LeaseOffered(1, running, N1, T0), LeaseAccepted(1, T0 + 1)])
    store.apply(
        [
            LeaseEnded(1, "cancelled", CANCELLED, T0 + 20),
            cancelled(waiting),
            cancelled(running, 1, N1),
        ]
    )
    for pk in (waiting, running):
        row = task_row(store, pk)
        assert (row["state"], row["error"], row["finished_at"]) == ("X", CANCELLED, T0 + 20)
    assert task_row(store, running)["node_id"] == N1
    assert task_row(store, waiting)["node_id"] is None
    alice = volunteer_row(store, "alice")
    assert (alice["credit"], alice["tasks_completed"]) == (0.0, 0)
    out = {t.task_id: t for t in store.unexported(10)}
    assert {k: (t.state, t.error, t.result_json) for k, t in out.items()} == {
        "w": ("X", CANCELLED, None),
        "r": ("X", CANCELLED, None),
    }
    assert store.load_snapshot().waiting == {}


def test_volunteers_with_credit_and_nodes(store: Store) -> None:
    register(store)
    store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0)
    store.enroll_node("alice", KEY2, None, True, "a:2", 2, T0)
    store.issue_token("bob", T0)
    (pk,) = add(store, "primes", ["t"])
    store.apply([LeaseOffered(1, pk, N1, T0), finished(pk, 1, node=N1, cpu=2.25)])
    assert store.volunteers_summary() == [
        {
            "volunteer": "alice",
            "credit": 2.25,
            "tasks_completed": 1,
            "nodes": 2,
            "created_at": "2027-01-15T08:00:00Z",
        },
        {
            "volunteer": "bob",
            "credit": 0.0,
            "tasks_completed": 0,
            "nodes": 0,
            "created_at": "2027-01-15T08:00:00Z",
        },
    ]


def test_volunteer_export_holds_everything_but_secrets(store: Store) -> None:
    register(store)
    token = store.issue_token("alice", T0)
    store.enroll_node("alice", KEY1, token, False, "10.0.0.5:4000", 4, T0 + 1)
    store.enroll_node("bob", KEY2, None, True, "10.0.0.6:4000", 1, T0 + 1)
    done, lost, other = add(store, "primes", ["done", "lost", "other"])
    store.apply(
        [
            LeaseOffered(1, done, N1, T0 + 2),
            LeaseAccepted(1, T0 + 3),
            LeaseOffered(2, lost, N1, T0 + 2),
            LeaseEnded(2, "lost", "no heartbeat for 1.6 s", T0 + 5),
            LeaseOffered(3, other, N2, T0 + 2),
            finished(done, 1, node=N1, cpu=1.5, at=T0 + 9),
        ]
    )
    doc = store.volunteer_export("alice")
    assert (doc["volunteer"], doc["credit"], doc["tasks_completed"]) == ("alice", 1.5, 1)
    assert doc["created_at"] == "2027-01-15T08:00:00Z"
    assert doc["enrollment_tokens"] == [
        {"created_at": "2027-01-15T08:00:00Z", "used_at": "2027-01-15T08:00:01Z", "used_by": N1}
    ]
    (node,) = doc["nodes"]
    assert node["node"] == N1 and node["public_key"] == KEY1
    assert (node["address"], node["slots"]) == ("10.0.0.5:4000", 4)
    assert (node["first_seen"], node["last_seen"]) == ("2027-01-15T08:00:01Z",) * 2
    assert doc["tasks"] == [
        {
            "project": "primes",
            "id": "done",
            "state": "C",
            "attempts": 1,
            "node": N1,
            "cpu_seconds": 1.5,
            "finished_at": "2027-01-15T08:00:09Z",
            "error": None,
        }
    ]
    assert [(lease["lease"], lease["task"], lease["outcome"]) for lease in doc["leases"]] == [
        (1, "done", None),  # the finishing change does not end the lease row itself
        (2, "lost", "lost"),
    ]
    assert doc["leases"][0]["cpu_seconds"] == 1.5 and doc["leases"][1]["cpu_seconds"] is None
    text = json.dumps(doc)  # one JSON document
    assert "hash" not in text and "secret" not in text and token not in text
    assert "other" not in text and N2 not in text  # nothing of bob's


def test_exporting_an_unknown_volunteer_names_it(store: Store) -> None:
    with pytest.raises(StoreError, match="no volunteer named 'nobody'"):
        store.volunteer_export("nobody")
