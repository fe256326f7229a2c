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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from hub.db import iso_time, make_engine
from hub.models import Base
from hub.store_admin import AdminStore
from hub.store_enroll import EnrollmentStore
from hub.store_inbox import InboxStore, TaskEntry
from hub.store_outbox import FinishedTask, OutboxStore
from hub.store_scheduler import SchedulerStore
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


class Store(SchedulerStore, EnrollmentStore, InboxStore, OutboxStore, AdminStore):
    """Every read and write the hub makes. Raises StoreError on database failures."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def create_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot create the schema: {exc}") from None

    def close(self) -> None:
        self.engine.dispose()


class AsyncStore:
    """Runs Store methods on one worker thread so the event loop never blocks on I/O."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="issc-store")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the store's thread; database errors become StoreError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: fn(*args))
        except SQLAlchemyError as exc:
            raise StoreError(f"database error in {getattr(fn, '__name__', fn)}: {exc}") from exc

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
