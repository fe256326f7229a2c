"""A commit that cannot be made degrades the hub; it does not end it (hub/runtime.py).

The batch's messages are not sent, node sessions are ended with ``internal``, nothing
new is taken; the pump probes the store and the disk with backoff and, once both take
writes, rebuilds its scheduler from the database, exactly as at start-up. A full disk
met by the outbox or an upload degrades the hub the same way, and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub import outbox as outbox_module
from hub import runtime as runtime_module
from hub.blobs import ContentStore, UploadArea
from hub.changes import Change
from hub.events import NodeJoined, ProjectCancelled, SlotsFree
from hub.inbox import Inbox
from hub.outbox import Outbox
from hub.retry import RetryPolicy
from hub.runtime import HubRuntime
from hub.scheduler import Scheduler, Settings
from hub.store import Store, TaskEntry
from hub.store_inbox import OfferPayload
from issc.errors import StoreError
from issc.keys import public_key_string
from issc.manifest import Limits, Manifest
from issc.protocol import ErrorCode, Message, Offer

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000.0
KEY = public_key_string(Ed25519PrivateKey.from_private_bytes(b"\x21" * 32).public_key())
SETTINGS = Settings(5, 60.0, 90.0)
TASKS = 4


class FlakyStore(Store):
    """A real SQLite store whose next ``fail_apply`` commits and ``fail_probe`` probes fail."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.fail_apply = 0
        self.fail_probe = 0
        self.probes = 0

    def apply(
        self, changes: Sequence[Change], offer_pks: Sequence[int] = ()
    ) -> dict[int, OfferPayload]:
        if self.fail_apply:
            self.fail_apply -= 1
            raise StoreError(f"cannot commit a batch of {len(changes)} changes: disk I/O error")
        return super().apply(changes, offer_pks)

    def probe(self, now: float) -> None:
        self.probes += 1
        if self.fail_probe:
            self.fail_probe -= 1
            raise StoreError("database error in probe: disk I/O error")
        super().probe(now)


@dataclass
class FakeSession:
    """What the runtime needs of a node session, recording what it is sent."""

    node_id: str
    volunteer: str = "alice"
    slots: int = 2
    address: str = "127.0.0.1:1"
    via: str | None = None
    sent: list[Any] = field(default_factory=list)
    ended: tuple[ErrorCode, str] | None = None
    closed: bool = False

    def send(self, message: Message) -> None:
        if not self.closed:
            self.sent.append(message)

    def send_welcome(self, resumed: tuple[int, ...]) -> None:
        if not self.closed:
            self.sent.append(("welcome", resumed))

    def end(self, code: ErrorCode, message: str) -> None:
        self.ended = (code, message)
        self.closed = True

    def close(self) -> None:
        self.closed = True


@dataclass
class World:
    runtime: HubRuntime
    store: FlakyStore
    node: str
    pks: list[int]
    pump: asyncio.Task[None]
    data: Path


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.setattr(runtime_module, "PROBE_BACKOFF", RetryPolicy(first=0.02, cap=0.05))
    monkeypatch.setattr(runtime_module, "EXPORT_COALESCE", 0.0)
    store = FlakyStore(f"sqlite:///{tmp_path / 'hub.db'}")
    store.create_schema()
    content = b"bundle"
    manifest = Manifest(
        name="primes",
        version=1,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=1,
        files=(),
        owner_key="ed25519:" + "A" * 43 + "=",
    )
    store.register_bundle(manifest, hashlib.sha256(content).hexdigest(), content, T0)
    node = store.enroll_node("alice", KEY, None, True, "127.0.0.1:1", 2, T0)
    entries = [TaskEntry(f"t-{i}", str(i), i + 1) for i in range(TASKS)]
    _, pks = store.add_tasks("primes", entries, "f" * 64, "tasks.jsonl", T0)
    data = tmp_path / "hub"
    data.mkdir()
    files = ContentStore(data / "files")
    runtime = HubRuntime(
        SimpleNamespace(data_dir=data, heartbeat_interval=30.0, heartbeat_misses=3),  # type: ignore[arg-type]
        store,
        Scheduler(SETTINGS, store.load_snapshot(), now=T0),
        Inbox(data / "inbox", store, files),
        Outbox(data / "outbox", store, files),
        files,
        clock=lambda: T0,
    )
    pump = asyncio.create_task(runtime.pump())
    try:
        yield World(runtime, store, node, pks, pump, data)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        runtime.astore.shutdown()


async def eventually(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def join(world: World) -> FakeSession:
    session = FakeSession(world.node)
    world.runtime.sessions[world.node] = session  # type: ignore[assignment]
    world.runtime.submit(NodeJoined(world.node, "alice", ("primes",), (), T0))
    return session


def offers(session: FakeSession) -> list[int]:
    return [t.lease for m in session.sent if isinstance(m, Offer) for t in m.tasks]


def scheduler_state(scheduler: Scheduler) -> dict[str, Any]:
    """What must equal between a scheduler and one freshly made from the database."""
    return {
        "queues": {pid: list(q) for pid, q in scheduler.queues.items()},
        "tasks": {pk: repr(t) for pk, t in scheduler.tasks.items()},
        "leases": {lid: repr(lease) for lid, lease in scheduler.leases.items()},
        "past_leases": {lid: repr(lease) for lid, lease in scheduler.past_leases.items()},
        "offered": dict(scheduler.offered),
        "projects": dict(scheduler.projects),
        "next_lease_id": scheduler.next_lease_id,
        "node_leases": {n: sorted(rec.leases) for n, rec in scheduler.nodes.items()},
    }


async def test_a_failed_commit_degrades_sends_nothing_of_the_batch_and_recovers(
    world: World,
) -> None:
    runtime, store = world.runtime, world.store
    session = join(world)
    await eventually(lambda: session.sent)  # the welcome: that batch committed
    store.fail_apply = 1
    store.fail_probe = 3
    runtime.submit(SlotsFree(world.node, 2, T0))  # offers two tasks: changes and messages
    await eventually(lambda: runtime.degraded is not None)
    assert "database" in runtime.degraded and "disk I/O error" in runtime.degraded
    assert offers(session) == [], "a message of the uncommitted batch was sent"
    assert session.ended is not None and session.ended[0] == ErrorCode.INTERNAL
    assert runtime.sessions == {}
    assert not world.pump.done(), "the pump ended: the hub would have stopped"
    # While degraded: no admin change, no node admitted.
    with pytest.raises(StoreError, match="degraded"):
        await runtime.submit_and_wait(ProjectCancelled("primes", "cancelled by admin", T0))
    hello = SimpleNamespace(volunteer="alice", public_key=KEY, token=None, slots=2, projects=[])
    with pytest.raises(StoreError, match="degraded"):
        await runtime.enroll(hello, "127.0.0.1:2")  # type: ignore[arg-type]
    await eventually(lambda: runtime.degraded is None)
    assert store.probes == 4  # three failed, the fourth worked
    assert store.state_counts()["TA"] == 0  # the failed batch left nothing behind
    fresh = Scheduler(SETTINGS, store.load_snapshot(), now=T0)
    assert scheduler_state(runtime.scheduler) == scheduler_state(fresh)
    # Back in business: a node that comes back is offered work, committed first.
    again = join(world)
    runtime.submit(SlotsFree(world.node, 2, T0))
    await eventually(lambda: len(offers(again)) == 2)
    assert store.state_counts()["TA"] == 2
    assert runtime.outages == 1


async def test_the_waiters_of_a_failed_batch_are_told_it_was_not_committed(
    world: World,
) -> None:
    world.store.fail_apply = 1
    with pytest.raises(StoreError, match="not committed"):
        await world.runtime.submit_and_wait(ProjectCancelled("primes", "by admin", T0))
    assert world.store.state_counts()["X"] == 0
    await eventually(lambda: world.runtime.degraded is None)
    await world.runtime.submit_and_wait(ProjectCancelled("primes", "by admin", T0))
    assert world.store.state_counts()["X"] == TASKS


async def test_a_full_disk_in_the_outbox_degrades_and_loses_or_repeats_no_line(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = world.runtime
    real_append = Outbox._append
    failures = [2]

    def append(self: Outbox, project: str, tasks: list[Any], committed: int) -> int:
        if failures[0]:
            failures[0] -= 1
            path = self.outbox_dir / project / "results.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write('{"id": "t-0", "state": "X", "res')  # half a line, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, project, tasks, committed)

    monkeypatch.setattr(Outbox, "_append", append)
    monkeypatch.setattr(outbox_module.Outbox, "_append", append)
    exporting = asyncio.create_task(runtime.export_loop())
    try:
        await runtime.submit_and_wait(ProjectCancelled("primes", "by admin", T0))
        await eventually(lambda: runtime.degraded is not None)
        assert runtime.degraded.startswith("disk full: outbox")
        await eventually(lambda: runtime.degraded is None and failures[0] == 0)
        path = world.data / "outbox" / "primes" / "results.jsonl"
        await eventually(lambda: path.exists() and path.read_text().count("\n") == TASKS)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert sorted(line["id"] for line in lines) == [f"t-{i}" for i in range(TASKS)]
        assert {line["state"] for line in lines} == {"X"}
    finally:
        exporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await exporting


async def test_recovery_waits_for_room_on_the_disk(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = world.runtime
    full = [True]
    real_probe = HubRuntime._probe_disk

    def probe_disk(self: HubRuntime) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_probe(self)

    monkeypatch.setattr(HubRuntime, "_probe_disk", probe_disk)
    runtime.degrade("disk full: test")
    await asyncio.sleep(0.5)
    assert runtime.degraded == "disk full: test"  # the store works, the disk does not
    assert world.store.probes >= 3
    full[0] = False
    await eventually(lambda: runtime.degraded is None)
    assert not (world.data / ".issc-space-probe").exists()


async def test_an_upload_that_meets_a_full_disk_ends_the_session_and_degrades(
    world: World,
) -> None:
    runtime = world.runtime
    session = join(world)
    await eventually(lambda: session.sent)
    runtime.upload_failed(session, OSError(errno.ENOSPC, "No space left on device"))  # type: ignore[arg-type]
    assert session.ended == (ErrorCode.INTERNAL, "the hub is out of disk space")
    assert runtime.degraded is not None and runtime.degraded.startswith("disk full: uploads")
    await eventually(lambda: runtime.degraded is None)


# ---- uploads: never acknowledge bytes not durably written ---------------------------------


def test_a_chunk_that_cannot_be_written_is_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    area = UploadArea(tmp_path / "uploads", ContentStore(tmp_path / "files"))
    data = os.urandom(3000)
    sha = hashlib.sha256(data).hexdigest()
    assert area.write(7, "out.bin", sha, len(data), 0, data[:1000]) == 1000
    real_write = os.write

    def half_then_full(fd: int, chunk: Any) -> int:
        real_write(fd, bytes(chunk[:300]))  # part of the chunk reaches the file...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full

    monkeypatch.setattr("hub.blobs.os.write", half_then_full)
    with pytest.raises(OSError):
        area.write(7, "out.bin", sha, len(data), 1000, data[1000:2000])
    monkeypatch.setattr("hub.blobs.os.write", real_write)
    assert area.received(7, "out.bin", sha, len(data)) == 1000  # the 300 bytes are gone
    assert area.write(7, "out.bin", sha, len(data), 1000, data[1000:]) == len(data)
    assert area.store.size(sha) == len(data)


def test_a_whole_part_that_could_not_move_into_the_store_is_finished_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ContentStore(tmp_path / "files")
    area = UploadArea(tmp_path / "uploads", store)
    data = os.urandom(2000)
    sha = hashlib.sha256(data).hexdigest()
    real_install = ContentStore._install

    def no_room(self: ContentStore, tmp: Path, sha256: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ContentStore, "_install", no_room)
    with pytest.raises(OSError):
        area.write(8, "out.bin", sha, len(data), 0, data)
    monkeypatch.setattr(ContentStore, "_install", real_install)
    # One byte short, so the node sends its last byte again and the move is finished.
    held = area.received(8, "out.bin", sha, len(data))
    assert held == len(data) - 1
    assert area.write(8, "out.bin", sha, len(data), held, data[held:]) == len(data)
    assert store.size(sha) == len(data)


def test_input_files_meet_a_full_disk_as_the_hubs_trouble_not_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ContentStore.add_file: a read error is the file's (FileStoreError, the task file is
    rejected), a write error the hub's (OSError: the task file waits)."""
    from hub.blobs import FileStoreError

    store = ContentStore(tmp_path / "files")
    source = tmp_path / "in.txt"
    source.write_bytes(b"x" * 100)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hub.blobs.os.fsync", full)
    with pytest.raises(OSError) as caught:
        store.add_file(source)
    assert not isinstance(caught.value, FileStoreError)
    monkeypatch.setattr("hub.blobs.os.fsync", real_fsync)
    with pytest.raises(FileStoreError, match="cannot read"):
        store.add_file(tmp_path / "missing.txt")
    assert store.add_file(source)[1] == 100
