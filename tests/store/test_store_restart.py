"""The scheduler on top of the store: what it decides is committed, and a scheduler built
from ``load_snapshot()`` after a crash carries on as the old one would have.

The runtime's rule is followed exactly: after every ``handle()`` the changes are applied
to the store before anything else happens. A fake clock drives time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select
from storekit import KEY_OF, N1, N2, N3, OTHER_OWNER, T0, add, register, task_row

from hub.changes import LeaseAccepted, LeaseEnded, LeaseOffered, TaskFinished, TaskUpdated
from hub.events import (
    BundleRefused,
    Disconnect,
    Event,
    HeartbeatReceived,
    Instruction,
    LeasesDeclined,
    NodeJoined,
    NodeLeft,
    OffersAccepted,
    ResultReceived,
    SendOffers,
    SendWelcome,
    SlotsFree,
    TasksAdded,
    Tick,
)
from hub.models import Lease, Result, Volunteer
from hub.scheduler import (
    Scheduler,
    Settings,
)
from hub.store import Store

CHANGES = (LeaseOffered, LeaseAccepted, LeaseEnded, TaskUpdated, TaskFinished)
SETTINGS = Settings(max_attempts=3, offer_timeout=60.0, lease_window=15.0)
VOLUNTEERS = {N1: "alice", N2: "bob", N3: "carol"}


class Hub:
    """A scheduler whose every batch of changes is committed before the next event."""

    def __init__(self, store: Store, now: float) -> None:
        self.store = store
        self.scheduler = Scheduler(SETTINGS, store.load_snapshot(), now)

    def handle(self, *events: Event) -> list[Instruction]:
        out = self.scheduler.handle(*events)
        self.store.apply([i for i in out if isinstance(i, CHANGES)])
        return [i for i in out if not isinstance(i, CHANGES)]


def durable_state(s: Scheduler) -> dict[str, Any]:
    """What a restart must bring back: everything but connections and timers."""
    return {
        "projects": s.projects,
        "queues": {
            pid: [pk for pk in q if pk not in s.finished_while_waiting]
            for pid, q in s.queues.items()
        },
        "tasks": s.tasks,
        "leases": s.leases,
        "past_leases": s.past_leases,
        "offered": set(s.offered),
        "node_leases": {n.node_id: sorted(n.leases) for n in s.nodes.values() if n.leases},
        "next_lease_id": s.next_lease_id,
    }


def retry_groups(store: Store, state: dict[str, Any]) -> dict[int, list[frozenset[int]]]:
    """The queues, with retries whose last lease ended at the same instant as one group.

    A restart restores the queue order exactly but for one case: leases that ended in
    the same instant (one Tick ending leases of two silent nodes, say) come back in
    lease order, which need not be the order the scheduler ended them in. The store
    keeps no finer clock than the event's ``now``; retries stay ahead of new tasks.
    """
    with store.engine.connect() as conn:
        rows = conn.execute(select(Lease.task_id, func.max(Lease.ended_at)).group_by(Lease.task_id))
        ended: dict[int, float | None] = {pk: at for pk, at in rows}
    out: dict[int, list[frozenset[int]]] = {}
    for pid, queue in state["queues"].items():
        groups: list[tuple[float | None, set[int]]] = []
        for pk in queue:
            at = ended.get(pk)
            if groups and at is not None and groups[-1][0] == at:
                groups[-1][1].add(pk)
            else:
                groups.append((at, {pk}))
        out[pid] = [frozenset(g) for _, g in groups]
    return out


def restored(store: Store, now: float) -> Scheduler:
    return Scheduler(SETTINGS, store.load_snapshot(), now)


def joined(node: str, now: float, held: tuple[int, ...] = ()) -> NodeJoined:
    return NodeJoined(node, VOLUNTEERS[node], ("primes",), held, now)


def offered(messages: list[Instruction]) -> list[tuple[int, int]]:
    return [(i.lease, i.task_pk) for m in messages if isinstance(m, SendOffers) for i in m.items]


@pytest.fixture
def primes(store: Store) -> Iterator[list[int]]:
    """Project primes with tasks a..h, and three enrolled nodes."""
    register(store)
    for node, volunteer in VOLUNTEERS.items():
        store.enroll_node(volunteer, KEY_OF[node], None, True, "x:1", 4, T0)
    yield add(store, "primes", list("abcdefgh"))


def test_a_scheduler_restored_after_a_crash_carries_on_identically(
    store: Store, store_url: str, primes: list[int]
) -> None:
    a, b, c, d, e, f, _, _ = primes
    hub = Hub(store, T0)
    hub.handle(joined(N1, T0))
    assert offered(hub.handle(SlotsFree(N1, 3, T0))) == [(1, a), (2, b), (3, c)]
    hub.handle(OffersAccepted(N1, (1, 2), T0 + 1))
    hub.handle(joined(N3, T0 + 1))
    assert offered(hub.handle(SlotsFree(N3, 1, T0 + 1))) == [(4, d)]
    hub.handle(OffersAccepted(N3, (4,), T0 + 1))
    hub.handle(joined(N2, T0 + 2))
    assert offered(hub.handle(SlotsFree(N2, 2, T0 + 2))) == [(5, e), (6, f)]
    hub.handle(OffersAccepted(N2, (5, 6), T0 + 2))
    hub.handle(ResultReceived(N2, 5, True, 29, None, 1.0, 1.1, T0 + 3))
    hub.handle(LeasesDeclined(N2, (6,), "shutting down", T0 + 3))
    hub.handle(ResultReceived(N1, 2, False, None, "ZeroDivisionError", 0.1, 0.1, T0 + 4))
    # b failed once in its code and waits in front, before f, which n2 declined earlier.
    assert offered(hub.handle(SlotsFree(N2, 1, T0 + 4))) == [(7, b)]
    hub.handle(OffersAccepted(N2, (7,), T0 + 4))

    # The hub dies at T1. Its connections die with it: to the old scheduler (kept only
    # to compare) that looks like a last heartbeat and the node leaving.
    t1 = T0 + 5
    for node in (N1, N2, N3):
        hub.handle(HeartbeatReceived(node, t1), NodeLeft(node, t1))
    store.close()
    reopened = Store(store_url)
    try:
        new = Hub(reopened, t1)
        assert durable_state(new.scheduler) == durable_state(hub.scheduler)
        assert new.scheduler.tasks[b].code_errors == 1
        assert new.scheduler.tasks[b].attempts == 2

        steps: list[Event] = [
            # n1 comes back holding lease 1 but not the offer of lease 3: c goes back.
            joined(N1, t1 + 1, held=(1,)),
            # n2 comes back having lost lease 7: b goes back with its attempts.
            joined(N2, t1 + 1),
            SlotsFree(N2, 2, t1 + 2),
            ResultReceived(N1, 1, True, 2, None, 3.0, 3.0, t1 + 3),
            OffersAccepted(N2, (8, 9), t1 + 3),
            # b's code fails a second time: deterministic, b is F.
            ResultReceived(N2, 8, False, None, "ZeroDivisionError", 0.1, 0.1, t1 + 4),
            # n3 never comes back: its lease lives one heartbeat window from the restart.
            Tick(t1 + SETTINGS.lease_window - 1),
            Tick(t1 + SETTINGS.lease_window + 1),
        ]
        outputs = []
        for event in steps:
            expected = hub.scheduler.handle(event)
            got = new.handle(event)
            assert got == [i for i in expected if not isinstance(i, CHANGES)], event
            outputs.append(got)
        assert outputs[0] == [SendWelcome(N1, (1,))]
        assert outputs[1] == [SendWelcome(N2, ())]
        assert offered(outputs[2]) == [(8, b), (9, c)]  # the latest retry first
        assert outputs[6] == []
        assert durable_state(new.scheduler) == durable_state(hub.scheduler)
        assert durable_state(restored(reopened, t1 + 20)) == durable_state(new.scheduler)

        assert task_row(reopened, a)["state"] == "C"
        row_b = task_row(reopened, b)
        assert (row_b["state"], row_b["attempts"], row_b["error"]) == (
            "F",
            3,
            "ZeroDivisionError",
        )
        row_d = task_row(reopened, d)
        assert (row_d["state"], row_d["attempts"], row_d["lease_id"]) == ("NA", 1, None)
        assert reopened.task_history("primes", "d")[-1]["outcome"] == "lost"
        assert reopened.state_counts() == {"NA": 4, "TA": 0, "A": 1, "C": 2, "F": 1, "X": 0}
    finally:
        reopened.close()


def test_a_lease_is_resumed_when_its_node_rejoins_within_the_window(
    store: Store, primes: list[int]
) -> None:
    hub = Hub(store, T0)
    hub.handle(joined(N1, T0), SlotsFree(N1, 1, T0))
    hub.handle(OffersAccepted(N1, (1,), T0 + 1))
    t1 = T0 + 100  # a long outage: the window counts from the restart
    new = Hub(store, t1)
    assert new.handle(Tick(t1 + SETTINGS.lease_window - 0.5)) == []
    assert new.handle(joined(N1, t1 + SETTINGS.lease_window - 0.5, held=(1,))) == [
        SendWelcome(N1, (1,))
    ]
    assert new.handle(ResultReceived(N1, 1, True, [2], None, 1, 1, t1 + 30))[0].accepted  # type: ignore[union-attr]
    row = task_row(store, primes[0])
    assert (row["state"], row["attempts"], row["volunteer"]) == ("C", 1, "alice")


def test_a_lease_is_released_when_its_node_stays_away(store: Store, primes: list[int]) -> None:
    hub = Hub(store, T0)
    hub.handle(joined(N1, T0), SlotsFree(N1, 2, T0))
    hub.handle(OffersAccepted(N1, (1,), T0 + 1))  # lease 2 stays an unaccepted offer
    t1 = T0 + 100
    new = Hub(store, t1)
    new.handle(Tick(t1 + SETTINGS.lease_window + 0.5))
    # Both go back: the accepted lease as a spent attempt, the bare offer as none.
    assert (task_row(store, primes[0])["state"], task_row(store, primes[0])["attempts"]) == (
        "NA",
        1,
    )
    assert (task_row(store, primes[1])["state"], task_row(store, primes[1])["attempts"]) == (
        "NA",
        0,
    )
    # The node comes back too late, still holding lease 1: it is not resumed.
    assert new.handle(joined(N1, t1 + 20, held=(1,))) == [SendWelcome(N1, ())]
    snap = store.load_snapshot()
    assert snap.leases == []
    assert snap.waiting[snap.projects[0].id][:2] == [primes[1], primes[0]]


def test_a_task_out_of_attempts_fails_after_the_restart(store: Store, primes: list[int]) -> None:
    a = primes[0]
    hub = Hub(store, T0)
    hub.handle(joined(N1, T0))
    now = T0
    for lease in (1, 2):
        assert offered(hub.handle(SlotsFree(N1, 1, now))) == [(lease, a)]
        hub.handle(OffersAccepted(N1, (lease,), now))
        now += 20
        hub.handle(Tick(now))  # silent for longer than the window: lease lost
        hub.handle(joined(N1, now))
    assert offered(hub.handle(SlotsFree(N1, 1, now))) == [(3, a)]
    hub.handle(OffersAccepted(N1, (3,), now))
    assert task_row(store, a)["attempts"] == 3
    new = Hub(store, now + 1)
    assert new.scheduler.tasks[a].attempts == 3
    assert new.scheduler.tasks[a].past_leases == [1, 2]
    new.handle(Tick(now + 1 + SETTINGS.lease_window + 1))
    row = task_row(store, a)
    assert (row["state"], row["attempts"]) == ("F", 3)
    assert row["error"].startswith("gave up after 3 attempts; last: lost")


def test_a_late_result_after_the_restart_completes_the_task(
    store: Store, primes: list[int]
) -> None:
    a = primes[0]
    hub = Hub(store, T0)
    hub.handle(joined(N1, T0), SlotsFree(N1, 1, T0))
    hub.handle(OffersAccepted(N1, (1,), T0))
    hub.handle(Tick(T0 + 20))  # n1 silent: lease 1 lost, a back to NA
    new = Hub(store, T0 + 30)
    assert new.scheduler.past_leases[1].node_id == N1
    new.handle(joined(N1, T0 + 31))
    out = new.handle(ResultReceived(N1, 1, True, "late", None, 1, 1, T0 + 32))
    assert out[-1].accepted  # type: ignore[union-attr]
    assert task_row(store, a)["state"] == "C"
    # The queue still holds a's key; the next offer skips it.
    assert offered(new.handle(SlotsFree(N1, 1, T0 + 33))) == [(2, primes[1])]


# ---- many random runs with restarts ------------------------------------------------------


class Driver:
    """Random but reproducible traffic from three nodes on two projects."""

    def __init__(self, store: Store, seed: int, tasks: dict[str, list[int]]) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.now = T0
        self.hub = Hub(store, self.now)
        self.connected: set[str] = set()
        self.projects = {N1: ("primes",), N2: ("mandel",), N3: ("primes",)}
        self.next_file = 0
        self.tasks = tasks

    def event(self) -> Event:
        rng, s = self.rng, self.hub.scheduler
        node = rng.choice([N1, N2, N3])
        mine = sorted(s.nodes[node].leases) if node in s.nodes else []
        offers = [lid for lid in mine if not s.leases[lid].accepted]
        running = [lid for lid in mine if s.leases[lid].accepted]
        if node not in self.connected:
            self.connected.add(node)
            held = tuple(lid for lid in running if rng.random() < 0.7)
            return NodeJoined(node, VOLUNTEERS[node], self.projects[node], held, self.now)
        weights = {
            "accept": 30 if offers else 0,
            "result": 30 if running else 0,
            "late": 4 if s.past_leases else 0,
            "decline": 4 if mine else 0,
            "refuse": 2 if offers else 0,
            "slots": 15,
            "leave": 3,
            "add": 3,
            "beat": 8,
            "tick": 12,
        }
        (kind,) = rng.choices(list(weights), list(weights.values()))
        if kind == "accept":
            chosen = rng.sample(offers, rng.randint(1, len(offers)))
            return OffersAccepted(node, tuple(chosen), self.now)
        if kind in ("result", "late"):
            # A late result: mostly for a lease this node had, now and then another's.
            own_past = [lid for lid, lease in s.past_leases.items() if lease.node_id == node]
            past = own_past if own_past and rng.random() < 0.9 else sorted(s.past_leases)
            lease = rng.choice(running if kind == "result" else past)
            ok = rng.random() < 0.6
            return ResultReceived(
                node, lease, ok, {"v": lease} if ok else None, None if ok else "crash",
                rng.random(), 1.0, self.now,
            )  # fmt: skip
        if kind == "decline":
            return LeasesDeclined(node, (rng.choice(mine),), "busy", self.now)
        if kind == "refuse":
            digest = s.projects[s.project_ids[self.projects[node][0]]].digest or ""
            return BundleRefused(node, digest, "bad signature", (offers[0],), self.now)
        if kind == "slots":
            return SlotsFree(node, rng.randint(0, 3), self.now)
        if kind == "leave":
            self.connected.discard(node)
            return NodeLeft(node, self.now)
        if kind == "add":
            project = self.projects[node][0]
            self.next_file += 1
            ids = [f"x{self.next_file}-{i}" for i in range(rng.randint(1, 3))]
            pks = add(self.store, project, ids)
            return TasksAdded(s.project_ids[project], tuple(pks))
        if kind == "beat":
            return HeartbeatReceived(node, self.now)
        self.now += rng.choice([0.5, 1.0, 2.0, 4.0, 9.0, 16.0, 61.0])
        return Tick(self.now)

    def step(self) -> Event:
        event = self.event()
        for message in self.hub.handle(event):
            if isinstance(message, Disconnect):
                self.connected.discard(message.node_id)  # the hub closes its connection
        return event

    def restart(self) -> None:
        old = self.hub.scheduler
        self.hub = Hub(self.store, self.now)
        assert same_state(self.store, self.hub.scheduler, old)
        self.connected.clear()


def same_state(store: Store, a: Scheduler, b: Scheduler) -> bool:
    """Equal durable state, up to the order of retries of the same instant."""
    sa, sb = durable_state(a), durable_state(b)
    if retry_groups(store, sa) != retry_groups(store, sb):
        return False
    sa["queues"] = sb["queues"] = None
    return sa == sb


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_traffic_with_restarts_loses_nothing(store: Store, seed: int) -> None:
    register(store, "primes")
    register(store, "mandel", owner=OTHER_OWNER)
    for node, volunteer in VOLUNTEERS.items():
        store.enroll_node(volunteer, KEY_OF[node], None, True, "x:1", 4, T0)
    tasks = {
        "primes": add(store, "primes", [f"p{i}" for i in range(12)]),
        "mandel": add(store, "mandel", [f"m{i}" for i in range(8)]),
    }
    driver = Driver(store, seed, tasks)
    for step in range(300):
        event = driver.step()
        if step % 10 == 9:
            # The database holds the scheduler's state at every commit.
            assert same_state(store, restored(store, driver.now), driver.hub.scheduler), (
                f"step {step}: {event}"
            )
        if driver.rng.random() < 0.03:
            driver.restart()
        driver.now += 0.001  # a real clock: no two events at the same instant
    counts = store.state_counts()
    assert counts["C"] + counts["F"] > 0, counts  # the run did real work
    with store.engine.connect() as conn:
        results = conn.execute(select(func.count()).select_from(Result)).scalar()
        credited = conn.execute(select(func.sum(Volunteer.tasks_completed))).scalar()
    assert results == credited == counts["C"]  # one result and one credit per completed task
