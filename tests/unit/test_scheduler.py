"""Pure scheduler tests: no event loop, no database, time passed in by hand."""

from __future__ import annotations

from typing import Any

import pytest

from hub.changes import LeaseEnded, LeaseOffered, TaskFinished, TaskUpdated
from hub.events import (
    BundleRefused,
    Disconnect,
    HeartbeatReceived,
    Instruction,
    LeasesDeclined,
    NodeJoined,
    NodeLeft,
    OffersAccepted,
    ProjectInfo,
    ProjectUpdated,
    ResultReceived,
    SendCancel,
    SendOffers,
    SendResultAck,
    SendWelcome,
    SlotsFree,
    TasksAdded,
    Tick,
)
from hub.lifecycle import IllegalTransition, TaskEvent, TaskState, next_state
from hub.scheduler import (
    LeaseRec,
    Scheduler,
    Settings,
    Snapshot,
    TaskRec,
)

SETTINGS = Settings(max_attempts=3, offer_timeout=10.0, lease_window=6.0)
PRIMES = ProjectInfo(id=1, name="primes", version=1, digest="d1", size=100)
OTHER = ProjectInfo(id=2, name="other", version=1, digest="d2", size=100)


def of(kind: type[Any], out: list[Instruction]) -> list[Any]:
    return [i for i in out if isinstance(i, kind)]


def offered(out: list[Instruction]) -> list[int]:
    """Lease ids offered in these instructions."""
    return [item.lease for msg in of(SendOffers, out) for item in msg.items]


class World:
    """A scheduler with projects and tasks, and helpers that speak for nodes."""

    def __init__(self, tasks: int = 3, settings: Settings = SETTINGS) -> None:
        self.s = Scheduler(settings)
        self.now = 0.0
        self.handle(ProjectUpdated(PRIMES), TasksAdded(1, tuple(range(1, tasks + 1))))

    def handle(self, *events: Any) -> list[Instruction]:
        return self.s.handle(*events)

    def join(self, node: str, projects: tuple[str, ...] = ("primes",), held: tuple[int, ...] = ()):
        return self.handle(NodeJoined(node, f"vol-{node}", projects, held, self.now))

    def ready(self, node: str, free: int) -> list[Instruction]:
        return self.handle(SlotsFree(node, free, self.now))

    def accept(self, node: str, *leases: int) -> list[Instruction]:
        return self.handle(OffersAccepted(node, leases, self.now))

    def result(self, node: str, lease: int, ok: bool = True, value: Any = 42) -> list[Instruction]:
        error = None if ok else "Traceback: boom"
        return self.handle(ResultReceived(node, lease, ok, value, error, 0.5, 0.6, self.now))

    def tick(self, dt: float) -> list[Instruction]:
        self.now += dt
        return self.handle(Tick(self.now))

    def task(self, pk: int) -> TaskRec:
        return self.s.tasks[pk]

    def lease_of(self, pk: int) -> int:
        lease = self.task(pk).lease
        assert lease is not None
        return lease


# ---- lifecycle table ------------------------------------------------------------------


def test_lifecycle_table_allows_the_documented_path() -> None:
    state = TaskState.NA
    for event in (TaskEvent.OFFER, TaskEvent.ACCEPT, TaskEvent.COMPLETE):
        state = next_state(state, event)
    assert state is TaskState.C


def test_illegal_transition_names_state_and_event() -> None:
    with pytest.raises(IllegalTransition, match=r"state C cannot take event offer"):
        next_state(TaskState.C, TaskEvent.OFFER)


# ---- offers ---------------------------------------------------------------------------


def test_node_gets_as_many_tasks_as_free_slots_in_one_batch() -> None:
    w = World(tasks=5)
    out = w.join("n1")
    assert of(SendWelcome, out) == [SendWelcome("n1", ())]
    out = w.ready("n1", 3)
    assert len(of(SendOffers, out)) == 1
    assert len(offered(out)) == 3
    assert len(of(LeaseOffered, out)) == 3
    assert all(u.state is TaskState.TA for u in of(TaskUpdated, out))
    assert w.s.waiting_count() == 2


def test_ready_does_not_double_count_offers_in_flight() -> None:
    w = World(tasks=5)
    w.join("n1")
    first = offered(w.ready("n1", 2))
    # The node had not seen the offers yet and says again that 2 slots are free.
    assert offered(w.ready("n1", 2)) == []
    w.accept("n1", *first)
    assert len(offered(w.ready("n1", 1))) == 1  # one of its two slots finished


def test_only_projects_the_volunteer_chose_are_offered() -> None:
    w = World(tasks=2)
    w.handle(ProjectUpdated(OTHER), TasksAdded(2, (10, 11)))
    w.join("n1", projects=("other",))
    out = w.ready("n1", 5)
    assert sorted(i.task_pk for m in of(SendOffers, out) for i in m.items) == [10, 11]


def test_paused_project_and_project_without_bundle_are_not_offered() -> None:
    w = World(tasks=2)
    w.handle(ProjectUpdated(ProjectInfo(1, "primes", 1, "d1", 100, paused=True)))
    w.join("n1")
    assert offered(w.ready("n1", 2)) == []
    w.handle(ProjectUpdated(ProjectInfo(1, "primes", 1, None, 0)))
    assert offered(w.ready("n1", 2)) == []
    # The node's demand stood all along: the resumed project's tasks go out at once.
    assert len(offered(w.handle(ProjectUpdated(PRIMES)))) == 2


def test_tasks_arriving_later_go_to_a_waiting_node() -> None:
    w = World(tasks=0)
    w.join("n1")
    assert offered(w.ready("n1", 2)) == []
    out = w.handle(TasksAdded(1, (7,)))
    assert [i.task_pk for m in of(SendOffers, out) for i in m.items] == [7]


def test_unaccepted_offer_returns_to_na_after_offer_timeout_without_an_attempt() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    for _ in range(4):  # the node stays alive but never accepts
        w.tick(SETTINGS.offer_timeout / 4 - 0.1)
        w.handle(HeartbeatReceived("n1", w.now))
    assert w.task(1).state is TaskState.TA
    out = w.tick(0.5)
    assert LeaseEnded(lease, "offer_expired", "not accepted in time", w.now) in out
    assert w.task(1).state is TaskState.NA
    assert w.task(1).attempts == 0


def test_accept_counts_an_attempt_and_moves_to_a() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    out = w.accept("n1", lease)
    assert w.task(1).state is TaskState.A
    assert w.task(1).attempts == 1
    assert TaskUpdated(1, TaskState.A, 1, lease, "n1") in out
    w.accept("n1", lease)  # a repeated accept changes nothing
    assert w.task(1).attempts == 1


def test_a_node_cannot_accept_another_nodes_offer() -> None:
    w = World(tasks=1)
    w.join("n1")
    w.join("n2")
    (lease,) = offered(w.ready("n1", 1))
    assert w.accept("n2", lease) == []
    assert w.task(1).state is TaskState.TA


# ---- heartbeats -----------------------------------------------------------------------


def test_missed_heartbeats_release_leases_and_count_the_attempt() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    w.join("n2")
    w.tick(SETTINGS.lease_window - 0.5)
    w.handle(HeartbeatReceived("n2", w.now))
    assert w.task(1).state is TaskState.A  # still inside the window
    out = w.tick(1.0)
    assert Disconnect("n1", "missed heartbeats") in out
    assert any(isinstance(c, LeaseEnded) and c.outcome == "lost" for c in out)
    assert w.task(1).attempts == 1
    w.handle(HeartbeatReceived("n2", w.now))
    (second,) = offered(w.ready("n2", 1))
    w.accept("n2", second)
    assert w.task(1).attempts == 2


def test_heartbeats_keep_a_lease_alive_indefinitely() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    for _ in range(20):
        w.tick(SETTINGS.lease_window / 2)
        w.handle(HeartbeatReceived("n1", w.now))
    assert w.task(1).state is TaskState.A


def test_attempts_exhausted_makes_the_task_failed() -> None:
    w = World(tasks=1)
    for n in range(SETTINGS.max_attempts):
        node = f"n{n}"
        w.join(node)
        (lease,) = offered(w.ready(node, 1))
        w.accept(node, lease)
        out = w.tick(SETTINGS.lease_window + 1)
    finished = of(TaskFinished, out)
    assert len(finished) == 1 and finished[0].state is TaskState.F
    assert "gave up after 3 attempts" in (finished[0].error or "")
    assert 1 not in w.s.tasks


def test_disconnected_node_keeps_its_lease_for_the_window_and_resumes_it() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    w.handle(NodeLeft("n1", w.now))
    w.tick(SETTINGS.lease_window - 1)
    out = w.join("n1", held=(lease,))
    assert SendWelcome("n1", (lease,)) in out
    assert w.task(1).state is TaskState.A and w.task(1).lease == lease


def test_rejoining_node_that_forgot_a_lease_loses_it() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    out = w.join("n1", held=())
    assert SendWelcome("n1", ()) in out
    assert w.task(1).state is TaskState.NA
    assert w.task(1).attempts == 1


# ---- results --------------------------------------------------------------------------


def test_result_from_the_lease_holder_completes_the_task() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    out = w.result("n1", lease, value=1229)
    (done,) = of(TaskFinished, out)
    assert (done.state, done.result, done.attempts, done.volunteer) == (
        TaskState.C,
        1229,
        1,
        "vol-n1",
    )
    assert SendResultAck("n1", lease, True, None) in out


def test_result_sent_twice_is_acknowledged_twice_and_recorded_once() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    w.result("n1", lease)
    out = w.result("n1", lease)
    assert of(TaskFinished, out) == []
    (ack,) = of(SendResultAck, out)
    assert ack.lease == lease and not ack.accepted


def test_result_from_a_node_not_holding_the_lease_is_refused() -> None:
    w = World(tasks=1)
    w.join("n1")
    w.join("n2")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    out = w.result("n2", lease)
    assert of(TaskFinished, out) == []
    assert SendResultAck("n2", lease, False, "lease held by another node") in out
    assert w.task(1).state is TaskState.A


def test_late_result_wins_and_cancels_the_newer_lease_on_its_node() -> None:
    w = World(tasks=1)
    w.join("n1")
    (old,) = offered(w.ready("n1", 1))
    w.accept("n1", old)
    w.join("n2")
    w.handle(HeartbeatReceived("n2", w.now + SETTINGS.lease_window))
    w.tick(SETTINGS.lease_window + 1)  # n1 silent: its lease is lost
    w.handle(HeartbeatReceived("n2", w.now))
    (new,) = offered(w.ready("n2", 1))
    w.accept("n2", new)
    w.join("n1", held=(old,))  # n1 was only partitioned; it comes back with its result
    out = w.result("n1", old, value=7)
    (done,) = of(TaskFinished, out)
    assert done.state is TaskState.C and done.lease == old and done.result == 7
    assert SendCancel("n2", (new,), "task completed elsewhere") in out
    assert any(isinstance(c, LeaseEnded) and c.lease == new and c.outcome == "superseded"
               for c in out)  # fmt: skip
    # n2's result arriving afterwards is acknowledged but not recorded.
    out = w.result("n2", new)
    assert of(TaskFinished, out) == [] and not of(SendResultAck, out)[0].accepted


def test_late_result_for_a_requeued_task_completes_it_and_it_is_not_offered_again() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    w.tick(SETTINGS.lease_window + 1)
    assert w.task(1).state is TaskState.NA
    w.join("n1", held=(lease,))
    assert of(TaskFinished, w.result("n1", lease))[0].state is TaskState.C
    w.join("n2")
    assert offered(w.ready("n2", 1)) == []


def test_code_error_is_retried_once_then_the_task_fails() -> None:
    w = World(tasks=1, settings=Settings(max_attempts=5, offer_timeout=10, lease_window=6))
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    out = w.result("n1", lease, ok=False)
    assert of(TaskFinished, out) == [] and w.task(1).state is TaskState.NA
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    (failed,) = of(TaskFinished, w.result("n1", lease, ok=False))
    assert failed.state is TaskState.F and failed.error == "Traceback: boom"


# ---- giving back and refusing ---------------------------------------------------------


def test_declined_lease_goes_back_without_counting_an_attempt() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    w.handle(LeasesDeclined("n1", (lease,), "node stopping", w.now))
    assert w.task(1).state is TaskState.NA and w.task(1).attempts == 0


def test_refused_bundle_counts_an_attempt_and_is_not_offered_to_that_node_again() -> None:
    w = World(tasks=2)
    w.join("n1")
    leases = offered(w.ready("n1", 2))
    out = w.handle(BundleRefused("n1", "d1", "signature does not verify", tuple(leases), w.now))
    ended = of(LeaseEnded, out)
    assert {e.outcome for e in ended} == {"bundle_refused"}
    assert all(e.detail == "signature does not verify" for e in ended)
    assert [w.task(pk).attempts for pk in (1, 2)] == [1, 1]
    assert offered(w.ready("n1", 2)) == []
    w.join("n2")
    assert len(offered(w.ready("n2", 2))) == 2


# ---- restart --------------------------------------------------------------------------


def test_restored_lease_is_released_if_its_node_does_not_return_in_the_window() -> None:
    snap = Snapshot(
        projects=[PRIMES],
        waiting={1: [2]},
        tasks=[TaskRec(1, 1, TaskState.A, attempts=1, lease=5)],
        leases=[LeaseRec(5, 1, "n1", True, 0.0)],
        node_volunteers={"n1": "alice"},
        next_lease_id=6,
    )
    s = Scheduler(SETTINGS, snap, now=100.0)
    assert s.handle(Tick(100.0 + SETTINGS.lease_window - 1)) == []
    out = s.handle(Tick(100.0 + SETTINGS.lease_window + 1))
    assert any(isinstance(c, LeaseEnded) and c.lease == 5 for c in out)
    assert s.tasks[1].state is TaskState.NA
    s.handle(NodeJoined("n2", "bob", ("primes",), (), 110.0))
    leases = offered(s.handle(SlotsFree("n2", 2, 110.0)))
    assert leases == [6, 7]  # lease ids continue after the restored ones


def test_credited_cpu_is_capped_by_the_projects_wall_limit() -> None:
    w = World(tasks=2)
    w.handle(ProjectUpdated(ProjectInfo(1, "primes", 1, "d1", 100, wall_seconds=30.0)))
    w.join("n1")
    first, second = offered(w.ready("n1", 2))
    w.accept("n1", first, second)
    honest = w.handle(ResultReceived("n1", first, True, 1, None, 12.5, 13.0, w.now))
    greedy = w.handle(ResultReceived("n1", second, True, 1, None, 86_400.0, 1.0, w.now))
    assert of(TaskFinished, honest)[0].cpu_seconds == 12.5
    assert of(TaskFinished, greedy)[0].cpu_seconds == 30.0  # a day claimed, the limit credited
