"""Pure scheduler tests: no event loop, no database, time passed in by hand."""

from __future__ import annotations

from typing import Any

import pytest

from hub.changes import LeaseEnded, LeaseOffered, ProjectPauseChanged, TaskFinished, TaskUpdated
from hub.events import (
    BundleRefused,
    Disconnect,
    HeartbeatReceived,
    Instruction,
    LeasesDeclined,
    NodeJoined,
    NodeLeft,
    OffersAccepted,
    ProjectCancelled,
    ProjectInfo,
    ProjectPaused,
    ProjectResumed,
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
    w.handle(ProjectPaused("primes", w.now))
    w.join("n1")
    assert offered(w.ready("n1", 2)) == []
    w.handle(ProjectResumed("primes", w.now), ProjectUpdated(ProjectInfo(1, "primes", 1, None, 0)))
    assert offered(w.ready("n1", 2)) == []
    # The node's demand stood all along: the project's tasks go out once it has a bundle.
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


def test_a_late_result_after_the_node_record_is_gone_is_credited_to_its_volunteer() -> None:
    """The lease knows its node's volunteer: a result that arrives after the node was
    dropped for silence (and forgotten) is still trusted and credited as that volunteer's."""
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    w.tick(SETTINGS.lease_window + 1)  # silent: the lease is lost, the node forgotten
    assert "n1" not in w.s.nodes
    (done,) = of(TaskFinished, w.result("n1", lease, value=7))
    assert (done.state, done.lease, done.volunteer) == (TaskState.C, lease, "vol-n1")


def test_a_lease_takes_one_result_whatever_the_first_one_was() -> None:
    """A code error ends the lease with its result: a success on it afterwards is refused
    and changes nothing (rule 5), while the task runs again elsewhere."""
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    assert of(SendResultAck, w.result("n1", lease, ok=False))[0].accepted
    out = w.result("n1", lease, value=7)
    assert of(SendResultAck, out) == [
        SendResultAck("n1", lease, False, "lease already ended with a result")
    ]
    assert of(TaskFinished, out) == [] and of(TaskUpdated, out) == []
    assert w.task(1).state is TaskState.NA


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


# ---- admin: pause, resume, cancel ------------------------------------------------------

CANCELLED = "cancelled by admin"


def test_pause_stops_offers_and_resume_restarts_them() -> None:
    w = World(tasks=3)
    w.join("n1")
    out = w.handle(ProjectPaused("primes", w.now))
    assert of(ProjectPauseChanged, out) == [ProjectPauseChanged(1, True)]
    assert offered(w.ready("n1", 2)) == []
    assert offered(w.tick(1.0)) == []
    out = w.handle(ProjectResumed("primes", w.now))
    assert of(ProjectPauseChanged, out) == [ProjectPauseChanged(1, False)]
    assert len(offered(out)) == 2  # the node's standing demand is served at once


def test_pause_lets_leases_already_out_finish() -> None:
    w = World(tasks=2)
    w.join("n1")
    running, offered_only = offered(w.ready("n1", 2))
    w.accept("n1", running)
    out = w.handle(ProjectPaused("primes", w.now))
    assert not of(SendCancel, out) and not of(LeaseEnded, out)
    w.accept("n1", offered_only)  # an offer that crossed the pause still runs
    assert of(TaskFinished, w.result("n1", running))[0].state is TaskState.C
    assert of(TaskFinished, w.result("n1", offered_only))[0].state is TaskState.C


def test_pausing_twice_or_an_unknown_project_changes_nothing() -> None:
    w = World(tasks=1)
    w.handle(ProjectPaused("primes", w.now))
    assert w.handle(ProjectPaused("primes", w.now)) == []
    assert w.handle(ProjectPaused("nosuch", w.now)) == []
    assert w.handle(ProjectResumed("nosuch", w.now)) == []
    assert w.handle(ProjectCancelled("nosuch", CANCELLED, w.now)) == []


def test_a_new_bundle_does_not_undo_a_pause() -> None:
    w = World(tasks=2)
    w.join("n1")
    w.handle(ProjectPaused("primes", w.now))
    # The bundle's ProjectInfo was read before the pause was committed: paused=False.
    newer = ProjectInfo(1, "primes", 2, "d1-v2", 120)
    assert offered(w.handle(ProjectUpdated(newer), SlotsFree("n1", 2, w.now))) == []
    assert w.s.projects[1].version == 2 and w.s.projects[1].paused


def test_cancel_turns_na_ta_and_a_tasks_to_x_and_stops_live_leases() -> None:
    w = World(tasks=5)
    w.join("n1")
    w.join("n2")
    running, offered_only = offered(w.ready("n1", 2))  # tasks 1 (A) and 2 (TA)
    w.accept("n1", running)
    done, given_back = offered(w.ready("n2", 2))  # tasks 3 (then C) and 4 (back to NA)
    w.accept("n2", done, given_back)
    w.result("n2", done)
    w.handle(LeasesDeclined("n2", (given_back,), "stopping", w.now))
    assert w.task(4).state is TaskState.NA  # task 5 waits too, never offered

    out = w.handle(ProjectCancelled("primes", CANCELLED, w.now))

    finished = {f.task_pk: f for f in of(TaskFinished, out)}
    assert sorted(finished) == [1, 2, 4, 5]  # task 3 was C already and stays C
    assert {f.state for f in finished.values()} == {TaskState.X}
    assert {f.error for f in finished.values()} == {CANCELLED}
    assert (finished[1].lease, finished[1].node_id, finished[1].volunteer) == (
        running,
        "n1",
        "vol-n1",
    )
    assert finished[1].attempts == 1 and finished[2].attempts == 0
    assert (finished[5].lease, finished[5].node_id, finished[5].attempts) == (None, None, 0)
    ended = {c.lease: c for c in of(LeaseEnded, out)}
    assert sorted(ended) == [running, offered_only]
    assert {(c.outcome, c.detail) for c in ended.values()} == {("cancelled", CANCELLED)}
    assert of(SendCancel, out) == [SendCancel("n1", (running, offered_only), CANCELLED)]
    assert not of(TaskUpdated, out) and not offered(out)
    assert w.s.tasks == {} and w.s.leases == {} and w.s.waiting_count() == 0


def test_nothing_is_offered_after_a_cancel_and_late_results_are_not_recorded() -> None:
    w = World(tasks=3)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    w.handle(ProjectCancelled("primes", CANCELLED, w.now))
    assert offered(w.ready("n1", 2)) == []
    w.join("n2")
    assert offered(w.ready("n2", 2)) == []
    out = w.result("n1", lease)  # the run ended before the cancel reached the node
    assert of(TaskFinished, out) == []
    assert not of(SendResultAck, out)[0].accepted
    assert w.accept("n1", lease) == []  # nor is a lease brought back by an accept
    assert offered(w.tick(SETTINGS.offer_timeout + 1)) == []


def test_a_task_completed_while_waiting_is_not_cancelled() -> None:
    w = World(tasks=1)
    w.join("n1")
    (lease,) = offered(w.ready("n1", 1))
    w.accept("n1", lease)
    w.tick(SETTINGS.lease_window + 1)  # lost: back to NA, in the queue
    w.join("n1", held=(lease,))
    assert of(TaskFinished, w.result("n1", lease))[0].state is TaskState.C
    assert of(TaskFinished, w.handle(ProjectCancelled("primes", CANCELLED, w.now))) == []


def test_tasks_added_after_a_cancel_are_offered() -> None:
    w = World(tasks=2)
    w.join("n1")
    w.handle(ProjectCancelled("primes", CANCELLED, w.now))
    out = w.handle(TasksAdded(1, (10,)), SlotsFree("n1", 2, w.now))
    assert [i.task_pk for m in of(SendOffers, out) for i in m.items] == [10]


def test_cancel_after_restart_covers_restored_tasks_and_leases() -> None:
    snap = Snapshot(
        projects=[PRIMES],
        waiting={1: [2, 3]},
        tasks=[TaskRec(1, 1, TaskState.A, attempts=1, lease=5)],
        leases=[LeaseRec(5, 1, "n1", True, 0.0)],
        node_volunteers={"n1": "alice"},
        next_lease_id=6,
    )
    s = Scheduler(SETTINGS, snap, now=100.0)
    out = s.handle(ProjectCancelled("primes", CANCELLED, 101.0))
    assert sorted(f.task_pk for f in of(TaskFinished, out)) == [1, 2, 3]
    assert of(SendCancel, out) == [SendCancel("n1", (5,), CANCELLED)]
    assert [f.volunteer for f in of(TaskFinished, out) if f.task_pk == 1] == ["alice"]
