"""Quorum, trust and spot checks in the store, on every backend: pending results, their
verdicts, credit for several volunteers, trust per volunteer and known answers, written
by ``apply`` and brought back by ``load_snapshot`` (a hub restart loses nothing).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import func, select
from storekit import KEY1, KEY2, KEY3, KEY_OF, N1, N2, N3, OWNER, T0, task_row, volunteer_row
from test_store_restart import Driver, same_state

from hub.changes import (
    Change,
    FileInfo,
    LeaseAccepted,
    LeaseEnded,
    LeaseOffered,
    ResultJudged,
    ResultPending,
    TaskFinished,
    TaskUpdated,
    TrustChanged,
)
from hub.events import (
    Event,
    Instruction,
    NodeJoined,
    OffersAccepted,
    ResultReceived,
    SendOffers,
    SendResultAck,
    SlotsFree,
)
from hub.lifecycle import TaskState
from hub.models import PendingResult, Result
from hub.quorum import PendingRec
from hub.scheduler import IN_REPLICAS, Scheduler, Settings
from hub.store import Store, TaskEntry
from issc.manifest import Limits, Manifest

A, NA = TaskState.A, TaskState.NA
FILE = FileInfo("out.txt", "f" * 64, 12)


def register_quorum(
    store: Store, name: str = "sums", quorum: int = 2, tolerance: float | None = 0.001
) -> int:
    content = f"bundle {name} q{quorum}".encode()
    manifest = Manifest(
        name=name,
        version=1,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=quorum,
        files=(),
        owner_key=OWNER if name == "sums" else "ed25519:" + "D" * 43 + "=",
        tolerance=tolerance,
    )
    info, _ = store.register_bundle(manifest, hashlib.sha256(content).hexdigest(), content, T0)
    return info.id


def add_tasks(store: Store, project: str, expect: dict[str, Any]) -> list[int]:
    entries = [
        TaskEntry(task_id, json.dumps({"n": i}), i + 1, expect_json=json.dumps(expect[task_id]))
        if task_id in expect
        else TaskEntry(task_id, json.dumps({"n": i}), i + 1)
        for i, task_id in enumerate(["q0", "q1", "q2"])
    ]
    sha = hashlib.sha256(repr(entries).encode()).hexdigest()
    _, pks = store.add_tasks(project, entries, sha, "tasks.jsonl", T0)
    return pks


def pending(lease: int, pk: int, node: str, volunteer: str, value: Any, at: float) -> ResultPending:
    return ResultPending(lease, pk, node, volunteer, value, (FILE,), 1.5, 3.0, at)


def ran(lease: int, pk: int, node: str, at: float) -> list[Change]:
    return [
        LeaseOffered(lease, pk, node, at),
        TaskUpdated(pk, TaskState.TA, 0, lease, node),
        LeaseAccepted(lease, at + 1),
        TaskUpdated(pk, A, 1, lease, node),
    ]


@pytest.fixture
def sums(store: Store) -> list[int]:
    register_quorum(store)
    for key, volunteer in ((KEY1, "alice"), (KEY2, "bob"), (KEY3, "carol")):
        store.enroll_node(volunteer, key, None, True, "x:1", 2, T0)
    return add_tasks(store, "sums", {"q2": {"answer": [4, 2]}})


def test_tolerance_and_known_answers_are_stored_and_never_offered(
    store: Store, sums: list[int]
) -> None:
    snap = store.load_snapshot()
    assert [(p.quorum, p.tolerance) for p in snap.projects] == [(2, 0.001)]
    assert snap.expected == {sums[2]: {"answer": [4, 2]}}
    payloads = store.offer_payloads(sums)
    assert payloads[sums[2]] == ("q2", '{"n": 2}', [])  # the input only: an ordinary offer
    assert json.loads(task_row(store, sums[2])["expect_json"]) == {"answer": [4, 2]}
    assert task_row(store, sums[0])["expect_json"] is None


def test_pending_results_and_trust_round_trip(store: Store, sums: list[int]) -> None:
    q0 = sums[0]
    store.apply(
        [
            *ran(1, q0, N1, T0),
            *ran(2, q0, N2, T0),
            LeaseEnded(1, "completed", None, T0 + 5),
            pending(1, q0, N1, "alice", {"v": 1.5}, T0 + 5),
            LeaseEnded(2, "completed", None, T0 + 6),
            pending(2, q0, N2, "bob", {"v": 9}, T0 + 6),
            TaskUpdated(q0, NA, 2, None, None),
            TrustChanged("bob", 0, 1, False, 0),
            TrustChanged("bob", 1, 0, False, 1),
            TrustChanged("carol", 2, 0, True, 0),
        ]
    )
    snap = store.load_snapshot()
    assert snap.pending == [
        PendingRec(1, q0, N1, "alice", {"v": 1.5}, (FILE,), 1.5, 3.0, T0 + 5),
        PendingRec(2, q0, N2, "bob", {"v": 9}, (FILE,), 1.5, 3.0, T0 + 6),
    ]
    (task,) = [t for t in snap.tasks if t.pk == q0]
    assert (task.answered, task.attempts, task.state) == ({1, 2}, 2, NA)
    assert snap.untrusted == {"bob": 1}  # the last word on trust wins, counts add up
    bob, carol = volunteer_row(store, "bob"), volunteer_row(store, "carol")
    assert (bob["trusted"], bob["agreed"], bob["disagreed"], bob["trust_streak"]) == (
        False,
        1,
        1,
        1,
    )
    assert (carol["trusted"], carol["agreed"], carol["disagreed"]) == (True, 2, 0)
    assert store.volunteers_trust() == {
        "alice": {"trusted": True, "agreed": 0, "disagreed": 0},
        "bob": {"trusted": False, "agreed": 1, "disagreed": 1},
        "carol": {"trusted": True, "agreed": 2, "disagreed": 0},
    }
    detail = store.task_detail("sums", "q0")
    assert [h.get("verdict") for h in detail["history"]] == ["pending", "pending"]


def test_an_agreed_task_credits_every_agreeing_volunteer_and_judges_the_rest(
    store: Store, sums: list[int]
) -> None:
    q1 = sums[1]
    store.apply(
        [
            *ran(1, q1, N1, T0),
            *ran(2, q1, N2, T0),
            *ran(3, q1, N3, T0),
            LeaseEnded(1, "completed", None, T0 + 5),
            pending(1, q1, N1, "alice", 7, T0 + 5),
            LeaseEnded(2, "completed", None, T0 + 6),
            pending(2, q1, N2, "bob", 8, T0 + 6),
        ]
    )
    store.apply(
        [
            LeaseEnded(3, "completed", None, T0 + 7),
            pending(3, q1, N3, "carol", 7, T0 + 7),
            ResultJudged(1, "agreed"),
            ResultJudged(2, "disagreed"),
            ResultJudged(3, "agreed"),
            TrustChanged("alice", 1, 0, True, 0),
            TrustChanged("bob", 0, 1, False, 0),
            TrustChanged("carol", 1, 0, True, 0),
            TaskFinished(
                task_pk=q1,
                state=TaskState.C,
                attempts=3,
                lease=1,
                node_id=N1,
                volunteer="alice",
                result=7,
                error=None,
                cpu_seconds=1.5,
                wall_seconds=3.0,
                at=T0 + 7,
                files=(FILE,),
                credits=(("alice", 1.5), ("carol", 1.5)),
            ),
        ]
    )
    row = task_row(store, q1)
    assert (row["state"], row["lease_id"], row["volunteer"]) == ("C", 1, "alice")
    assert [(volunteer_row(store, v)["tasks_completed"], volunteer_row(store, v)["credit"])
            for v in ("alice", "bob", "carol")] == [(1, 1.5), (0, 0.0), (1, 1.5)]  # fmt: skip
    with store.engine.connect() as conn:
        verdicts = dict(conn.execute(select(PendingResult.lease_id, PendingResult.verdict)).all())
        results = conn.execute(select(Result.lease_id, Result.result_json)).all()
    assert verdicts == {1: "agreed", 2: "disagreed", 3: "agreed"}
    assert results == [(1, "7")]  # one result per task: the agreed one
    (line,) = store.unexported(10)
    assert (line.result_json, line.volunteer, [f.name for f in line.files]) == (
        "7",
        "alice",
        ["out.txt"],
    )
    assert store.load_snapshot().pending == []
    assert [h["verdict"] for h in store.task_detail("sums", "q1")["history"]] == [
        "agreed",
        "disagreed",
        "agreed",
    ]
    export = store.volunteer_export("bob")
    assert (export["trusted"], export["agreed"], export["disagreed"]) == (False, 0, 1)


def test_a_discarded_result_leaves_the_snapshot_but_still_counts(
    store: Store, sums: list[int]
) -> None:
    q0 = sums[0]
    store.apply(
        [
            *ran(1, q0, N1, T0),
            LeaseEnded(1, "completed", None, T0 + 5),
            pending(1, q0, N1, "alice", 1, T0 + 5),
            ResultJudged(1, "discarded"),
        ]
    )
    snap = store.load_snapshot()
    assert snap.pending == []
    (task,) = [t for t in snap.tasks if t.pk == q0]
    assert task.answered == {1}  # a successful attempt, not a failed one; taken once


# ---- the scheduler on the store, with restarts ---------------------------------------------


SETTINGS = Settings(max_attempts=3, offer_timeout=60.0, lease_window=15.0)


class QuorumHub:
    """A scheduler whose every batch of changes (all kinds) is committed at once."""

    def __init__(self, store: Store, now: float) -> None:
        self.store = store
        self.scheduler = Scheduler(SETTINGS, store.load_snapshot(), now)

    def handle(self, *events: Event) -> list[Instruction]:
        out = self.scheduler.handle(*events)
        self.store.apply([i for i in out if isinstance(i, Change)])  # type: ignore[arg-type, misc]
        return [i for i in out if not isinstance(i, Change)]  # type: ignore[arg-type, misc]


class QuorumDriver(Driver):
    """Driver's traffic on a quorum-2 project: results are a task's true answer, but one
    in six is a lie (each liar's own, so lies never agree with each other)."""

    def __init__(self, store: Store, seed: int, tasks: dict[str, list[int]]) -> None:
        super().__init__(store, seed, tasks)
        self.hub = QuorumHub(store, self.now)  # type: ignore[assignment]

    def event(self) -> Event:
        event = super().event()
        if isinstance(event, ResultReceived) and event.ok:
            s = self.hub.scheduler
            lease = s.leases.get(event.lease) or s.past_leases.get(event.lease)
            truth = {"t": lease.task_pk if lease else 0}
            lie = {"t": -1, "by": event.node_id}
            event = replace(event, result=lie if self.rng.random() < 1 / 6 else truth)
        return event

    def restart(self) -> None:
        old = self.hub.scheduler
        self.hub = QuorumHub(self.store, self.now)  # type: ignore[assignment]
        assert same_replicas(self.store, self.hub.scheduler, old)
        self.connected.clear()


def same_replicas(store: Store, a: Scheduler, b: Scheduler) -> bool:
    """Equal durable state (pending results travel inside the tasks), trust included."""

    def waiting(s: Scheduler) -> dict[int, set[int]]:
        out = {
            pid: {pk for pk in q if pk in s.tasks and s.tasks[pk].queued == IN_REPLICAS}
            for pid, q in s.replica_queues.items()
        }
        return {pid: pks for pid, pks in out.items() if pks}

    return (
        same_state(store, a, b)  # type: ignore[arg-type]
        and a.untrusted == b.untrusted
        and a.expected == b.expected
        and waiting(a) == waiting(b)
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_quorum_traffic_with_restarts_loses_nothing_and_lies_never_win(
    store: Store, seed: int
) -> None:
    primes = register_quorum(store, "primes", quorum=2, tolerance=None)
    register_quorum(store, "mandel", quorum=1, tolerance=None)
    for node, volunteer in {N1: "alice", N2: "bob", N3: "carol"}.items():
        store.enroll_node(volunteer, KEY_OF[node], None, True, "x:1", 4, T0)
    tasks = {
        "primes": add_named(store, "primes", [f"p{i}" for i in range(12)]),
        "mandel": add_named(store, "mandel", [f"m{i}" for i in range(8)]),
    }
    driver = QuorumDriver(store, seed, tasks)
    for step in range(400):
        event = driver.step()
        if step % 10 == 9:
            restored = Scheduler(SETTINGS, store.load_snapshot(), driver.now)
            assert same_replicas(store, restored, driver.hub.scheduler), f"step {step}: {event}"
        if driver.rng.random() < 0.03:
            driver.restart()
        driver.now += 0.001
    with store.engine.connect() as conn:
        done = conn.execute(select(Result.task_id, Result.result_json)).all()
        agreed = conn.execute(
            select(func.count()).where(PendingResult.verdict == "agreed")
        ).scalar()
    quorum_tasks = set(tasks["primes"])
    settled = [(pk, json.loads(text)) for pk, text in done if pk in quorum_tasks]
    assert settled and agreed, "the quorum project completed nothing"
    for pk, value in settled:
        assert value == {"t": pk}, "a lie reached the outbox"
    assert [task_row(store, pk)["state"] for pk, _ in settled] == ["C"] * len(settled)
    assert primes in {p.id for p in store.load_snapshot().projects}


def add_named(store: Store, project: str, ids: list[str]) -> list[int]:
    entries = [TaskEntry(task_id, json.dumps({"n": i}), i + 1) for i, task_id in enumerate(ids)]
    sha = hashlib.sha256(repr((project, ids)).encode()).hexdigest()
    _, pks = store.add_tasks(project, entries, sha, f"{project}.jsonl", T0)
    return pks


def test_a_restart_between_two_replicas_loses_nothing(store: Store, sums: list[int]) -> None:
    hub = QuorumHub(store, T0)
    hub.handle(NodeJoined(N1, "alice", ("sums",), (), T0), SlotsFree(N1, 1, T0))
    hub.handle(OffersAccepted(N1, (1,), T0 + 1))
    out = hub.handle(ResultReceived(N1, 1, True, {"s": 3}, None, 1.0, 1.0, T0 + 2, (FILE,)))
    assert out == [SendResultAck(N1, 1, True, None)]  # durable before the ack went out
    hub = QuorumHub(store, T0 + 10)  # the hub restarts
    assert [p.lease for p in hub.scheduler.tasks[sums[0]].pending] == [1]
    hub.handle(NodeJoined(N1, "alice", ("sums",), (), T0 + 11), SlotsFree(N1, 3, T0 + 11))
    alice = {lease.task_pk for lease in hub.scheduler.leases.values() if lease.node_id == N1}
    assert alice == {sums[1], sums[2]}  # her result on q0 is pending: not hers to confirm
    hub.handle(NodeJoined(N2, "bob", ("sums",), (), T0 + 12), SlotsFree(N2, 1, T0 + 12))
    (lease,) = [lid for lid, lease in hub.scheduler.leases.items() if lease.node_id == N2]
    assert hub.scheduler.leases[lease].task_pk == sums[0]  # bob gets the second replica
    hub.handle(OffersAccepted(N2, (lease,), T0 + 13))
    hub.handle(ResultReceived(N2, lease, True, {"s": 3.0001}, None, 2.0, 1.0, T0 + 14, (FILE,)))
    row = task_row(store, sums[0])
    assert (row["state"], row["lease_id"]) == ("C", 1)
    assert (volunteer_row(store, "alice")["credit"], volunteer_row(store, "bob")["credit"]) == (
        1.0,
        2.0,
    )


def test_a_refused_answer_keeps_its_task_from_that_volunteer_after_a_restart(
    store: Store, sums: list[int]
) -> None:
    q2 = sums[2]  # the task with a known answer
    store.apply(
        [
            *ran(1, q2, N1, T0),
            LeaseEnded(1, "rejected", "result not accepted", T0 + 5),
            TaskUpdated(q2, NA, 1, None, None),
            TrustChanged("alice", 0, 1, False, 0),
        ]
    )
    snap = store.load_snapshot()
    (task,) = [t for t in snap.tasks if t.pk == q2]
    assert task.rejected == {"alice"} and snap.untrusted == {"alice": 0}
    scheduler = Scheduler(SETTINGS, snap, T0 + 10)
    out = scheduler.handle(
        NodeJoined(N1, "alice", ("sums",), (), T0 + 10), SlotsFree(N1, 4, T0 + 10)
    )
    offered = {i.task_pk for m in out if isinstance(m, SendOffers) for i in m.items}
    assert offered == {sums[0], sums[1]}  # q2 waits for another volunteer
