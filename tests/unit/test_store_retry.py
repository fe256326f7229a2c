"""A database that is locked or briefly away costs a retry, not the hub (hub/retry.py).

``AsyncStore.call`` runs a store method again, whole, on a transient error (SQLite busy
or locked, a PostgreSQL connection lost), with backoff, for at most the policy's total
time; anything else (a constraint, a full disk) is raised at once as StoreError.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from hub.models import Volunteer
from hub.retry import RetryPolicy, is_disk_full, is_transient
from hub.store import AsyncStore, Store
from issc.errors import StoreError

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "hub.db"


def open_store(db: Path, busy_timeout: float = 0.1) -> Store:
    store = Store(f"sqlite:///{db}", busy_timeout=busy_timeout)
    store.create_schema()
    return store


def hold_write_lock(db: Path, seconds: float) -> threading.Thread:
    """Another connection takes SQLite's write lock (BEGIN EXCLUSIVE) and keeps it for
    ``seconds``; returns once the lock is held."""
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None, timeout=5)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            conn.execute("COMMIT")
        finally:
            conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert locked.wait(5)
    return thread


def volunteers(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Volunteer)).scalar_one())


def locked_error() -> OperationalError:
    return OperationalError("COMMIT", {}, sqlite3.OperationalError("database is locked"))


async def test_a_commit_waits_out_a_lock_held_by_another_process(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(db, busy_timeout=0.1)  # SQLite alone would give up after 0.1 s
    astore = AsyncStore(store, RetryPolicy(total=10.0))
    try:
        holder = hold_write_lock(db, 1.5)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="hub.store"):
            token = await astore.call(store.issue_token, "alice", T0)
        took = time.monotonic() - started
        holder.join()
        assert token.startswith("issc-")
        assert 1.3 < took < 5.0, took
        assert volunteers(store) == 1
        messages = [r.getMessage() for r in caplog.records]
        assert sum("retrying with backoff" in m for m in messages) == 1, messages  # once
        assert sum("available again" in m for m in messages) == 1, messages
    finally:
        astore.shutdown()


async def test_a_lock_held_beyond_the_bound_is_a_store_error(db: Path) -> None:
    store = open_store(db, busy_timeout=0.1)
    astore = AsyncStore(store, RetryPolicy(total=1.0))
    try:
        holder = hold_write_lock(db, 3.0)
        started = time.monotonic()
        with pytest.raises(StoreError, match="database is locked"):
            await astore.call(store.issue_token, "alice", T0)
        assert time.monotonic() - started < 2.5
        holder.join()
        assert volunteers(store) == 0
    finally:
        astore.shutdown()


async def test_a_retry_runs_the_whole_unit_of_work_again(db: Path) -> None:
    """The first attempt fails after its first write: that write is rolled back with it,
    and the retry writes everything once."""
    store = open_store(db)
    astore = AsyncStore(store, RetryPolicy(total=5.0))
    calls = []

    def unit() -> None:
        calls.append(1)
        with store.engine.begin() as conn:
            conn.execute(insert(Volunteer).values(name="a", credit=0, tasks_completed=0,
                                                  created_at=T0))  # fmt: skip
            if len(calls) == 1:
                raise locked_error()
            conn.execute(insert(Volunteer).values(name="b", credit=0, tasks_completed=0,
                                                  created_at=T0))  # fmt: skip

    try:
        await astore.call(unit)
        assert len(calls) == 2
        with store.engine.connect() as conn:
            assert sorted(conn.execute(select(Volunteer.name)).scalars()) == ["a", "b"]
    finally:
        astore.shutdown()


async def test_errors_that_are_not_transient_are_not_retried(db: Path) -> None:
    store = open_store(db)
    astore = AsyncStore(store, RetryPolicy(total=5.0))
    calls = []

    def duplicate() -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))

    def disk_full() -> None:
        calls.append(1)
        raise OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))

    try:
        for fn in (duplicate, disk_full):
            calls.clear()
            with pytest.raises(StoreError):
                await astore.call(fn)
            assert calls == [1], fn.__name__
    finally:
        astore.shutdown()


async def test_a_degraded_hub_fails_fast(db: Path) -> None:
    """While degraded the recovery loop probes; other callers get their error at once."""
    store = open_store(db)
    astore = AsyncStore(store, RetryPolicy(total=30.0))
    astore.fail_fast = True

    def locked() -> None:
        raise locked_error()

    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            await astore.call(locked)
        assert time.monotonic() - started < 0.5
    finally:
        astore.shutdown()


def test_sqlite_waits_for_a_lock_by_default(db: Path) -> None:
    store = Store(f"sqlite:///{db}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    finally:
        store.close()


def test_which_errors_are_transient() -> None:
    class PgError(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    def pg(sqlstate: str) -> OperationalError:
        return OperationalError("SELECT 1", {}, PgError(sqlstate))

    assert is_transient(locked_error())
    assert is_transient(pg("08006"))  # connection failure
    assert is_transient(pg("40001"))  # serialization failure
    assert is_transient(pg("40P01"))  # deadlock
    assert is_transient(pg("57P01"))  # admin shutdown
    assert not is_transient(pg("53100"))  # disk full: not a matter of waiting
    assert is_disk_full(pg("53100"))
    assert not is_transient(pg("23505"))  # unique violation
    assert not is_transient(
        OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))
    )
    invalidated = OperationalError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert is_transient(invalidated)
    # A store method that wrapped the error keeps it as the context.
    try:
        try:
            raise locked_error()
        except OperationalError:
            raise StoreError("cannot commit a batch") from None
    except StoreError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(StoreError("project 'p' version 1 is not newer"))
    assert not is_transient(ValueError("x"))


def test_the_backoff_grows_and_is_bounded() -> None:
    policy = RetryPolicy(total=30.0, first=0.05, cap=2.0)
    delays = [policy.delay(n) for n in range(12)]
    assert 0.025 <= delays[0] <= 0.05
    assert all(d <= 2.0 for d in delays)
    assert delays[-1] >= 1.0  # capped at 2 s, at least half of it with jitter
