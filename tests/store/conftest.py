"""One contract suite for the store, run over every backend (as dramatiq's conftest does).

``store_url`` is parametrized over ``sqlite`` (a WAL file in tmp_path, the default
URL form) and ``postgresql`` (a fresh schema per test on the session's server; see
pgcluster.py). Where no PostgreSQL can be had the postgresql cases are skipped with
the reason, unless ``ISSC_TEST_PG_REQUIRED=1`` (set it in CI), which makes them fail.
``-k sqlite`` or ``-k postgresql`` picks one backend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest
from pgcluster import ENV_URL, ServerUnavailable, TempCluster, find_bindir, fresh_database_name
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError

from hub.store import Store

BACKENDS = ("sqlite", "postgresql")
REQUIRED_ENV = "ISSC_TEST_PG_REQUIRED"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """An admin URL of a PostgreSQL server for this session, or a skip saying why not."""
    external = os.environ.get(ENV_URL)
    if external:
        yield external
        return
    bindir = find_bindir()
    if bindir is None:
        _unavailable(
            "PostgreSQL server binaries not found (initdb/pg_ctl on PATH or in "
            f"/usr/lib/postgresql/*/bin); apt-get install postgresql, or set {ENV_URL}"
        )
    try:
        cluster = TempCluster.start(bindir)
    except (ServerUnavailable, OSError) as exc:
        _unavailable(f"cannot start a throwaway PostgreSQL cluster: {exc}")
    try:
        yield cluster.admin_url()
    finally:
        cluster.stop()


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"{REQUIRED_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def pg_database(pg_admin_url: str) -> Iterator[str]:
    """The URL of a new, empty schema (a fresh database as far as the store can tell).

    A schema per test, not a database: CREATE DATABASE costs about 0.2 s, CREATE
    SCHEMA next to nothing, and an existing server only needs the CREATE privilege.
    """
    name = fresh_database_name()
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        url = make_url(pg_admin_url).update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
    finally:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        except SQLAlchemyError:
            pass  # a throwaway cluster goes away whole at the end of the session
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    """A database URL of an empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{os.fspath(tmp_path)}/hub.db"
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A Store with its schema, closed after the test."""
    s = Store(store_url)
    s.create_schema()
    try:
        yield s
    finally:
        s.close()
