"""Database plumbing shared by the store's parts: tables, the engine, shared SQL helpers.

Nothing here knows the hub's rules. ``Store`` (hub/store.py) is built from one part
per concern (hub/store_*.py); each part reaches the database through ``engine``,
declared once on ``StoreBase``, and these helpers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Engine,
    Table,
    bindparam,
    create_engine,
    event,
    insert,
    make_url,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool, StaticPool
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.elements import BindParameter

from hub.events import ProjectInfo
from hub.models import (
    Base,
    Blob,
    Bundle,
    EnrollmentToken,
    InboxFile,
    Lease,
    Node,
    OutboxFile,
    Output,
    PendingResult,
    Project,
    Result,
    Task,
    TaskInput,
    Volunteer,
)
from hub.rawsql import execute_many, select_in
from issc.errors import StoreError

T = TypeVar("T")


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


PROJECTS, BUNDLES, VOLUNTEERS, NODES = map(_table, (Project, Bundle, Volunteer, Node))
TASKS, LEASES, RESULTS = map(_table, (Task, Lease, Result))
INBOX_FILES, OUTBOX_FILES = map(_table, (InboxFile, OutboxFile))
BLOBS, TASK_INPUTS, OUTPUTS = map(_table, (Blob, TaskInput, Output))
ENROLLMENT_TOKENS = _table(EnrollmentToken)
PENDING_RESULTS = _table(PendingResult)
CHUNK = 500  # rows per IN (...) query, well under every database's parameter limit


def iso_time(stamp: float | None) -> str | None:
    """UNIX seconds as ISO 8601 UTC, the form results.jsonl and issc-ctl --json use."""
    if stamp is None:
        return None
    return _iso_second(math.floor(stamp))


@functools.lru_cache(maxsize=256)
def _iso_second(second: int) -> str:
    # Whole seconds, cached: an outbox export writes hundreds of lines finished within
    # the same few seconds, and strftime was a few per cent of the hub's time a task.
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def update_by_id(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """``UPDATE table SET ... WHERE id = :id`` for every row, as one executemany.

    Every row must have the same keys: ``id`` and the columns to set.
    """
    if not rows:
        return
    columns = tuple(key for key in rows[0] if key != "id")
    execute_many(
        conn,
        _update_by_id(table, columns),
        [{f"b_{key}": value for key, value in row.items()} for row in rows],
    )


@functools.cache
def _update_by_id(table: Table, columns: tuple[str, ...]) -> Update:
    # Built once per shape: building a statement costs more than running it for a
    # batch of a few rows (it was a fifth of the hub's CPU per task).
    return (
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values({column: bindparam(f"b_{column}") for column in columns})
    )


def _known_blobs(digests: list[BindParameter[Any]]) -> ClauseElement:
    return select(Blob.sha256).where(Blob.sha256.in_(digests))


def insert_blobs(conn: Any, sizes: dict[str, int], now: float) -> None:
    """Add a ``blobs`` row for each digest that has none yet."""
    known: set[str] = set()
    for chunk in chunks(list(sizes)):
        known.update(sha for (sha,) in select_in(conn, _known_blobs, chunk))
    new = [
        {"sha256": sha, "size": size, "created_at": now}
        for sha, size in sizes.items()
        if sha not in known
    ]
    if new:
        conn.execute(insert(BLOBS), new)


def project_info(row: Any) -> ProjectInfo:
    return ProjectInfo(
        id=row.id,
        name=row.name,
        version=row.version,
        digest=row.digest,
        size=row.size,
        paused=bool(row.paused),
        quorum=row.quorum,
        output_mb=row.output_mb,
        wall_seconds=row.wall_seconds,
        tolerance=row.tolerance,
    )


# Seconds SQLite waits for another connection's lock before "database is locked"; the
# store then retries the whole transaction (hub/retry.py), so a lock held longer than this
# costs a retry, not the hub.
BUSY_TIMEOUT = 5.0
PG_CONNECT_TIMEOUT = 10  # seconds to reach a PostgreSQL server before a (retried) error


def _sqlite_pragmas(busy_timeout: float) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # First, so that the PRAGMAs below wait for a lock too instead of failing at once.
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss too
        cursor.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache instead of SQLite's 2: a hub's task and lease tables and
        # their indexes outgrow 2 MiB within tens of thousands of tasks, after which every
        # commit re-reads index pages (40,000 tasks: hub CPU 95.9 -> 88.9 s, one run each).
        cursor.execute("PRAGMA cache_size=-65536")
        cursor.close()

    return on_connect


def make_engine(url: str, busy_timeout: float = BUSY_TIMEOUT) -> Engine:
    """An engine for ``url``; SQLite gets WAL, full sync and ``busy_timeout`` seconds of
    waiting for locks. Raises StoreError."""
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            # An in-memory database lives and dies with its one connection: every thread
            # must share that connection (StaticPool), or each sees an empty database.
            in_memory = parsed.database in (None, "", ":memory:") or (
                parsed.query.get("mode") == "memory"
            )
            engine = create_engine(
                url,
                # One thread uses the store, so a file database keeps one pooled connection
                # (QueuePool) instead of opening one, with its PRAGMAs, per call.
                poolclass=StaticPool if in_memory else QueuePool,
                connect_args={"check_same_thread": False},
            )
            event.listen(engine, "connect", _sqlite_pragmas(busy_timeout))
            return engine
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot open database {url!r}: {exc}") from None


class StoreBase:
    """What every part of ``Store`` relies on: ``engine``, set by ``Store.__init__``."""

    engine: Engine
    _held: Connection | None = None

    @contextlib.contextmanager
    def held_transaction(self) -> Iterator[Connection]:
        """A transaction on the one connection the store keeps between calls, for the calls
        of every scheduler round and outbox export: ``engine.begin()`` checks a connection
        out of the pool and back in, resetting it, each time, a tenth of the hub's time a
        task at a few hundred tasks a second. Only the store's thread calls it. After any
        failure the connection is given up, so the next call starts on a fresh one (a
        database that went away, say)."""
        conn = self._held
        if conn is None or conn.closed:
            conn = self._held = self.engine.connect()
        try:
            with conn.begin():
                yield conn
        except BaseException:
            self._held = None
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def release_held(self) -> None:
        """Close the held connection (before the engine is disposed)."""
        conn, self._held = self._held, None
        if conn is not None:
            conn.close()
