"""hub/rawsql.py on each backend: what the driver runs is what Connection.execute would."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import ClauseElement, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import BindParameter
from storekit import T0, add, register

from hub.db import LEASES, TASKS
from hub.rawsql import execute_many, select_in, update_in
from hub.store import Store


def _names(keys: list[BindParameter[Any]]) -> ClauseElement:
    return select(TASKS.c.id, TASKS.c.name).where(TASKS.c.id.in_(keys)).order_by(TASKS.c.id)


def _limited(keys: list[BindParameter[Any]]) -> ClauseElement:
    # A bind the statement carries itself (LIMIT 2, with SQLite's OFFSET 0).
    return select(TASKS.c.name).where(TASKS.c.id.in_(keys)).order_by(TASKS.c.id).limit(2)


def _rename(keys: list[BindParameter[Any]]) -> ClauseElement:
    return update(TASKS).where(TASKS.c.id.in_(keys)).values(error=bindparam("why"))


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 9])
def test_select_in_finds_each_row_once_whatever_the_padding(store: Store, count: int) -> None:
    register(store)
    pks = add(store, "primes", [f"t{i}" for i in range(10)])
    with store.engine.connect() as conn:
        rows = select_in(conn, _names, pks[:count])
        assert [tuple(r) for r in rows] == [(pk, f"t{i}") for i, pk in enumerate(pks[:count])]
        assert [r[0] for r in select_in(conn, _limited, pks[:count])] == ["t0", "t1"][:count]
        assert select_in(conn, _names, []) == []


def test_update_in_and_execute_many_write_what_core_would(store: Store) -> None:
    register(store)
    pks = add(store, "primes", ["a", "b", "c"])
    with store.engine.begin() as conn:
        update_in(conn, _rename, pks[:2], {"why": "renamed"})
        execute_many(
            conn,
            insert(LEASES),
            [
                {"id": 7 + i, "task_id": pk, "node_id": "n", "offered_at": T0}
                for i, pk in enumerate(pks)
            ],
        )
    with store.engine.connect() as conn:
        errors = conn.execute(select(TASKS.c.error).order_by(TASKS.c.id)).scalars().all()
        leases = conn.execute(select(LEASES.c.id, LEASES.c.accepted_at)).all()
    assert errors == ["renamed", "renamed", None]
    assert sorted(tuple(r) for r in leases) == [(7, None), (8, None), (9, None)]


def test_an_insert_missing_a_python_side_default_goes_through_core(store: Store) -> None:
    info, _ = register(store)
    row = {"project_id": info.id, "name": "b", "input_json": "1", "created_at": T0, "source": "s"}
    with store.engine.begin() as conn:
        execute_many(conn, insert(TASKS), [row])  # state, attempts, exported: defaults
        state, exported = conn.execute(
            select(TASKS.c.state, TASKS.c.exported).where(TASKS.c.name == "b")
        ).one()
    assert (state, exported) == ("NA", False)


def test_a_driver_error_is_raised_as_sqlalchemys(store: Store) -> None:
    register(store)
    [pk] = add(store, "primes", ["a"])
    row = {"id": 1, "task_id": pk, "node_id": "n", "offered_at": T0}
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        execute_many(conn, insert(LEASES), [row, row])
    with store.engine.connect() as conn:  # the transaction was rolled back whole
        assert conn.execute(select(LEASES.c.id)).all() == []
