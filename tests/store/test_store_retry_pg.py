"""PostgreSQL: a connection that the server drops in the middle of a transaction is a
transient error; the store runs the whole transaction again on a new connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, func, select, text

from hub.models import Volunteer
from hub.retry import RetryPolicy
from hub.store import AsyncStore, Store

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000.0


@pytest.fixture
def admin(pg_database: str) -> Iterator[Engine]:
    engine = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    try:
        yield engine
    finally:
        engine.dispose()


async def test_a_connection_dropped_mid_transaction_is_retried_whole(
    pg_database: str, admin: Engine
) -> None:
    store = Store(pg_database)
    store.create_schema()
    astore = AsyncStore(store, RetryPolicy(total=20.0))
    try:
        with admin.connect() as locker:
            # Hold the volunteers table, so the store's transaction waits inside it...
            locker.exec_driver_sql("BEGIN")
            locker.exec_driver_sql("LOCK TABLE volunteers IN ACCESS EXCLUSIVE MODE")
            call = asyncio.create_task(astore.call(store.issue_token, "alice", T0))
            waiting = None
            deadline = time.monotonic() + 10
            while waiting is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                with admin.connect() as look:
                    waiting = look.execute(
                        text(
                            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND pid <> pg_backend_pid()"
                        )
                    ).scalar()
            assert waiting is not None, "the store's transaction never waited for the lock"
            # ...then the server drops its connection (as a restart or a network cut would).
            with admin.connect() as killer:
                killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": waiting})
            await asyncio.sleep(0.3)
            locker.exec_driver_sql("ROLLBACK")
        token = await asyncio.wait_for(call, 20)
        assert token.startswith("issc-")
        with store.engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(Volunteer)).scalar_one()
        assert count == 1
    finally:
        astore.shutdown()
