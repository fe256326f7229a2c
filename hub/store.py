"""The hub's store: the source of truth, behind one class, on any SQLAlchemy database.

All methods are synchronous and meant to run on one worker thread (see AsyncStore),
so the event loop never waits on the disk. ``apply`` writes a whole batch of
scheduler changes in one transaction: durability costs one sync per batch, not one
per task. SQLite runs in WAL mode with synchronous=FULL, so a commit survives a kill.

``Store`` is one class, put together from one part per concern so each module keeps
one job: hub/db.py (tables, engine, shared SQL helpers), hub/store_scheduler.py
(start-up snapshot, change batches), hub/store_enroll.py (projects, bundles, nodes),
hub/store_inbox.py (tasks in, offer payloads), hub/store_outbox.py (results out),
hub/store_admin.py (operator queries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import insert, update
from sqlalchemy.exc import SQLAlchemyError

from hub.db import BUSY_TIMEOUT, iso_time, make_engine
from hub.models import Base, HealthProbe
from hub.retry import RetryPolicy, brief, is_transient
from hub.store_admin import AdminStore
from hub.store_enroll import EnrollmentStore
from hub.store_inbox import InboxStore, TaskEntry
from hub.store_outbox import FinishedTask, OutboxStore
from hub.store_scheduler import SchedulerStore
from issc.callthread import CallThread
from issc.errors import StoreError

__all__ = [
    "AsyncStore",
    "FinishedTask",
    "Store",
    "TaskEntry",
    "iso_time",
    "make_engine",
]

T = TypeVar("T")
log = logging.getLogger(__name__)


class Store(SchedulerStore, EnrollmentStore, InboxStore, OutboxStore, AdminStore):
    """Every read and write the hub makes. Raises StoreError on database failures."""

    def __init__(self, url: str, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.engine = make_engine(url, busy_timeout)

    def create_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot create the schema: {exc}") from None

    def close(self) -> None:
        self.release_held()
        self.engine.dispose()

    def probe(self, now: float) -> None:
        """A small write transaction: does the database take commits (again)?"""
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(HealthProbe).where(HealthProbe.id == 1).values(probed_at=now)
            ).rowcount
            if not changed:
                conn.execute(insert(HealthProbe).values(id=1, probed_at=now))


class AsyncStore:
    """Runs Store methods on one worker thread so the event loop never blocks on I/O.

    A call that fails with a transient database error (hub/retry.py: locked, busy,
    unreachable) is run again whole, with backoff, for up to ``policy.total`` seconds;
    every ``Store`` method is one transaction (or only reads), so a retry never repeats
    half a unit of work. An outage is logged once when it starts and once when it ends.
    """

    def __init__(self, store: Store, policy: RetryPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or RetryPolicy()
        # Set while the hub is degraded: its recovery loop does the retrying, and readers
        # (the control socket) get a clear error at once instead of waiting.
        self.fail_fast = False
        self._outage_since: float | None = None  # monotonic time of the first failure
        self._thread = CallThread("issc-store")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the store's thread; database errors become StoreError."""
        loop = asyncio.get_running_loop()
        name = getattr(fn, "__name__", str(fn))
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                result = await self._thread.run(loop, lambda: fn(*args))
            except Exception as exc:
                if not self.fail_fast and is_transient(exc):
                    delay = self.policy.delay(attempt)
                    if time.monotonic() - started + delay <= self.policy.total:
                        self._outage_started(name, exc)
                        attempt += 1
                        await asyncio.sleep(delay)
                        continue
                    log.error(
                        "database: %s still failing after %.1f s and %d attempts; giving up: %s",
                        name,
                        time.monotonic() - started,
                        attempt + 1,
                        brief(exc),
                    )
                if isinstance(exc, SQLAlchemyError):
                    raise StoreError(f"database error in {name}: {exc}") from exc
                raise
            if attempt and self._outage_since is not None:
                log.warning(
                    "database: available again after %.1f s (%s went through on attempt %d)",
                    time.monotonic() - self._outage_since,
                    name,
                    attempt + 1,
                )
                self._outage_since = None
            return result

    def _outage_started(self, name: str, exc: BaseException) -> None:
        if self._outage_since is not None:
            log.debug("database: %s failed again, retrying: %s", name, brief(exc))
            return
        self._outage_since = time.monotonic()
        log.warning(
            "database: %s failed (%s); retrying with backoff for up to %g s",
            name,
            brief(exc),
            self.policy.total,
        )

    def shutdown(self) -> None:
        self._thread.shutdown()
        self.store.close()
