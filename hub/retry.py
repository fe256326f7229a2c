"""Which database errors are worth retrying, and how long to keep trying.

A database that is locked for a moment (SQLite: another process holds the write lock;
PostgreSQL: a serialization failure or deadlock) or briefly unreachable (PostgreSQL
restarting, a connection reset) usually answers a few seconds later. Such errors are
*transient*: the store runs the whole unit of work again (every ``Store`` method is one
transaction, or only reads), with exponential backoff and jitter, for at most
``RetryPolicy.total`` seconds. Everything else (a constraint violated, a bad statement,
a full disk) is not retried: running the same statement again would fail the same way.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_FULL = 13
PG_DISK_FULL = "53100"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# PostgreSQL SQLSTATE classes and codes that say "try again": 08 connection exception,
# 40 transaction rollback (serialization failure, deadlock); 57P01-57P03 the server is
# shutting down or starting; 53300 too many connections.
PG_TRANSIENT_CLASSES = ("08", "40")
PG_TRANSIENT_CODES = ("57P01", "57P02", "57P03", "53300")
# Where a driver gives no code: words of the messages of the errors above.
TRANSIENT_WORDS = (
    "database is locked",
    "database table is locked",
    "database is busy",
    "connection refused",
    "could not connect",
    "connection reset",
    "server closed the connection",
    "terminating connection",
    "connection timed out",
    "timeout expired",
    "the database system is starting up",
    "the database system is shutting down",
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in total time."""

    total: float = 30.0  # seconds from the first attempt after which a call gives up
    first: float = 0.05  # seconds before the first retry (before jitter)
    cap: float = 2.0  # the longest pause between two attempts

    def delay(self, attempt: int) -> float:
        """The pause before retry number ``attempt`` (0-based): half to all of the
        exponential step, so callers that failed together do not retry together."""
        step = min(self.cap, self.first * 2**attempt)
        return random.uniform(step / 2, step)


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or the database error it was raised from) is worth retrying."""
    for error in _chain(exc):
        if isinstance(error, PoolTimeoutError):
            return True  # no pooled connection came free in time
        if isinstance(error, DBAPIError):
            return _dbapi_transient(error)
    return False


def _dbapi_transient(error: DBAPIError) -> bool:
    if error.connection_invalidated:
        return True
    orig = error.orig
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int):
        return sqlite_code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] in PG_TRANSIENT_CLASSES or sqlstate in PG_TRANSIENT_CODES
    if isinstance(error, OperationalError):
        message = str(orig).lower()
        return any(words in message for words in TRANSIENT_WORDS)
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during, nearest first. A store method that
    turns a database error into StoreError (``raise ... from None``) still keeps it as
    ``__context__``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` says a disk is full: ENOSPC or EDQUOT from the OS, SQLITE_FULL, or
    PostgreSQL's disk_full."""
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(error, DBAPIError):
            orig = error.orig
            if getattr(orig, "sqlite_errorcode", None) == SQLITE_FULL:
                return True
            if (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == PG_DISK_FULL:
                return True
            if "database or disk is full" in str(orig).lower():
                return True
    return False


def brief(exc: BaseException) -> str:
    """An error's first line (SQLAlchemy appends the statement and its parameters, which
    for a batch can run to megabytes), at most 300 characters."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
