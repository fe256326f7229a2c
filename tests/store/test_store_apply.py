"""Scheduler changes in, snapshot out: ``apply`` commits a batch whole or not at all,
and ``load_snapshot`` gives back exactly what the scheduler needs, also after the
store was closed and opened again (the hub restarted).
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from storekit import (
    KEY1,
    KEY2,
    N1,
    N2,
    T0,
    add,
    dump,
    finished,
    lease_rows,
    register,
    task_row,
    volunteer_row,
)

from hub.changes import Change, LeaseAccepted, LeaseEnded, LeaseOffered, TaskFinished, TaskUpdated
from hub.events import (
    ProjectInfo,
)
from hub.lifecycle import TaskState
from hub.models import Result
from hub.scheduler import (
    LeaseRec,
    Snapshot,
    TaskRec,
)
from hub.store import Store
from issc.errors import StoreError

NA, TA, A, C, F = TaskState.NA, TaskState.TA, TaskState.A, TaskState.C, TaskState.F


def offer(lease: int, pk: int, node: str, at: float, attempts: int = 0) -> list[Change]:
    return [LeaseOffered(lease, pk, node, at), TaskUpdated(pk, TA, attempts, lease, node)]


def accept(lease: int, pk: int, node: str, at: float, attempts: int = 1) -> list[Change]:
    return [LeaseAccepted(lease, at), TaskUpdated(pk, A, attempts, lease, node)]


def requeue(lease: int, pk: int, outcome: str, at: float, attempts: int) -> list[Change]:
    return [
        LeaseEnded(lease, outcome, f"why {lease}", at),
        TaskUpdated(pk, NA, attempts, None, None),
    ]


class World:
    """Two projects with tasks in every state, written in ONE apply() call."""

    def __init__(self, store: Store) -> None:
        self.primes, _ = register(store, "primes")
        self.mandel, _ = register(store, "mandel", owner="ed25519:" + "C" * 43 + "=")
        assert store.enroll_node("alice", KEY1, None, True, "a:1", 4, T0) == N1
        assert store.enroll_node("bob", KEY2, None, True, "b:1", 4, T0) == N2
        pks = add(store, "primes", [f"t{i}" for i in range(8)])
        self.m = add(store, "mandel", ["m0", "m1"])
        self.t = dict(enumerate(pks))
        t = self.t
        self.batch: list[Change] = [
            # t0: leased and running (A) on n1
            *offer(1, t[0], N1, T0 + 1),
            *accept(1, t[0], N1, T0 + 2),
            # t1: offered, not yet accepted (TA)
            *offer(2, t[1], N1, T0 + 1),
            # t2: completed by alice
            *offer(3, t[2], N1, T0 + 1),
            *accept(3, t[2], N1, T0 + 2),
            LeaseEnded(3, "completed", None, T0 + 9),
            finished(t[2], 3, node=N1, result={"x": [1, 2.5, "z"]}, cpu=2.0, at=T0 + 9),
            # t3: lost on n2 -> back to NA with one attempt spent (a retry, ended at +8)
            *offer(4, t[3], N2, T0 + 1),
            *accept(4, t[3], N2, T0 + 2),
            *requeue(4, t[3], "lost", T0 + 8, attempts=1),
            # t4: code error on n2, then offered again to n1 (TA with one code error)
            *offer(5, t[4], N2, T0 + 1),
            *accept(5, t[4], N2, T0 + 2),
            *requeue(5, t[4], "code_error", T0 + 3, attempts=1),
            *offer(6, t[4], N1, T0 + 4, attempts=1),
            # t5: failed for good
            *offer(7, t[5], N2, T0 + 1),
            *accept(7, t[5], N2, T0 + 2),
            LeaseEnded(7, "lost", "no heartbeat", T0 + 7),
            TaskFinished(t[5], F, 1, 7, N2, "bob", None, "gave up", 0.0, 0.0, T0 + 7),
            # t6: offer expired at +9, after t3's retry -> NA, no attempt, in front of t3
            *offer(8, t[6], N1, T0 + 1),
            *requeue(8, t[6], "offer_expired", T0 + 9, attempts=0),
            # t7: never offered. m0 of the other project: completed by bob
            *offer(9, self.m[0], N2, T0 + 1),
            *accept(9, self.m[0], N2, T0 + 2),
            LeaseEnded(9, "completed", None, T0 + 6),
            finished(self.m[0], 9, volunteer="bob", node=N2, cpu=0.25, at=T0 + 6, result=None),
        ]

    def expected_snapshot(self) -> Snapshot:
        t = self.t
        return Snapshot(
            projects=[self.primes, self.mandel],
            # retries first, the latest retry first; then untouched tasks in order
            waiting={self.primes.id: [t[6], t[3], t[7]], self.mandel.id: [self.m[1]]},
            tasks=[
                TaskRec(t[0], self.primes.id, A, 1, 0, 1, []),
                TaskRec(t[1], self.primes.id, TA, 0, 0, 2, []),
                TaskRec(t[3], self.primes.id, NA, 1, 0, None, [4]),
                TaskRec(t[4], self.primes.id, TA, 1, 1, 6, [5]),
                TaskRec(t[6], self.primes.id, NA, 0, 0, None, [8]),
            ],
            # Each lease knows its node's volunteer; an ended one, how it ended (whether
            # with its result: then it takes no other one).
            leases=[
                LeaseRec(1, t[0], N1, True, T0 + 1, "alice"),
                LeaseRec(2, t[1], N1, False, T0 + 1, "alice"),
                LeaseRec(6, t[4], N1, False, T0 + 4, "alice"),
            ],
            past_leases=[
                LeaseRec(4, t[3], N2, True, T0 + 1, "bob", "lost"),
                LeaseRec(5, t[4], N2, True, T0 + 1, "bob", "code_error"),
                LeaseRec(8, t[6], N1, False, T0 + 1, "alice", "offer_expired"),
            ],
            node_volunteers={N1: "alice", N2: "bob"},
            next_lease_id=10,
        )


def normalized(snap: Snapshot) -> Snapshot:
    """The snapshot with its unordered parts in a fixed order."""
    return Snapshot(
        projects=sorted(snap.projects, key=lambda p: p.id),
        waiting=snap.waiting,
        tasks=sorted(snap.tasks, key=lambda t: t.pk),
        leases=sorted(snap.leases, key=lambda lease: lease.id),
        past_leases=sorted(snap.past_leases, key=lambda lease: lease.id),
        node_volunteers=snap.node_volunteers,
        next_lease_id=snap.next_lease_id,
    )


def test_one_batch_of_every_change_type_restores_exactly(store: Store) -> None:
    world = World(store)
    store.apply(world.batch)
    assert normalized(store.load_snapshot()) == normalized(world.expected_snapshot())


def test_nothing_is_lost_when_the_store_is_opened_again(store: Store, store_url: str) -> None:
    world = World(store)
    store.apply(world.batch)
    before = dump(store)
    store.close()
    reopened = Store(store_url)
    try:
        reopened.create_schema()
        assert dump(reopened) == before
        assert normalized(reopened.load_snapshot()) == normalized(world.expected_snapshot())
    finally:
        reopened.close()


def test_the_same_changes_in_many_batches_end_the_same(store: Store) -> None:
    world = World(store)
    for change in world.batch:
        store.apply([change])
    assert normalized(store.load_snapshot()) == normalized(world.expected_snapshot())


def test_finished_tasks_rows_results_and_credit(store: Store) -> None:
    world = World(store)
    store.apply(world.batch)
    t = world.t
    done = task_row(store, t[2])
    assert {k: done[k] for k in ("state", "attempts", "lease_id", "node_id", "volunteer")} == {
        "state": "C",
        "attempts": 1,
        "lease_id": 3,
        "node_id": N1,
        "volunteer": "alice",
    }
    assert (done["cpu_seconds"], done["finished_at"], done["error"]) == (2.0, T0 + 9, None)
    failed = task_row(store, t[5])
    assert (failed["state"], failed["error"], failed["finished_at"]) == ("F", "gave up", T0 + 7)
    with store.engine.connect() as conn:
        results = {r.lease_id: r for r in conn.execute(select(Result))}
    assert set(results) == {3, 9}  # a failed task has no result row
    assert json.loads(results[3].result_json) == {"x": [1, 2.5, "z"]}
    assert (results[3].task_id, results[3].ok, results[3].cpu_seconds) == (t[2], True, 2.0)
    assert (results[3].wall_seconds, results[3].received_at) == (4.0, T0 + 9)
    assert json.loads(results[9].result_json) is None
    alice, bob = volunteer_row(store, "alice"), volunteer_row(store, "bob")
    assert (alice["tasks_completed"], alice["credit"]) == (1, 2.0)
    assert (bob["tasks_completed"], bob["credit"]) == (1, 0.25)  # a failure earns nothing
    leases = lease_rows(store)
    assert (leases[4]["outcome"], leases[4]["detail"], leases[4]["ended_at"]) == (
        "lost",
        "why 4",
        T0 + 8,
    )
    assert (leases[2]["accepted_at"], leases[2]["ended_at"]) == (None, None)


def test_credit_adds_up_within_and_across_batches(store: Store) -> None:
    register(store)
    store.enroll_node("alice", KEY1, None, True, "a:1", 4, T0)
    pks = add(store, "primes", ["a", "b", "c"])
    store.apply(
        [
            *offer(1, pks[0], N1, T0),
            *offer(2, pks[1], N1, T0),
            finished(pks[0], 1, cpu=1.0),
            finished(pks[1], 2, cpu=2.0),
        ]
    )
    store.apply([*offer(3, pks[2], N1, T0), finished(pks[2], 3, cpu=4.0)])
    alice = volunteer_row(store, "alice")
    assert (alice["tasks_completed"], alice["credit"]) == (3, 7.0)


def test_a_completion_by_an_unknown_volunteer_still_finishes_the_task(store: Store) -> None:
    register(store)
    (pk,) = add(store, "primes", ["a"])
    store.apply([*offer(1, pk, N1, T0), finished(pk, 1, volunteer=None)])
    assert task_row(store, pk)["state"] == "C"
    assert store.state_counts()["C"] == 1


def test_a_late_result_completes_a_waiting_task(store: Store) -> None:
    """A lost lease's result arrives after the task went back to NA: it is C, not waiting."""
    info, _ = register(store)
    pks = add(store, "primes", ["a", "b"])
    store.apply([*offer(1, pks[0], N1, T0), *accept(1, pks[0], N1, T0)])
    store.apply(requeue(1, pks[0], "lost", T0 + 20, attempts=1))
    assert store.load_snapshot().waiting == {info.id: [pks[0], pks[1]]}
    store.apply([finished(pks[0], 1, at=T0 + 25)])
    snap = store.load_snapshot()
    assert snap.waiting == {info.id: [pks[1]]}
    assert (snap.tasks, snap.past_leases) == ([], [])


def test_retries_wait_in_front_latest_first(store: Store) -> None:
    info, _ = register(store)
    t = add(store, "primes", ["a", "b", "c", "d", "e"])
    store.apply(
        [
            *offer(1, t[1], N1, T0),
            *offer(2, t[3], N1, T0),
            *offer(3, t[4], N1, T0),
            *offer(4, t[2], N1, T0),
        ]
    )
    # Same moment for leases 1 and 3: the one ended later in the scheduler's order (the
    # higher lease) was put in front last.
    store.apply(requeue(1, t[1], "offer_expired", T0 + 60, 0))
    store.apply(requeue(3, t[4], "offer_expired", T0 + 60, 0))
    store.apply(requeue(2, t[3], "declined", T0 + 30, 0))
    assert store.load_snapshot().waiting == {info.id: [t[4], t[1], t[3], t[0]]}


# ---- failed batches -------------------------------------------------------------------


def _prepared(store: Store) -> tuple[list[int], dict[str, list[tuple[object, ...]]]]:
    register(store)
    pks = add(store, "primes", ["a", "b", "c"])
    store.apply(
        [*offer(1, pks[0], N1, T0), LeaseEnded(1, "completed", None, T0), finished(pks[0], 1)]
    )
    return pks, dump(store)


def test_a_batch_with_a_duplicate_lease_is_not_written_at_all(store: Store) -> None:
    pks, before = _prepared(store)
    with pytest.raises(StoreError, match="cannot commit a batch of 4 changes"):
        store.apply([*offer(2, pks[1], N1, T0 + 1), *offer(1, pks[2], N1, T0 + 1)])
    assert dump(store) == before


def test_a_batch_that_fails_at_its_last_statement_leaves_nothing(store: Store) -> None:
    """The results insert runs last; by then leases and tasks were written, and undone."""
    pks, before = _prepared(store)
    batch: list[Change] = [
        *offer(2, pks[1], N1, T0 + 1),
        *accept(2, pks[1], N1, T0 + 2),
        LeaseEnded(2, "lost", None, T0 + 3),
        *offer(3, pks[2], N1, T0 + 1),
        finished(pks[2], 1),  # a second result for lease 1: the results key is taken
    ]
    with pytest.raises(StoreError):
        store.apply(batch)
    assert dump(store) == before
    assert task_row(store, pks[1])["state"] == "NA"


def test_a_batch_for_a_task_that_does_not_exist_is_refused(store: Store) -> None:
    _, before = _prepared(store)
    with pytest.raises(StoreError):
        store.apply([*offer(2, 424242, N1, T0)])
    assert dump(store) == before


def test_the_store_works_on_after_a_failed_batch(store: Store) -> None:
    pks, _ = _prepared(store)
    with pytest.raises(StoreError):
        store.apply(offer(1, pks[1], N1, T0))
    store.apply(offer(2, pks[1], N1, T0))
    assert store.load_snapshot().leases == [LeaseRec(2, pks[1], N1, False, T0)]


def test_an_empty_batch_is_fine(store: Store) -> None:
    store.apply([])
    assert store.load_snapshot().projects == []


def test_projects_in_the_snapshot_are_current(store: Store) -> None:
    register(store, "primes", 1)
    v2, _ = register(store, "primes", 2)
    assert store.load_snapshot().projects == [v2]
    assert isinstance(v2, ProjectInfo)
