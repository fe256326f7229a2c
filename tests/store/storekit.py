"""Small builders shared by the store tests: manifests, task entries, finished tasks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from hub.changes import TaskFinished
from hub.events import (
    ProjectInfo,
)
from hub.lifecycle import TaskState
from hub.models import Base, Lease, Task, Volunteer
from hub.store import Store, TaskEntry
from issc.keys import public_key_string
from issc.manifest import Limits, Manifest
from issc.nodeauth import node_id_for

OWNER = "ed25519:" + "A" * 43 + "="
OTHER_OWNER = "ed25519:" + "B" * 43 + "="
T0 = 1_800_000_000.0  # 2027-01-15, a fixed "now"


def node_key(seed: int) -> str:
    """A fixed node public key: the private key is 32 bytes of ``seed`` (tests only)."""
    private = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    return public_key_string(private.public_key())


# Three nodes with fixed keys; their ids follow from the keys, as on the wire.
KEY1, KEY2, KEY3 = node_key(1), node_key(2), node_key(3)
N1, N2, N3 = node_id_for(KEY1), node_id_for(KEY2), node_id_for(KEY3)
KEY_OF = {N1: KEY1, N2: KEY2, N3: KEY3}


def manifest(name: str = "primes", version: int = 1, owner: str = OWNER) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=1,
        files=(),
        owner_key=owner,
    )


def bundle_bytes(name: str, version: int, salt: str = "") -> bytes:
    """Stand-in bundle content; the store only keeps and hashes it."""
    return f"bundle {name} v{version}{salt}".encode()


def register(
    store: Store, name: str = "primes", version: int = 1, owner: str = OWNER, salt: str = ""
) -> tuple[ProjectInfo, bool]:
    content = bundle_bytes(name, version, salt)
    return store.register_bundle(
        manifest(name, version, owner), hashlib.sha256(content).hexdigest(), content, T0
    )


def entries(ids: Sequence[str], first_line: int = 1) -> list[TaskEntry]:
    return [TaskEntry(task_id, f'{{"n":{i}}}', first_line + i) for i, task_id in enumerate(ids)]


def add(store: Store, project: str, ids: Sequence[str], source: str | None = None) -> list[int]:
    """Add tasks as one inbox file would; returns their keys."""
    sha = source or hashlib.sha256(repr((project, tuple(ids))).encode()).hexdigest()
    _, pks = store.add_tasks(project, entries(ids), sha, f"{ids[0]}.jsonl", T0)
    return pks


def finished(
    pk: int,
    lease: int,
    *,
    ok: bool = True,
    result: Any = 42,
    node: str = "n-00000001",
    volunteer: str | None = "alice",
    attempts: int = 1,
    cpu: float = 1.5,
    at: float = T0 + 10,
) -> TaskFinished:
    return TaskFinished(
        task_pk=pk,
        state=TaskState.C if ok else TaskState.F,
        attempts=attempts,
        lease=lease,
        node_id=node,
        volunteer=volunteer,
        result=result if ok else None,
        error=None if ok else "boom",
        cpu_seconds=cpu,
        wall_seconds=cpu * 2,
        at=at,
    )


def task_row(store: Store, pk: int) -> dict[str, Any]:
    with store.engine.connect() as conn:
        return dict(conn.execute(select(Task).where(Task.id == pk)).one()._mapping)


def lease_rows(store: Store) -> dict[int, dict[str, Any]]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(Lease).order_by(Lease.id))
        return {row.id: dict(row._mapping) for row in rows}


def volunteer_row(store: Store, name: str) -> dict[str, Any]:
    with store.engine.connect() as conn:
        return dict(conn.execute(select(Volunteer).where(Volunteer.name == name)).one()._mapping)


def dump(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, sorted: for checking that nothing changed."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with store.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.execute(select(table)).all()
            out[table.name] = sorted((tuple(row) for row in rows), key=repr)
    return out
