"""What group commit buys: N task completions applied one task per transaction, then in
batches of 100 and 1000, on SQLite in WAL mode with synchronous=FULL (the hub's settings).

A completion is what the scheduler emits when a result is accepted: the lease ends and
the task finishes (task row, result row, volunteer credit). Every transaction is one
disk sync, so one-per-task pays a sync per task; the hub's runtime commits whatever
arrived during the previous commit as one batch.

    python bench/store_commit.py [-n 10000] [--batch 1 100 1000] [--dir DIR] [--url URL]

Each batch size gets a fresh database (in DIR, default a temporary directory: put it
on the disk you care about). With --url, a PostgreSQL (or other) database is used
instead; its tables are dropped and created for each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.changes import Change, LeaseAccepted, LeaseEnded, LeaseOffered, TaskFinished
from hub.lifecycle import TaskState
from hub.models import Base
from hub.store import Store, TaskEntry
from issc.keys import public_key_string
from issc.manifest import Limits, Manifest
from issc.nodeauth import node_id_for

# A fixed node key (32 bytes of 1 as the private key); the node id follows from it.
NODE_KEY = public_key_string(Ed25519PrivateKey.from_private_bytes(b"\x01" * 32).public_key())
NODE = node_id_for(NODE_KEY)


@contextmanager
def prepared_store(url: str, n: int) -> Iterator[tuple[Store, list[int]]]:
    """A store with one project, n tasks, each leased and accepted (not timed)."""
    store = Store(url)
    Base.metadata.drop_all(store.engine)
    store.create_schema()
    manifest = Manifest(
        name="bench",
        version=1,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=1,
        files=(),
        owner_key="ed25519:" + "A" * 43 + "=",
    )
    store.register_bundle(manifest, hashlib.sha256(b"b").hexdigest(), b"b", 0.0)
    store.enroll_node("alice", NODE_KEY, None, True, "127.0.0.1:1", 4, 0.0)
    entries = [TaskEntry(f"t{i}", json.dumps({"n": i}), i + 1) for i in range(n)]
    _, pks = store.add_tasks("bench", entries, "0" * 64, "bench.jsonl", 0.0)
    setup: list[Change] = []
    for lease, pk in enumerate(pks, start=1):
        setup += [LeaseOffered(lease, pk, NODE, 1.0), LeaseAccepted(lease, 1.0)]
    store.apply(setup)
    try:
        yield store, pks
    finally:
        store.close()


def completion(lease: int, pk: int, now: float) -> list[Change]:
    return [
        LeaseEnded(lease, "completed", None, now),
        TaskFinished(
            task_pk=pk,
            state=TaskState.C,
            attempts=1,
            lease=lease,
            node_id=NODE,
            volunteer="alice",
            result={"primes": [2, 3, 5, 7], "n": pk},
            error=None,
            cpu_seconds=0.5,
            wall_seconds=0.6,
            at=now,
        ),
    ]


def run(url: str, n: int, batch: int) -> float:
    """Tasks completed per second with ``batch`` tasks per transaction."""
    with prepared_store(url, n) as (store, pks):
        started = time.perf_counter()
        for start in range(0, n, batch):
            changes: list[Change] = []
            for lease, pk in enumerate(pks[start : start + batch], start=start + 1):
                changes += completion(lease, pk, 2.0)
            store.apply(changes)
        elapsed = time.perf_counter() - started
        assert store.state_counts()["C"] == n
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="task completions per run")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--dir", type=Path, help="where the SQLite files go")
    parser.add_argument("--url", help="a database URL instead of SQLite files")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="issc-bench-", dir=args.dir) as tmp:
        where = args.url or f"SQLite (WAL, synchronous=FULL) in {tmp}"
        print(f"{args.n} task completions; {where}")
        print(f"python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs")
        print(f"{'tasks/transaction':>18} {'tasks/s':>10} {'transactions/s':>15}")
        for batch in args.batch:
            url = args.url or f"sqlite:///{tmp}/bench-{batch}.db"
            rate = run(url, args.n, batch)
            print(f"{batch:>18} {rate:>10,.0f} {rate / batch:>15,.1f}", flush=True)


if __name__ == "__main__":
    main()
