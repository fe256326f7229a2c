"""The store's contract, the same on every backend: schema, projects, tasks, nodes,
outbox bookkeeping and the admin queries. (Scheduler changes and restore are in
test_store_apply.py, the scheduler on top of the store in test_store_restart.py.)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, select, text, update
from storekit import (
    KEY1,
    KEY2,
    KEY3,
    N1,
    N2,
    OTHER_OWNER,
    OWNER,
    T0,
    add,
    bundle_bytes,
    dump,
    entries,
    finished,
    register,
    task_row,
    volunteer_row,
)

from hub.changes import LeaseAccepted, LeaseEnded, LeaseOffered, TaskUpdated
from hub.lifecycle import TaskState
from hub.models import EnrollmentToken, Node, OutboxFile, Volunteer
from hub.store import AsyncStore, Store, make_engine
from hub.store_enroll import hash_token
from issc.errors import AuthError, StoreError, TaskFileError
from issc.nodeauth import node_id_for

# ---- schema ---------------------------------------------------------------------------


def test_create_schema_is_idempotent_and_keeps_data(store: Store, store_url: str) -> None:
    register(store)
    add(store, "primes", ["a", "b"])
    store.create_schema()
    again = Store(store_url)
    try:
        again.create_schema()
        assert again.state_counts()["NA"] == 2
        assert [p.name for p in again.load_snapshot().projects] == ["primes"]
    finally:
        again.close()


def test_an_empty_store_has_an_empty_snapshot(store: Store) -> None:
    snap = store.load_snapshot()
    assert (snap.projects, snap.waiting, snap.tasks, snap.leases) == ([], {}, [], [])
    assert snap.next_lease_id == 1
    assert store.state_counts() == {"NA": 0, "TA": 0, "A": 0, "C": 0, "F": 0, "X": 0}


def test_foreign_keys_are_enforced(store: Store) -> None:
    with pytest.raises(StoreError, match="cannot commit a batch of 1 changes"):
        store.apply([LeaseOffered(1, 12345, "n-00000001", T0)])
    assert store.load_snapshot().next_lease_id == 1


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path}/hub.db")
    try:
        s.create_schema()
        with s.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        # WAL is a property of the file: any other reader (a backup, sqlite3) sees it too.
        with closing(sqlite3.connect(tmp_path / "hub.db")) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        s.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
async def test_an_in_memory_database_is_one_database_for_every_thread(url: str) -> None:
    """The hub's store thread must see the schema the main thread created."""
    s = Store(url)
    s.create_schema()
    register(s)
    astore = AsyncStore(s)
    try:
        assert [p.name for p in (await astore.call(s.load_snapshot)).projects] == ["primes"]
    finally:
        astore.shutdown()


def test_a_bad_url_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open database"):
        make_engine("nosuchdialect://nowhere/db")
    s = Store(f"sqlite:///{tmp_path}/no/such/dir/hub.db")
    with pytest.raises(StoreError, match="cannot create the schema"):
        s.create_schema()
    s.close()


async def test_async_store_runs_calls_off_the_event_loop(store: Store) -> None:
    astore = AsyncStore(store)
    try:
        info, changed = await astore.call(register, store)
        assert changed and info.name == "primes"
        assert (await astore.call(store.state_counts))["NA"] == 0
        assert await astore.call(threading.get_ident) != threading.get_ident()
        with pytest.raises(ZeroDivisionError):  # not a database error: raised as it is
            await astore.call(divmod, 1, 0)
        assert (await astore.call(store.state_counts))["NA"] == 0  # the thread goes on
    finally:
        astore._thread.shutdown()  # the fixture closes the store


# ---- projects and bundles ---------------------------------------------------------------


def test_register_a_new_project(store: Store) -> None:
    info, changed = register(store, "primes", 1)
    content = bundle_bytes("primes", 1)
    assert changed
    assert (info.name, info.version, info.size, info.paused, info.quorum) == (
        "primes",
        1,
        len(content),
        False,
        1,
    )
    assert info.digest == hashlib.sha256(content).hexdigest()
    assert store.bundle_content(info.digest) == content
    assert store.load_snapshot().projects == [info]


def test_register_a_newer_version_keeps_the_old_bundle(store: Store) -> None:
    v1, _ = register(store, "primes", 1)
    v2, changed = register(store, "primes", 3)
    assert changed
    assert (v2.id, v2.version) == (v1.id, 3)
    assert v2.digest != v1.digest
    assert v1.digest is not None
    assert store.bundle_content(v1.digest) == bundle_bytes("primes", 1)
    assert store.load_snapshot().projects == [v2]
    assert store.projects_summary()[0]["version"] == 3


def test_register_the_same_bundle_again_changes_nothing(store: Store) -> None:
    first, _ = register(store, "primes", 2)
    before = dump(store)
    again, changed = register(store, "primes", 2)
    assert not changed
    assert again == first
    assert dump(store) == before


@pytest.mark.parametrize("version", [1, 2])
def test_register_an_older_or_equal_version_is_refused(store: Store, version: int) -> None:
    register(store, "primes", 2)
    before = dump(store)
    with pytest.raises(StoreError, match=f"version {version} is not newer than .* 2"):
        register(store, "primes", version, salt="other content")
    assert dump(store) == before


def test_register_with_another_owner_key_is_refused(store: Store) -> None:
    register(store, "primes", 1, owner=OWNER)
    before = dump(store)
    with pytest.raises(StoreError, match="another owner key"):
        register(store, "primes", 2, owner=OTHER_OWNER)
    assert dump(store) == before


def test_projects_are_independent(store: Store) -> None:
    register(store, "primes", 5)
    other, changed = register(store, "mandel", 1, owner=OTHER_OWNER)
    assert changed and other.version == 1
    assert [p["name"] for p in store.projects_summary()] == ["mandel", "primes"]


# ---- tasks ----------------------------------------------------------------------------


def test_add_tasks_returns_keys_in_file_order(store: Store) -> None:
    info, _ = register(store)
    ids = ["t3", "t1", "t2", "a", "z"]
    project_id, pks = store.add_tasks("primes", entries(ids), "f" * 64, "batch.jsonl", T0)
    assert project_id == info.id
    assert len(pks) == len(set(pks)) == 5
    payloads = store.offer_payloads(pks)
    assert [payloads[pk] for pk in pks] == [(tid, f'{{"n":{i}}}', []) for i, tid in enumerate(ids)]
    assert store.inbox_file("f" * 64) == ("batch.jsonl", "accepted")
    assert store.load_snapshot().waiting == {info.id: pks}
    row = task_row(store, pks[0])
    assert (row["state"], row["attempts"], row["exported"], row["source"]) == (
        "NA",
        0,
        False,
        "f" * 64,
    )


def test_add_many_tasks_keeps_the_order_across_chunks(store: Store) -> None:
    register(store)
    ids = [f"t{i:05d}" for i in range(5_600)]
    pks = add(store, "primes", ids)
    payloads = store.offer_payloads(pks)
    assert [payloads[pk][0] for pk in pks] == ids
    assert store.state_counts()["NA"] == 5_600


def test_add_tasks_to_an_unknown_project(store: Store) -> None:
    with pytest.raises(TaskFileError, match="unknown project 'nope'"):
        store.add_tasks("nope", entries(["a"]), "e" * 64, "a.jsonl", T0)
    assert store.inbox_file("e" * 64) is None


def test_add_tasks_with_an_id_the_project_has_is_refused_whole(store: Store) -> None:
    register(store)
    add(store, "primes", ["a", "b", "c"])
    before = dump(store)
    batch = entries(["x", "y", "c", "b", "z"], first_line=10)
    with pytest.raises(TaskFileError) as caught:
        store.add_tasks("primes", batch, "d" * 64, "more.jsonl", T0)
    # The first one in the file is named, with its line, whatever the database returns.
    assert caught.value.line == 12
    assert "'c'" in str(caught.value) and str(caught.value).startswith("line 12:")
    assert dump(store) == before
    assert store.inbox_file("d" * 64) is None


def test_a_duplicate_far_into_a_big_file_is_found(store: Store) -> None:
    register(store)
    add(store, "primes", ["late"])
    ids = [f"t{i}" for i in range(1_200)] + ["late"]
    with pytest.raises(TaskFileError, match="'late'") as caught:
        store.add_tasks("primes", entries(ids), "c" * 64, "big.jsonl", T0)
    assert caught.value.line == 1_201
    assert store.state_counts()["NA"] == 1


def test_the_same_task_id_in_two_projects_is_fine(store: Store) -> None:
    register(store, "primes")
    register(store, "mandel", owner=OTHER_OWNER)
    a = add(store, "primes", ["t1"])
    b = add(store, "mandel", ["t1"])
    assert a != b
    assert store.tasks_of("mandel", None) == [
        {"id": "t1", "state": "NA", "node": None, "attempts": 0}
    ]


def test_the_same_inbox_file_cannot_be_added_twice(store: Store) -> None:
    register(store)
    store.add_tasks("primes", entries(["a"]), "b" * 64, "a.jsonl", T0)
    with pytest.raises(StoreError, match="cannot add tasks"):
        store.add_tasks("primes", entries(["other"]), "b" * 64, "a.jsonl", T0)
    assert store.state_counts()["NA"] == 1


def test_record_inbox_file(store: Store) -> None:
    assert store.inbox_file("a" * 64) is None
    store.record_inbox_file("a" * 64, "junk.txt", "rejected", "unknown kind of file")
    assert store.inbox_file("a" * 64) == ("junk.txt", "rejected")


def test_offer_payloads_of_some_keys(store: Store) -> None:
    register(store)
    pks = add(store, "primes", [f"t{i}" for i in range(1_100)])
    wanted = [*pks[::3], 999_999]
    payloads = store.offer_payloads(wanted)
    assert set(payloads) == set(pks[::3])
    assert payloads[pks[3]] == ("t3", '{"n":3}', [])
    assert store.offer_payloads([]) == {}


# ---- volunteers and nodes -------------------------------------------------------------


def enrolled_tokens(store: Store) -> list[tuple[str, float | None, str | None]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(
                EnrollmentToken.token_hash, EnrollmentToken.used_at, EnrollmentToken.used_by
            ).order_by(EnrollmentToken.created_at, EnrollmentToken.token_hash)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def test_open_registration_enrolls_a_volunteer_and_a_node(store: Store) -> None:
    node_id = store.enroll_node("alice", KEY1, None, True, "10.0.0.5:4000", 4, T0)
    assert node_id == N1 == node_id_for(KEY1)
    assert re.fullmatch(r"n-[0-9a-f]{8}", node_id)
    vol = volunteer_row(store, "alice")
    assert (vol["credit"], vol["tasks_completed"]) == (0.0, 0)
    assert store.node_rows([node_id]) == {
        node_id: {"volunteer": "alice", "address": "10.0.0.5:4000", "slots": 4}
    }
    assert store.load_snapshot().node_volunteers == {node_id: "alice"}
    with store.engine.connect() as conn:
        assert conn.execute(select(Node.public_key)).scalar_one() == KEY1


def test_a_returning_node_is_known_by_its_key(store: Store) -> None:
    node_id = store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0)
    # Under closed registration too, and without a token: the key is enrolled already.
    again = store.enroll_node("alice", KEY1, None, False, "b:2", 8, T0 + 60)
    assert again == node_id
    assert store.node_rows([node_id])[node_id] == {
        "volunteer": "alice",
        "address": "b:2",
        "slots": 8,
    }
    with store.engine.connect() as conn:
        seen = conn.execute(select(Node.first_seen, Node.last_seen)).one()
    assert tuple(seen) == (T0, T0 + 60)


def test_a_known_key_for_another_volunteer_is_refused(store: Store) -> None:
    store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0)
    before = dump(store)
    with pytest.raises(AuthError, match=f"node {N1} is enrolled for volunteer 'alice', not"):
        store.enroll_node("mallory", KEY1, None, True, "a:1", 2, T0 + 1)
    # Nothing of the refused attempt stays, not even the volunteer it would have created.
    assert dump(store) == before
    with store.engine.connect() as conn:
        assert conn.execute(select(Volunteer.name)).scalars().all() == ["alice"]


def test_a_known_key_for_another_existing_volunteer_is_refused(store: Store) -> None:
    store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0)
    store.enroll_node("bob", KEY2, None, True, "b:1", 2, T0)
    with pytest.raises(AuthError, match="enrolled for volunteer 'alice', not 'bob'"):
        store.enroll_node("bob", KEY1, None, True, "a:1", 2, T0 + 1)
    assert store.load_snapshot().node_volunteers == {N1: "alice", N2: "bob"}


def test_an_id_taken_by_another_key_is_refused(store: Store) -> None:
    # Two keys whose ids collide cannot be found in a test; plant the row instead.
    store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0)
    with store.engine.begin() as conn:
        conn.execute(update(Node).where(Node.id == N1).values(public_key=KEY3))
    with pytest.raises(AuthError, match=f"node id {N1} already belongs to another key"):
        store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0 + 1)


def test_a_malformed_key_is_refused(store: Store) -> None:
    with pytest.raises(AuthError, match="public key is not valid"):
        store.enroll_node("alice", "ed25519:short", None, True, "a:1", 2, T0)
    assert dump(store)["nodes"] == []


def test_closed_registration_refuses_an_unknown_volunteer(store: Store) -> None:
    with pytest.raises(
        AuthError,
        match=r"volunteer 'bob' is unknown and registration is closed: .*volunteer add bob",
    ):
        store.enroll_node("bob", KEY1, None, False, "a:1", 2, T0)
    assert dump(store)["volunteers"] == []


def test_closed_registration_refuses_an_unknown_volunteer_with_any_token(store: Store) -> None:
    token = store.issue_token("alice", T0)
    with pytest.raises(AuthError, match="volunteer 'bob' is unknown"):
        store.enroll_node("bob", KEY1, token, False, "a:1", 2, T0)
    assert enrolled_tokens(store)[0][1:] == (None, None)  # alice's token is not touched


def test_closed_registration_needs_a_token_for_a_new_node(store: Store) -> None:
    store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0)  # alice exists, with a node
    before = dump(store)
    with pytest.raises(AuthError, match=r"registration is closed: a new node .* needs an"):
        store.enroll_node("alice", KEY2, None, False, "b:1", 2, T0)
    assert dump(store) == before


def test_closed_registration_enrolls_with_a_token_once(store: Store) -> None:
    token = store.issue_token("alice", T0)
    assert store.enroll_node("alice", KEY1, token, False, "a:1", 2, T0 + 5) == N1
    assert enrolled_tokens(store) == [(hash_token(token), T0 + 5, N1)]
    # The same node again: known by its key, the used token in its config is ignored.
    assert store.enroll_node("alice", KEY1, token, False, "a:1", 2, T0 + 6) == N1
    # Another machine with the same token: refused, naming the node that used it.
    before = dump(store)
    with pytest.raises(AuthError, match=f"already used by node {N1}; a token enrolls one node"):
        store.enroll_node("alice", KEY2, token, False, "b:1", 2, T0 + 7)
    assert dump(store) == before


def test_each_machine_of_a_volunteer_gets_its_own_token(store: Store) -> None:
    first, second = store.issue_token("alice", T0), store.issue_token("alice", T0 + 1)
    assert store.enroll_node("alice", KEY2, second, False, "b:1", 2, T0 + 2) == N2
    assert store.enroll_node("alice", KEY1, first, False, "a:1", 2, T0 + 3) == N1
    used = {used_by: used_at for _, used_at, used_by in enrolled_tokens(store)}
    assert used == {N1: T0 + 3, N2: T0 + 2}
    assert store.load_snapshot().node_volunteers == {N1: "alice", N2: "alice"}


def test_a_token_of_another_volunteer_is_refused(store: Store) -> None:
    store.issue_token("bob", T0)
    alices = store.issue_token("alice", T0)
    with pytest.raises(AuthError, match="not a token of volunteer 'bob'"):
        store.enroll_node("bob", KEY1, alices, False, "a:1", 2, T0)
    with pytest.raises(AuthError, match="not a token of volunteer 'bob'"):
        store.enroll_node("bob", KEY1, "issc-made-up", False, "a:1", 2, T0)
    assert [used_by for _, _, used_by in enrolled_tokens(store)] == [None, None]


def test_only_the_hash_of_a_token_is_stored(store: Store) -> None:
    token = store.issue_token("alice", T0)
    assert token.startswith("issc-") and len(token) >= 32
    stored = enrolled_tokens(store)
    assert stored == [(hashlib.sha256(token.encode()).hexdigest(), None, None)]
    flat = repr(dump(store))
    assert token not in flat and token.removeprefix("issc-") not in flat


def test_tokens_are_compared_in_constant_time_with_every_hash(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = [store.issue_token("alice", T0 + i) for i in range(3)]
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    store.enroll_node("alice", KEY1, tokens[0], False, "a:1", 2, T0)
    # Every one of alice's hashes was compared, the match first or not: no early exit.
    assert sorted(stored for stored, _ in compared) == sorted(hash_token(t) for t in tokens)
    assert {given for _, given in compared} == {hash_token(tokens[0])}


def test_open_registration_needs_no_token(store: Store) -> None:
    store.issue_token("alice", T0)
    assert store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0) == N1
    assert store.enroll_node("bob", KEY2, None, True, "b:1", 2, T0) == N2
    assert [used_by for _, _, used_by in enrolled_tokens(store)] == [None]


def test_open_registration_still_checks_and_uses_a_given_token(store: Store) -> None:
    token = store.issue_token("alice", T0)
    with pytest.raises(AuthError, match="not a token of volunteer 'alice'"):
        store.enroll_node("alice", KEY1, "issc-typo", True, "a:1", 2, T0)
    assert store.enroll_node("alice", KEY1, token, True, "a:1", 2, T0 + 1) == N1
    assert enrolled_tokens(store)[0][1:] == (T0 + 1, N1)
    with pytest.raises(AuthError, match=r"or remove token: from node\.yaml"):
        store.enroll_node("alice", KEY2, token, True, "b:1", 2, T0 + 2)
    # An unknown volunteer with a token: the token cannot be one of its own; nothing made.
    with pytest.raises(AuthError, match="not a token of volunteer 'carol'"):
        store.enroll_node("carol", KEY3, token, True, "c:1", 2, T0 + 3)
    with store.engine.connect() as conn:
        assert sorted(conn.execute(select(Volunteer.name)).scalars()) == ["alice"]


# ---- outbox bookkeeping ----------------------------------------------------------------


def _run_and_finish(
    store: Store, pk: int, lease: int, *, ok: bool = True, at: float = T0 + 10
) -> None:
    store.apply(
        [
            LeaseOffered(lease, pk, "n-00000001", at - 5),
            TaskUpdated(pk, TaskState.TA, 0, lease, "n-00000001"),
            LeaseAccepted(lease, at - 4),
            TaskUpdated(pk, TaskState.A, 1, lease, "n-00000001"),
            LeaseEnded(lease, "completed" if ok else "lost", None, at),
            finished(pk, lease, ok=ok, at=at, result={"primes": [2, 3]}),
        ]
    )


def test_unexported_lists_finished_tasks_oldest_first(store: Store) -> None:
    register(store)
    pks = add(store, "primes", ["a", "b", "c", "d"])
    _run_and_finish(store, pks[2], 1, at=T0 + 30)
    _run_and_finish(store, pks[0], 2, at=T0 + 20)
    _run_and_finish(store, pks[1], 3, ok=False, at=T0 + 40)
    rows = store.unexported(10)
    assert [(r.task_id, r.state) for r in rows] == [("a", "C"), ("c", "C"), ("b", "F")]
    a, _, b = rows
    assert (a.project, a.pk, a.result_json, a.error) == (
        "primes",
        pks[0],
        '{"primes": [2, 3]}',
        None,
    )
    assert (a.node_id, a.volunteer, a.attempts, a.cpu_seconds, a.finished_at) == (
        "n-00000001",
        "alice",
        1,
        1.5,
        T0 + 20,
    )
    assert (b.result_json, b.error) == (None, "boom")
    assert [r.task_id for r in store.unexported(2)] == ["a", "c"]


def test_mark_exported_records_tasks_and_size(store: Store) -> None:
    register(store)
    register(store, "mandel", owner=OTHER_OWNER)
    pks = add(store, "primes", ["a", "b", "c"])
    (other,) = add(store, "mandel", ["m"])
    for lease, pk in enumerate([*pks, other], start=1):
        _run_and_finish(store, pk, lease)
    assert store.outbox_sizes() == {}
    store.mark_exported("primes", pks[:2], 300)
    assert [r.task_id for r in store.unexported(10)] == ["c", "m"]
    assert store.outbox_sizes() == {"primes": 300}
    store.mark_exported("primes", pks[2:], 450)
    store.mark_exported("mandel", [other], 99)
    assert store.unexported(10) == []
    assert store.outbox_sizes() == {"primes": 450, "mandel": 99}


def test_an_outbox_file_may_grow_past_2_gib(store: Store) -> None:
    column = OutboxFile.__table__.c.committed_size
    if store.engine.dialect.name != "sqlite" and not isinstance(column.type, BigInteger):
        pytest.xfail("hub/models.py: OutboxFile.committed_size is a 32-bit Integer")
    register(store)
    (pk,) = add(store, "primes", ["a"])
    _run_and_finish(store, pk, 1)
    store.mark_exported("primes", [pk], 3 * 2**30)
    assert store.outbox_sizes() == {"primes": 3 * 2**30}


# ---- admin queries ---------------------------------------------------------------------


@pytest.fixture
def busy(store: Store) -> Store:
    """Two projects: primes a=C b=F c=A d=NA, mandel m=TA."""
    register(store)
    register(store, "mandel", owner=OTHER_OWNER)
    a, b, c, _ = add(store, "primes", ["a", "b", "c", "d"])
    (m,) = add(store, "mandel", ["m"])
    _run_and_finish(store, a, 1)
    _run_and_finish(store, b, 2, ok=False)
    store.apply(
        [
            LeaseOffered(3, c, "n-00000002", T0),
            LeaseAccepted(3, T0 + 1),
            TaskUpdated(c, TaskState.A, 1, 3, "n-00000002"),
            LeaseOffered(4, m, "n-00000002", T0 + 2),
            TaskUpdated(m, TaskState.TA, 0, 4, "n-00000002"),
        ]
    )
    return store


def test_state_counts(busy: Store) -> None:
    assert busy.state_counts() == {"NA": 1, "TA": 1, "A": 1, "C": 1, "F": 1, "X": 0}


def test_projects_summary(busy: Store) -> None:
    zero = dict.fromkeys(["NA", "TA", "A", "C", "F", "X"], 0)
    assert busy.projects_summary() == [
        {"name": "mandel", "version": 1, "paused": False, "tasks": {**zero, "TA": 1}},
        {
            "name": "primes",
            "version": 1,
            "paused": False,
            "tasks": {**zero, "NA": 1, "A": 1, "C": 1, "F": 1},
        },
    ]


def test_tasks_of(busy: Store) -> None:
    assert busy.tasks_of("primes", None) == [
        {"id": "a", "state": "C", "node": "n-00000001", "attempts": 1},
        {"id": "b", "state": "F", "node": "n-00000001", "attempts": 1},
        {"id": "c", "state": "A", "node": "n-00000002", "attempts": 1},
        {"id": "d", "state": "NA", "node": None, "attempts": 0},
    ]
    assert busy.tasks_of("primes", "A") == [
        {"id": "c", "state": "A", "node": "n-00000002", "attempts": 1}
    ]
    assert busy.tasks_of("primes", "X") == []


def test_tasks_of_an_unknown_project(busy: Store) -> None:
    with pytest.raises(StoreError, match="no project named 'nope'"):
        busy.tasks_of("nope", None)


def test_task_history(busy: Store) -> None:
    (pk,) = [p for p, (name, *_) in busy.offer_payloads(range(1, 10)).items() if name == "d"]
    busy.apply(
        [
            LeaseOffered(5, pk, "n-00000001", T0 + 100),
            LeaseEnded(5, "offer_expired", "not accepted in time", T0 + 160),
            TaskUpdated(pk, TaskState.NA, 0, None, None),
            LeaseOffered(6, pk, "n-00000002", T0 + 170),
            LeaseAccepted(6, T0 + 171),
            TaskUpdated(pk, TaskState.A, 1, 6, "n-00000002"),
        ]
    )
    assert busy.task_history("primes", "d") == [
        {
            "id": 5,
            "node_id": "n-00000001",
            "offered_at": T0 + 100,
            "accepted_at": None,
            "ended_at": T0 + 160,
            "outcome": "offer_expired",
            "detail": "not accepted in time",
        },
        {
            "id": 6,
            "node_id": "n-00000002",
            "offered_at": T0 + 170,
            "accepted_at": T0 + 171,
            "ended_at": None,
            "outcome": None,
            "detail": None,
        },
    ]
    assert busy.task_history("primes", "nope") == []
    assert busy.task_history("mandel", "d") == []


def test_store_files_live_where_the_url_says(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path}/sub.db")
    s.create_schema()
    s.close()
    assert os.path.getsize(tmp_path / "sub.db") > 0


def test_a_nodes_project_list_is_remembered_and_replaced_on_reconnect(store: Store) -> None:
    store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0, ("primes", "mandelbrot"))
    store.enroll_node("alice", KEY1, None, True, "a:1", 2, T0 + 5, ("wordfreq",))
    with store.engine.connect() as conn:
        assert conn.execute(select(Node.projects)).scalar_one() == '["wordfreq"]'
