"""Quorum validation, volunteer trust and spot checks in the pure scheduler.

Same style as test_scheduler.py: no event loop, no database, time passed in by hand.
Nodes are named after their volunteer (``a1`` and ``a2`` are two nodes of ``a``).
"""

from __future__ import annotations

from typing import Any

from hub.changes import (
    FileInfo,
    LeaseEnded,
    ResultJudged,
    ResultPending,
    TaskFinished,
    TaskUpdated,
    TrustChanged,
)
from hub.events import (
    Instruction,
    LeasesDeclined,
    NodeJoined,
    OffersAccepted,
    ProjectCancelled,
    ProjectInfo,
    ProjectUpdated,
    ResultReceived,
    SendCancel,
    SendOffers,
    SendResultAck,
    SlotsFree,
    TasksAdded,
    Tick,
)
from hub.lifecycle import TaskEvent, TaskState, next_state
from hub.quorum import (
    PendingRec,
    agree,
    answer_agrees,
    canonical,
    find_agreement,
    values_agree,
)
from hub.scheduler import (
    MAX_SKIPS,
    NOT_ACCEPTED,
    TRUST_AFTER,
    LeaseRec,
    Scheduler,
    Settings,
    Snapshot,
    TaskRec,
)

SETTINGS = Settings(max_attempts=3, offer_timeout=10.0, lease_window=6.0)


def project(quorum: int = 2, tolerance: float | None = None) -> ProjectInfo:
    return ProjectInfo(1, "sums", 1, "d1", 100, quorum=quorum, tolerance=tolerance)


def of(kind: type[Any], out: list[Instruction]) -> list[Any]:
    return [i for i in out if isinstance(i, kind)]


def offers(out: list[Instruction]) -> list[tuple[int, int]]:
    """(lease, task key) of every offer in these instructions."""
    return [(item.lease, item.task_pk) for m in of(SendOffers, out) for item in m.items]


class World:
    """A scheduler with one project, and helpers that speak for nodes."""

    def __init__(
        self,
        tasks: int = 1,
        quorum: int = 2,
        tolerance: float | None = None,
        expected: dict[int, Any] | None = None,
        settings: Settings = SETTINGS,
        snapshot: Snapshot | None = None,
    ) -> None:
        self.now = 0.0
        self.s = Scheduler(settings, snapshot, now=0.0)
        answers = tuple((pk, canonical(v)) for pk, v in (expected or {}).items())
        if snapshot is None:
            self.handle(
                ProjectUpdated(project(quorum, tolerance)),
                TasksAdded(1, tuple(range(1, tasks + 1)), answers),
            )

    def handle(self, *events: Any) -> list[Instruction]:
        return self.s.handle(*events)

    def join(self, node: str, volunteer: str | None = None, held: tuple[int, ...] = ()):
        volunteer = volunteer or node.rstrip("0123456789")
        return self.handle(NodeJoined(node, volunteer, ("sums",), held, self.now))

    def take(self, node: str, free: int = 1) -> list[tuple[int, int]]:
        """The node asks for ``free`` tasks and accepts what it is offered."""
        got = offers(self.handle(SlotsFree(node, free, self.now)))
        if got:
            self.handle(OffersAccepted(node, tuple(lease for lease, _ in got), self.now))
        return got

    def result(
        self,
        node: str,
        lease: int,
        value: Any,
        cpu: float = 1.0,
        files: tuple[FileInfo, ...] = (),
    ) -> list[Instruction]:
        return self.handle(
            ResultReceived(node, lease, True, value, None, cpu, 2.0, self.now, files)
        )

    def task(self, pk: int) -> TaskRec:
        return self.s.tasks[pk]


def finished(out: list[Instruction]) -> TaskFinished:
    (done,) = of(TaskFinished, out)
    return done


def judged(out: list[Instruction]) -> dict[int, str]:
    return {c.lease: c.verdict for c in of(ResultJudged, out)}


def trust_of(out: list[Instruction]) -> dict[str, tuple[int, int, bool]]:
    """volunteer -> (agreed, disagreed, trusted) added up over these changes."""
    out_: dict[str, tuple[int, int, bool]] = {}
    for c in of(TrustChanged, out):
        a, d, _ = out_.get(c.volunteer, (0, 0, True))
        out_[c.volunteer] = (a + c.agreed, d + c.disagreed, c.trusted)
    return out_


# ---- comparison -----------------------------------------------------------------------------


def rec(lease: int, volunteer: str, value: Any, files: tuple[FileInfo, ...] = ()) -> PendingRec:
    return PendingRec(lease, 1, f"{volunteer}1", volunteer, value, files, 1.0, 1.0, float(lease))


def test_exact_comparison_is_canonical_json_equality() -> None:
    assert agree(rec(1, "a", {"x": 1, "y": [1, 2]}), rec(2, "b", {"y": [1, 2], "x": 1}), None)
    assert not agree(rec(1, "a", {"x": 1}), rec(2, "b", {"x": 2}), None)
    assert not agree(rec(1, "a", 1), rec(2, "b", 1.0), None)  # exact: 1 is not 1.0
    assert not agree(rec(1, "a", True), rec(2, "b", 1), None)


def test_tolerance_compares_numbers_relatively_and_everything_else_exactly() -> None:
    assert values_agree(100.0, 100.9, 0.01)  # within 1 % of 100.9
    assert not values_agree(100.0, 102.0, 0.01)
    assert values_agree(0.0, 0.005, 0.01)  # near zero the scale is 1: absolute 0.01
    assert not values_agree(0.0, 0.02, 0.01)
    assert values_agree({"r": [1, 2.0000001], "s": "x"}, {"s": "x", "r": [1, 2]}, 1e-6)
    assert not values_agree({"r": [1, 2]}, {"r": [1, 2, 3]}, 1.0)
    assert not values_agree({"s": "x"}, {"s": "y"}, 1.0)
    assert not values_agree(True, 1, 1.0)  # bools are not numbers
    assert not values_agree(None, 0, 1.0)
    assert answer_agrees(3.1416, 3.14159, 1e-4) and not answer_agrees(3.1416, 3.14159, None)


def test_output_files_are_part_of_agreement() -> None:
    f1 = (FileInfo("out.png", "a" * 64, 10),)
    f2 = (FileInfo("out.png", "b" * 64, 10),)
    assert agree(rec(1, "a", 1, f1), rec(2, "b", 1, f1), 0.5)
    assert not agree(rec(1, "a", 1, f1), rec(2, "b", 1, f2), 0.5)
    assert not agree(rec(1, "a", 1, f1), rec(2, "b", 1), 0.5)


def test_a_group_needs_distinct_volunteers_and_a_trusted_member() -> None:
    same = [rec(1, "a", 7), rec(2, "a", 7)]
    assert find_agreement(same, 2, None, lambda v: True).group is None
    pair = [rec(1, "a", 7), rec(2, "b", 7)]
    assert find_agreement(pair, 2, None, lambda v: v != "a").group == tuple(pair)
    assert find_agreement(pair, 2, None, lambda v: False).group is None
    split = [rec(1, "a", 7), rec(2, "b", 8), rec(3, "c", 8)]
    found = find_agreement(split, 2, None, lambda v: True)
    assert found.group is not None and [p.lease for p in found.group] == [2, 3]


def test_pairwise_agreement_under_tolerance_is_not_transitive() -> None:
    # 1.0 ~ 1.09 and 1.09 ~ 1.18, but 1.0 and 1.18 are too far apart to share a group.
    chain = [rec(1, "a", 1.0), rec(2, "b", 1.09), rec(3, "c", 1.18)]
    found = find_agreement(chain, 3, 0.1, lambda v: True)
    assert found.group is None and found.largest == 2


# ---- lifecycle --------------------------------------------------------------------------------


def test_lifecycle_allows_replicas() -> None:
    assert next_state(TaskState.A, TaskEvent.OFFER) is TaskState.A
    assert next_state(TaskState.TA, TaskEvent.OFFER) is TaskState.TA
    assert next_state(TaskState.A, TaskEvent.ACCEPT) is TaskState.A
    assert next_state(TaskState.A, TaskEvent.REPLICA_END) is TaskState.A
    assert next_state(TaskState.A, TaskEvent.LAST_ACCEPTED_END) is TaskState.TA
    assert next_state(TaskState.A, TaskEvent.RESULT_PENDING) is TaskState.NA
    assert next_state(TaskState.NA, TaskEvent.GIVE_UP) is TaskState.F


# ---- quorum --------------------------------------------------------------------------------


def test_quorum_two_sends_two_replicas_to_two_volunteers_and_agreement_completes() -> None:
    w = World(quorum=2)
    w.join("a1")
    w.join("b1")
    ((la, _),) = w.take("a1")
    assert w.task(1).state is TaskState.A
    ((lb, _),) = w.take("b1")  # the second replica of the same task
    assert w.task(1).leases == {la, lb} and w.task(1).state is TaskState.A
    out = w.result("a1", la, {"sum": 10}, cpu=3.0)
    assert of(TaskFinished, out) == []
    assert [p.lease for p in of(ResultPending, out)] == [la]
    assert SendResultAck("a1", la, True, None) in out  # recorded: the node may forget it
    assert w.task(1).state is TaskState.A  # b's replica still runs
    out = w.result("b1", lb, {"sum": 10}, cpu=5.0)
    done = finished(out)
    assert (done.state, done.result, done.lease, done.volunteer) == (
        TaskState.C,
        {"sum": 10},
        la,
        "a",
    )
    assert done.credits == (("a", 3.0), ("b", 5.0))  # both agreeing results earn credit
    assert judged(out) == {la: "agreed", lb: "agreed"}
    assert trust_of(out) == {"a": (1, 0, True), "b": (1, 0, True)}
    assert 1 not in w.s.tasks


def test_disagreement_asks_for_a_third_replica_and_the_majority_wins() -> None:
    w = World(quorum=2)
    for node in ("a1", "b1", "c1"):
        w.join(node)
    ((la, _),) = w.take("a1")
    ((lb, _),) = w.take("b1")
    assert w.take("c1") == []  # two replicas are enough while nothing disagrees
    w.result("a1", la, 42)
    out = w.result("b1", lb, 41)  # b cheats
    assert of(TaskFinished, out) == []
    # The third replica goes at once to c1, whose demand stood at the hub.
    ((lc, task),) = offers(out)
    assert task == 1 and w.s.leases[lc].node_id == "c1"
    assert w.task(1).state is TaskState.TA
    w.handle(OffersAccepted("c1", (lc,), w.now))
    out = w.result("c1", lc, 42)
    done = finished(out)
    assert (done.state, done.result, done.lease, done.node_id) == (TaskState.C, 42, la, "a1")
    assert dict(done.credits or ()) == {"a": 1.0, "c": 1.0}  # b earns nothing
    assert judged(out) == {la: "agreed", lb: "disagreed", lc: "agreed"}
    assert trust_of(out)["b"] == (0, 1, False)
    assert not w.s.trusted("b") and w.s.trusted("a") and w.s.trusted("c")


def test_tolerance_lets_close_numbers_agree_and_keeps_far_ones_apart() -> None:
    w = World(tasks=2, quorum=2, tolerance=1e-3)
    w.join("a1")
    w.join("b1")
    w.join("c1")
    (l1, l2) = (lease for lease, _ in w.take("a1", 2))
    (m1, m2) = (lease for lease, _ in w.take("b1", 2))
    w.result("a1", l1, {"pi": 3.14159})
    assert finished(w.result("b1", m1, {"pi": 3.1416})).result == {"pi": 3.14159}  # within
    w.result("a1", l2, {"pi": 3.14159})
    assert of(TaskFinished, w.result("b1", m2, {"pi": 3.15})) == []  # outside: a third replica
    assert len(w.take("c1")) == 1


def test_escalation_stops_at_two_n_plus_one_results_and_records_the_disagreement() -> None:
    w = World(quorum=2, settings=Settings(max_attempts=9, offer_timeout=10, lease_window=6))
    volunteers = ["a", "b", "c", "d", "e", "f"]
    for v in volunteers:
        w.join(f"{v}1")
    out: list[Instruction] = []
    for i, v in enumerate(volunteers[:5]):
        got = w.take(f"{v}1")
        assert len(got) == 1, f"replica {i + 1} for {v}"
        out = w.result(f"{v}1", got[0][0], i)  # everybody answers differently
    done = finished(out)
    assert done.state is TaskState.F and done.result is None and not done.credits
    assert done.error == (
        "no agreement after 5 results (quorum 2): 5 distinct values from volunteers a, b, c, d, e"
    )
    assert set(judged(out).values()) == {"unresolved"}
    assert of(TrustChanged, out) == []  # nobody knows who was right: nobody is judged
    assert w.take("f1") == []


def test_replicas_wanted_never_exceed_the_bound() -> None:
    w = World(quorum=1)
    w.s.untrusted["u"] = 0
    for node in ("u1", "v1", "x1", "y1"):
        w.join(node)
    w.s.untrusted["v"] = 0
    w.s.untrusted["x"] = 0
    ((l1, _),) = w.take("u1")
    w.result("u1", l1, 5)  # untrusted: needs a trusted agreeing result
    ((l2, _),) = w.take("v1")
    w.result("v1", l2, 5)  # untrusted too: still not enough
    ((l3, _),) = w.take("x1")
    assert w.take("y1") == []  # 3 results in all for quorum 1: the bound
    out = w.result("x1", l3, 5)
    assert finished(out).state is TaskState.F
    assert "not trusted: u, v, x" in (finished(out).error or "")


# ---- same-volunteer exclusion --------------------------------------------------------------


def test_two_nodes_of_one_volunteer_never_hold_replicas_of_the_same_task() -> None:
    w = World(tasks=3, quorum=2)
    w.join("a1")
    w.join("a2")  # a second machine of volunteer a
    first = w.take("a1", 3)
    second = w.take("a2", 3)
    assert sorted(t for _, t in first) == [1, 2, 3]
    assert second == []  # every task has a replica of volunteer a already
    assert w.s.waiting_count() == 3  # and none was lost from the queue
    w.join("b1")
    assert sorted(t for _, t in w.take("b1", 3)) == [1, 2, 3]


def test_one_node_with_many_slots_takes_one_replica_of_each_task() -> None:
    w = World(tasks=4, quorum=2)
    w.join("a1")
    got = w.take("a1", 8)
    assert sorted(t for _, t in got) == [1, 2, 3, 4]  # never two replicas of one task
    assert all(len(w.task(pk).leases) == 1 for pk in (1, 2, 3, 4))


def test_a_pending_result_excludes_its_volunteer_too() -> None:
    w = World(quorum=2)
    w.join("a1")
    w.join("a2")
    ((la, _),) = w.take("a1")
    w.result("a1", la, 1)
    assert w.take("a2") == []  # a's answer is in: a's other machine may not confirm it
    w.join("b1")
    assert len(w.take("b1")) == 1


def test_skipping_is_bounded_and_loses_nothing() -> None:
    tasks = MAX_SKIPS + 4
    w = World(tasks=tasks, quorum=2)
    w.join("a1")
    w.join("a2")
    assert len(w.take("a1", tasks)) == tasks
    # a2 looks at MAX_SKIPS of a's tasks per offer and gets none; they wait for others.
    assert w.take("a2", 1) == []
    assert w.take("a2", 1) == []
    w.join("b1")
    assert sorted(t for _, t in w.take("b1", tasks)) == list(range(1, tasks + 1))


# ---- trust ---------------------------------------------------------------------------------


def test_an_untrusted_volunteers_result_never_counts_alone() -> None:
    w = World(quorum=1)
    w.join("u1")
    w.join("t1")
    w.s.untrusted["u"] = 0
    ((lu, _),) = w.take("u1")
    out = w.result("u1", lu, 99)
    assert of(TaskFinished, out) == [] and w.task(1).state is TaskState.NA
    ((lt, _),) = w.take("t1")  # adaptive replication: a trusted volunteer confirms it
    out = w.result("t1", lt, 99)
    done = finished(out)
    assert (done.state, done.result, done.volunteer) == (TaskState.C, 99, "u")
    assert dict(done.credits or ()) == {"u": 1.0, "t": 1.0}
    assert trust_of(out) == {"u": (1, 0, False), "t": (1, 0, True)}


def test_a_trusted_result_overrules_an_untrusted_one_for_quorum_one() -> None:
    w = World(quorum=1)
    w.join("u1")
    w.join("t1")
    w.s.untrusted["u"] = 3
    ((lu, _),) = w.take("u1")
    w.result("u1", lu, {"cheat": True})
    ((lt, _),) = w.take("t1")
    out = w.result("t1", lt, 12)
    done = finished(out)
    assert (done.result, done.lease) == (12, lt)
    assert dict(done.credits or ()) == {"t": 1.0}
    assert judged(out) == {lu: "disagreed", lt: "agreed"}
    assert w.s.untrusted["u"] == 0  # its streak starts again


def test_trust_returns_after_enough_agreements_in_a_row() -> None:
    w = World(tasks=TRUST_AFTER, quorum=2)
    w.join("u1")
    w.join("t1")
    w.s.untrusted["u"] = 0
    for _ in range(TRUST_AFTER):
        ((lu, _),) = w.take("u1")
        ((lt, _),) = w.take("t1")
        w.result("u1", lu, 1)
        w.result("t1", lt, 1)
    assert w.s.trusted("u")


def test_quorum_one_with_a_trusted_volunteer_takes_the_single_lease_path() -> None:
    w = World(tasks=2, quorum=1)
    w.join("a1")
    w.join("b1")
    ((lease, _),) = w.take("a1")
    assert w.take("b1") != [] and len(w.task(1).leases) == 1  # b gets task 2, not a replica
    out = w.result("a1", lease, 7)
    assert finished(out).credits is None
    assert not of(ResultPending, out) and not of(ResultJudged, out) and not of(TrustChanged, out)


# ---- spot checks ---------------------------------------------------------------------------


def test_a_right_answer_to_a_spot_check_completes_the_task_and_counts_as_agreement() -> None:
    w = World(tasks=1, quorum=1, expected={1: {"primes": 25}})
    w.join("a1")
    ((lease, _),) = w.take("a1")
    out = w.result("a1", lease, {"primes": 25})
    done = finished(out)
    assert (done.state, done.result) == (TaskState.C, {"primes": 25})
    assert trust_of(out) == {"a": (1, 0, True)}
    assert SendResultAck("a1", lease, True, None) in out


def test_a_spot_check_offer_looks_like_any_other() -> None:
    w = World(tasks=2, quorum=1, expected={2: 5})
    w.join("a1")
    out = w.handle(SlotsFree("a1", 10, w.now))
    items = [item for m in of(SendOffers, out) for item in m.items]
    assert [(i.task_pk, i.project) for i in items] == [(1, project(1)), (2, project(1))]


def test_a_wrong_answer_distrusts_requeues_and_discards_the_volunteers_pending_results() -> None:
    # Task 1 (quorum 2) has a pending result of m's; task 2 is a known-answer task.
    w = World(tasks=2, quorum=2, expected={2: 4})
    for node in ("m1", "h1", "k1"):
        w.join(node)
    got = dict((task, lease) for lease, task in w.take("m1", 2))
    ((h_lease, _),) = w.take("h1")  # h's replica of task 1
    w.result("m1", got[1], "wrong")
    assert [p.volunteer for p in w.task(1).pending] == ["m"]
    out = w.result("m1", got[2], 5)  # the spot check, answered wrongly
    assert SendResultAck("m1", got[2], False, NOT_ACCEPTED) in out
    assert "spot" not in NOT_ACCEPTED and "known" not in NOT_ACCEPTED
    assert trust_of(out) == {"m": (0, 1, False)}
    assert not w.s.trusted("m")
    ended = {c.lease: c for c in of(LeaseEnded, out)}
    assert ended[got[2]].outcome == "rejected"
    assert w.task(2).state is TaskState.NA and w.task(2).pending == []
    # m's pending result on task 1 is discarded; task 1 wants a replacement replica.
    assert judged(out) == {got[1]: "discarded"}
    assert w.task(1).pending == []
    assert of(TaskFinished, out) == []
    replacement = w.take("k1", 2)
    assert sorted(t for _, t in replacement) == [1, 2]
    by_task = {t: lease for lease, t in replacement}
    w.result("h1", h_lease, "right")
    done = finished(w.result("k1", by_task[1], "right"))
    assert (done.result, dict(done.credits or ())) == ("right", {"h": 1.0, "k": 1.0})
    # A known-answer task of a quorum-2 project wants two right answers, like any other.
    assert of(TaskFinished, w.result("k1", by_task[2], 4)) == []
    ((lh, _),) = w.take("h1")
    done = finished(w.result("h1", lh, 4))
    assert (done.result, dict(done.credits or ())) == (4, {"k": 1.0, "h": 1.0})


def test_a_task_answered_wrongly_does_not_go_back_to_that_volunteer() -> None:
    w = World(tasks=1, quorum=1, expected={1: 4})
    w.join("m1")
    ((lm, _),) = w.take("m1")
    w.result("m1", lm, 5)
    assert w.take("m1") == [] and w.task(1).rejected == {"m"}  # it would only lie again
    w.join("h1")
    ((lh, _),) = w.take("h1")
    assert finished(w.result("h1", lh, 4)).result == 4


def test_a_wrong_answer_to_a_spot_check_with_tolerance_is_judged_with_it() -> None:
    w = World(tasks=1, quorum=1, tolerance=0.01, expected={1: 100.0})
    w.join("a1")
    ((lease, _),) = w.take("a1")
    assert finished(w.result("a1", lease, 100.5)).state is TaskState.C


def test_finished_results_stay_final_when_their_volunteer_is_caught_later() -> None:
    w = World(tasks=2, quorum=1, expected={2: "x"})
    w.join("m1")
    got = {task: lease for lease, task in w.take("m1", 2)}
    assert finished(w.result("m1", got[1], "lie")).state is TaskState.C  # trusted: final
    out = w.result("m1", got[2], "y")
    assert of(TaskFinished, out) == [] and of(ResultJudged, out) == []


# ---- lost replicas, restarts, cancels --------------------------------------------------------


def test_a_late_result_of_a_lost_replica_still_counts_as_a_pending_result() -> None:
    w = World(quorum=2)
    for node in ("a1", "b1", "c1"):
        w.join(node)
    ((la, _),) = w.take("a1")
    ((lb, _),) = w.take("b1")
    w.now += SETTINGS.lease_window + 1
    for node in ("b1", "c1"):
        w.handle(SlotsFree(node, 0, w.now))  # alive
    w.handle(Tick(w.now))  # a1 silent: its replica is lost
    assert la not in w.s.leases and w.task(1).state is TaskState.A
    ((lc, _),) = w.take("c1")  # its replacement
    w.join("a1", held=())
    out = w.result("a1", la, 8)  # a kept computing: the result arrives late
    assert [p.lease for p in of(ResultPending, out)] == [la]
    assert SendResultAck("a1", la, True, None) in out
    out = w.result("b1", lb, 8)
    done = finished(out)
    assert (done.result, done.lease) == (8, la)
    assert SendCancel("c1", (lc,), "task completed elsewhere") in out  # no longer needed
    assert lc not in w.s.leases


def test_a_result_sent_twice_is_recorded_once() -> None:
    w = World(quorum=2)
    w.join("a1")
    ((la, _),) = w.take("a1")
    w.result("a1", la, 3)
    out = w.result("a1", la, 3)
    assert of(ResultPending, out) == []
    assert SendResultAck("a1", la, False, "result already recorded") in out


def test_a_declined_replica_is_replaced_and_others_keep_running() -> None:
    w = World(quorum=2)
    w.join("a1")
    w.join("b1")
    ((la, _),) = w.take("a1")
    ((lb, _),) = w.take("b1")
    out = w.handle(LeasesDeclined("a1", (la,), "stopping", w.now))
    assert w.task(1).state is TaskState.A and w.task(1).leases == {lb}
    assert TaskUpdated(1, TaskState.A, 1, lb, "b1") in out
    assert len(w.take("a1")) == 1  # a may take it again: it holds nothing of it now


def test_successful_replicas_do_not_use_up_attempts() -> None:
    w = World(quorum=2, settings=Settings(max_attempts=2, offer_timeout=10, lease_window=6))
    for node in ("a1", "b1", "c1", "d1"):
        w.join(node)
    ((la, _),) = w.take("a1")
    ((lb, _),) = w.take("b1")
    w.result("a1", la, 1)
    w.result("b1", lb, 2)  # 2 attempts so far, both successful
    ((lc, _),) = w.take("c1")
    w.handle(LeasesDeclined("c1", (lc,), "x", w.now))  # a clean give-back
    assert len(w.take("c1")) == 1
    w.now += SETTINGS.lease_window + 1
    for node in ("a1", "b1", "d1"):
        w.handle(SlotsFree(node, 0, w.now))
    out = w.handle(Tick(w.now))  # c's replica lost: one failed attempt of two allowed
    assert of(TaskFinished, out) == [] and w.task(1).state is TaskState.NA
    ((ld, _),) = w.take("d1")
    assert finished(w.result("d1", ld, 1)).result == 1


def test_restart_restores_pending_results_and_trust_and_completes() -> None:
    pending = [
        PendingRec(5, 1, "a1", "a", {"v": 1}, (), 2.0, 3.0, 10.0),
        PendingRec(6, 1, "b1", "b", {"v": 2}, (), 2.0, 3.0, 11.0),
    ]
    task = TaskRec(1, 1, TaskState.NA, attempts=2, past_leases=[5, 6], answered=[5, 6])
    snap = Snapshot(
        projects=[project(2)],
        waiting={1: [1]},
        tasks=[task],
        past_leases=[LeaseRec(5, 1, "a1", True, 0.0), LeaseRec(6, 1, "b1", True, 0.0)],
        node_volunteers={"a1": "a", "b1": "b"},
        next_lease_id=7,
        pending=pending,
        untrusted={"b": 4},
    )
    w = World(snapshot=snap)
    w.join("a1")
    w.join("b1")
    assert w.take("a1") == [] and w.take("b1") == []  # both have answered already
    w.join("c1")
    ((lc, pk),) = w.take("c1")
    assert (lc, pk) == (7, 1)
    out = w.result("c1", lc, {"v": 1})
    done = finished(out)
    assert (done.result, done.lease, done.attempts) == ({"v": 1}, 5, 3)
    assert judged(out) == {5: "agreed", 6: "disagreed", 7: "agreed"}
    assert w.s.untrusted["b"] == 0


def test_restored_known_answers_still_check_results() -> None:
    snap = Snapshot(projects=[project(1)], waiting={1: [1]}, expected={1: [2, 3]})
    w = World(snapshot=snap)
    w.join("a1")
    ((lease, _),) = w.take("a1")
    assert of(TaskFinished, w.result("a1", lease, [2, 4])) == []
    assert not w.s.trusted("a")


def test_cancel_ends_every_replica_and_leaves_pending_results_unresolved() -> None:
    w = World(quorum=3)
    for node in ("a1", "b1", "c1"):
        w.join(node)
    ((la, _),) = w.take("a1")
    ((lb, _),) = w.take("b1")
    ((lc, _),) = w.take("c1")
    w.result("a1", la, 1)
    out = w.handle(ProjectCancelled("sums", "cancelled by admin", w.now))
    done = finished(out)
    assert done.state is TaskState.X and done.lease == lc
    assert {c.lease for c in of(LeaseEnded, out)} == {lb, lc}
    assert judged(out) == {la: "unresolved"}
    assert sorted(of(SendCancel, out), key=lambda c: c.node_id) == [
        SendCancel("b1", (lb,), "cancelled by admin"),
        SendCancel("c1", (lc,), "cancelled by admin"),
    ]
    assert w.s.tasks == {} and w.s.waiting_count() == 0


def test_quorum_three_escalates_by_what_the_largest_group_lacks() -> None:
    w = World(quorum=3)
    nodes = [f"{v}1" for v in "abcdef"]
    for node in nodes:
        w.join(node)
    la, lb, lc = (w.take(node)[0][0] for node in nodes[:3])
    assert w.take("d1") == [] and w.take("e1") == []  # their demand stands
    w.result("a1", la, "x")
    out = w.result("b1", lb, "y")  # the largest group (x) lacks two: c's replica and one more
    ((ld, _),) = offers(out)
    assert w.s.leases[ld].node_id == "d1"
    w.handle(OffersAccepted("d1", (ld,), w.now))
    w.result("c1", lc, "x")
    out = w.result("d1", ld, "x")
    done = finished(out)
    assert (done.result, done.lease) == ("x", la)
    assert dict(done.credits or ()) == {"a": 1.0, "c": 1.0, "d": 1.0}
    assert trust_of(out)["b"] == (0, 1, False)


def test_a_task_that_waited_twice_in_its_queue_and_finished_is_never_offered_again() -> None:
    # Task 1's key ends up twice in the queue (it left for the replicas when m's late
    # result was pending, and came back when that result was discarded), then a late
    # result finishes it: both entries must be skipped, not taken for a new task.
    w = World(tasks=2, quorum=1, expected={2: 4})
    w.s.untrusted["m"] = 0
    w.join("t1")
    ((lt, _),) = w.take("t1")  # task 1
    w.now += SETTINGS.lease_window + 1
    w.handle(Tick(w.now))  # t1 silent: lost, task 1 back in the queue
    w.join("m1")
    got = {task: lease for lease, task in w.take("m1", 2)}
    assert set(got) == {1, 2}
    w.now += SETTINGS.lease_window + 1
    w.handle(Tick(w.now))  # m1 silent too
    w.join("m1")
    w.join("t1")
    assert of(TaskFinished, w.result("m1", got[1], 1)) == []  # untrusted: pending
    out = w.result("m1", got[2], 5)  # wrong: m's pending result on task 1 is discarded
    assert judged(out) == {got[1]: "discarded"}
    assert w.task(1).queued == 1  # back in its project's queue
    assert finished(w.result("t1", lt, 1)).result == 1  # t's late result finishes it
    assert w.result("m1", got[1], 1)[-1] == SendResultAck(
        "m1", got[1], False, "no such unfinished lease: task finished or lease unknown"
    )
    w.join("h1")
    assert [t for _, t in w.take("h1", 5)] == [2]
    assert 1 not in w.s.tasks and w.s.finished_while_waiting == {}


def test_a_discarded_result_sent_again_is_not_taken_again() -> None:
    w = World(tasks=2, quorum=2, expected={2: 4})
    w.join("m1")
    got = {task: lease for lease, task in w.take("m1", 2)}
    w.result("m1", got[1], 1)
    w.result("m1", got[2], 5)  # caught: its result on task 1 is discarded
    out = w.result("m1", got[1], 1)
    assert SendResultAck("m1", got[1], False, "result already recorded") in out
    assert w.task(1).pending == [] and not of(ResultPending, out)
