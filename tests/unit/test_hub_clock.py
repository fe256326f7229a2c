"""Lease timing is immune to wall-clock jumps (hub/clock.py).

While the hub runs, its clock is the wall time read at start plus the monotonic time
since, so a step of the system clock (NTP, an admin, a VM restored) neither expires a
lease nor keeps one alive. After a restart, restored leases are judged from the restart
moment: one heartbeat window for the node to come back, a fresh offer_timeout for offers.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.blobs import ContentStore
from hub.changes import LeaseAccepted, LeaseOffered, TaskUpdated
from hub.clock import AnchoredClock
from hub.events import (
    HeartbeatReceived,
    NodeJoined,
    OffersAccepted,
    ProjectInfo,
    ProjectUpdated,
    SlotsFree,
    TasksAdded,
    Tick,
)
from hub.inbox import Inbox
from hub.lifecycle import TaskState
from hub.outbox import Outbox
from hub.runtime import HubRuntime
from hub.scheduler import Scheduler, Settings
from hub.store import Store, TaskEntry
from issc.keys import public_key_string
from issc.manifest import Limits, Manifest

T0 = 1_800_000_000.0
WINDOW = 1.5  # heartbeat 0.5 s x 3 misses
OFFER_TIMEOUT = 60.0
DIGEST = "d" * 64


class FakeTime:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 1000.0

    def clock(self) -> AnchoredClock:
        return AnchoredClock(wall=lambda: self.wall, monotonic=lambda: self.mono)

    def passes(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_the_anchored_clock_follows_monotonic_time_not_the_wall() -> None:
    t = FakeTime()
    clock = t.clock()
    assert clock() == T0
    t.passes(2.5)
    assert clock() == T0 + 2.5
    t.wall += 3600  # the system clock is stepped forward
    assert clock() == T0 + 2.5
    t.wall -= 7200  # and back
    t.mono += 1.0
    assert clock() == T0 + 3.5


def running_lease(clock: AnchoredClock) -> tuple[Scheduler, int]:
    """A scheduler with one node running one task under an accepted lease."""
    scheduler = Scheduler(Settings(5, OFFER_TIMEOUT, WINDOW))
    scheduler.handle(
        ProjectUpdated(ProjectInfo(1, "p", 1, DIGEST, 10)),
        TasksAdded(1, (1,)),
        NodeJoined("n-1", "alice", ("p",), (), clock()),
        SlotsFree("n-1", 1, clock()),
    )
    [lease] = scheduler.leases
    scheduler.handle(OffersAccepted("n-1", (lease,), clock()))
    return scheduler, lease


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
def test_a_wall_clock_jump_neither_expires_nor_extends_a_lease(jump: float) -> None:
    t = FakeTime()
    clock = t.clock()
    scheduler, lease = running_lease(clock)
    t.passes(0.5)
    scheduler.handle(HeartbeatReceived("n-1", clock()), Tick(clock()))
    t.wall += jump  # the system clock steps an hour
    scheduler.handle(Tick(clock()))
    assert lease in scheduler.leases, "a step of the wall clock expired the lease"
    t.passes(WINDOW - 0.1)  # no heartbeat since: still inside the window
    scheduler.handle(Tick(clock()))
    assert lease in scheduler.leases
    t.passes(0.2)  # past the window: lost, the step back did not extend it
    scheduler.handle(Tick(clock()))
    assert lease not in scheduler.leases


def test_the_same_jump_on_the_wall_clock_would_have_expired_it() -> None:
    """The counterpart: timed by the wall clock, a step forward loses the lease at once."""
    t = FakeTime()
    scheduler, lease = running_lease(lambda: t.wall)  # type: ignore[arg-type]
    t.wall += 3600
    scheduler.handle(Tick(t.wall))
    assert lease not in scheduler.leases


def test_the_runtime_clock_does_not_follow_a_stepped_system_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = [time.time()]
    monkeypatch.setattr(time, "time", lambda: wall[0])  # the system clock, as the hub sees it
    store = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    files = ContentStore(tmp_path / "files")
    runtime = HubRuntime(
        SimpleNamespace(data_dir=tmp_path),  # type: ignore[arg-type]
        store,
        Scheduler(Settings(5, OFFER_TIMEOUT, WINDOW)),
        Inbox(tmp_path / "inbox", store, files),
        Outbox(tmp_path / "outbox", store, files),
        files,
    )
    try:
        before = runtime.now()
        wall[0] += 3600  # stepped an hour forward
        assert abs(runtime.now() - before) < 1.0
        wall[0] -= 7200  # and back
        assert abs(runtime.now() - before) < 1.0
    finally:
        store.close()


def test_after_a_restart_leases_are_judged_from_the_restart_moment(tmp_path: Path) -> None:
    """Stored times may be far off the new anchor (the clock moved while the hub was
    down): a restored lease lives one window from the restart, an offer one timeout."""
    store = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    try:
        content = b"bundle"
        manifest = Manifest(
            name="p",
            version=1,
            entrypoint=("python3", "main.py"),
            mode="process",
            limits=Limits(),
            quorum=1,
            files=(),
            owner_key="ed25519:" + "A" * 43 + "=",
        )
        store.register_bundle(manifest, hashlib.sha256(content).hexdigest(), content, T0)
        key = public_key_string(Ed25519PrivateKey.from_private_bytes(b"\x11" * 32).public_key())
        node = store.enroll_node("alice", key, None, True, "127.0.0.1:1", 2, T0)
        _, (running, offered) = store.add_tasks(
            "p", [TaskEntry("a", "1", 1), TaskEntry("b", "2", 2)], "f" * 64, "t.jsonl", T0
        )
        long_ago = T0 - 10 * 3600  # wall time of the last run: ten hours "before" now
        store.apply(
            [
                LeaseOffered(1, running, node, long_ago),
                LeaseAccepted(1, long_ago),
                TaskUpdated(running, TaskState.A, 1, 1, node),
                LeaseOffered(2, offered, node, long_ago),
                TaskUpdated(offered, TaskState.TA, 0, 2, node),
            ]
        )
        t = FakeTime()
        clock = t.clock()
        scheduler = Scheduler(Settings(5, OFFER_TIMEOUT, WINDOW), store.load_snapshot(), clock())
        scheduler.handle(Tick(clock()))
        assert set(scheduler.leases) == {1, 2}, "restored leases expired at the restart"
        t.passes(WINDOW - 0.1)
        scheduler.handle(Tick(clock()))
        assert set(scheduler.leases) == {1, 2}
        t.passes(0.2)  # one window after the restart: the node never came back
        scheduler.handle(Tick(clock()))
        assert 1 not in scheduler.leases
    finally:
        store.close()
