"""The hot path's statements, straight to the database driver.

Each scheduler round writes a batch of changes and reads the payloads of its offers; the
outbox reads and marks finished tasks. Through ``Connection.execute`` each statement
costs about 50 us of SQLAlchemy's per-call work (parameter processing, result set-up,
and for an expanding ``IN`` a fresh rendering of the SQL) plus about 8 a row; the
driver's own execute or executemany costs about 2. These statements need none of that
work: their parameters and results are plain ints, floats, strings and booleans, and
every parameter is given. So each is compiled once per dialect (and, for inserts and
updates, per set of keys) with SQLAlchemy, and run on the driver's cursor inside the
caller's transaction. Driver errors are re-raised as SQLAlchemy's, as
``Connection.execute`` would, so callers and the retry policy (hub/retry.py) see the same
exceptions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter

# A statement on an IN (...) list, built from the list's parameters.
InQuery = Callable[[list[BindParameter[Any]]], ClauseElement]


@dataclass(frozen=True, slots=True)
class Plan:
    """How to run a compiled statement on the driver."""

    sql: str
    positions: tuple[str, ...] | None  # parameter names in order; None: passed by name
    fixed: dict[str, Any]  # the values of binds the statement carries (LIMIT 500, say)

    def bind(self, params: Mapping[str, Any]) -> Any:
        named = {**self.fixed, **params} if self.fixed else params
        return named if self.positions is None else tuple(named[n] for n in self.positions)


def execute_many(conn: Connection, statement: ClauseElement, rows: list[dict[str, Any]]) -> None:
    """``statement`` once per row (every row with the same keys), as one executemany."""
    if not rows:
        return
    plan = _plan(statement, conn.dialect, tuple(rows[0]))
    if plan is None:  # a Python-side default to fill in: SQLAlchemy's work after all
        conn.execute(statement, rows)  # type: ignore[call-overload]
        return
    _run(conn, plan.sql, [plan.bind(row) for row in rows], many=True, fetch=False)


def select_in(
    conn: Connection, query: InQuery, keys: Sequence[Any], params: Mapping[str, Any] | None = None
) -> list[Any]:
    """The rows of ``query`` with ``keys`` in its IN list (at most db.CHUNK of them) and
    ``params`` for its other binds."""
    return _run_in(conn, query, keys, params or {}, fetch=True)


def update_in(
    conn: Connection, statement: InQuery, keys: Sequence[Any], params: Mapping[str, Any]
) -> None:
    """Run ``statement`` with ``keys`` in its IN list and ``params`` for its other binds."""
    _run_in(conn, statement, keys, params, fetch=False)


def _run_in(
    conn: Connection,
    query: InQuery,
    keys: Sequence[Any],
    params: Mapping[str, Any],
    fetch: bool,
) -> list[Any]:
    # The IN list is padded to a power of two by repeating the last key (IN matches a
    # row once however often its key is listed): a handful of shapes serve every size.
    if not keys:
        return []
    size = 1 << (len(keys) - 1).bit_length()
    padded = [*keys, *[keys[-1]] * (size - len(keys))]
    named = {**params, **{f"k{i}": key for i, key in enumerate(padded)}}
    plan = _plan(_in_shape(query, size), conn.dialect, tuple(named))
    assert plan is not None, "every parameter of the statement must be given"
    return _run(conn, plan.sql, plan.bind(named), many=False, fetch=fetch)


def _run(conn: Connection, sql: str, params: Any, many: bool, fetch: bool) -> list[Any]:
    driver_error = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return list(cursor.fetchall()) if fetch else []
    except driver_error as exc:
        raise DBAPIError.instance(sql, params, exc, driver_error) from exc
    finally:
        cursor.close()


@functools.cache
def _in_shape(query: InQuery, size: int) -> ClauseElement:
    return query([bindparam(f"k{i}") for i in range(size)])


@functools.cache
def _plan(statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...]) -> Plan | None:
    """How to run ``statement`` with parameters named ``keys``, or None if it wants one
    that neither they nor the statement carry (an insert's Python-side default)."""
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    assert isinstance(compiled, SQLCompiler)
    if compiled.positiontup is not None:
        names: tuple[str, ...] | None = tuple(compiled.positiontup)
        wanted = set(names or ())
    elif dialect.paramstyle in ("pyformat", "named"):
        names = None
        wanted = set(compiled.bind_names.values())
    else:
        return None
    fixed = {}
    for name in wanted - set(keys):
        bind = compiled.binds.get(name)
        if bind is None or bind.callable is not None or bind.value is None:
            return None
        fixed[name] = bind.value
    return Plan(compiled.string, names, fixed)
