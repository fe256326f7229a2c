"""Corrupt, half-written and odd inbox files: each is rejected with its cause in
``NAME.error.txt``, or waited for; the hub's own trouble (a full disk, a database error)
rejects nothing. The inbox never raises for a file."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from hub.blobs import ContentStore
from hub.inbox import Inbox
from hub.store import Store
from issc.bundle import pack_bundle
from issc.keys import generate_key

GOOD_JSONL = b"".join(
    b'{"project": "primes", "id": "t-%d", "input": {"lo": %d, "hi": %d}}\n' % (i, i, i + 1)
    for i in range(5)
)
GOOD_YAML = b"project: primes\ntasks:\n" + b"".join(
    b"  - id: y-%d\n    input: {lo: %d, hi: %d}\n" % (i, i, i + 1) for i in range(5)
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    base = tmp_path_factory.mktemp("bundle")
    src = base / "primes"
    src.mkdir()
    (src / "project.yaml").write_text(
        "name: primes\nversion: 1\nentrypoint: [python3, main.py]\nmode: process\n"
        "limits: {wall_seconds: 60, memory_mb: 256, output_mb: 1}\nquorum: 1\n"
    )
    (src / "main.py").write_text("print(1)\n" + "# padding\n" * 2000)
    generate_key(base / "owner.key")
    pack_bundle(src, base / "owner.key", base / "primes.issc")
    return (base / "primes.issc").read_bytes()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'hub.db'}")
    s.create_schema()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def inbox(tmp_path: Path, store: Store, bundle: bytes) -> Inbox:
    box = Inbox(tmp_path / "inbox", store, ContentStore(tmp_path / "files"))
    drop(box, "primes.issc", bundle)
    scan_until_read(box, "primes.issc")
    assert (box.accepted / "primes.issc").exists()
    return box


def drop(inbox: Inbox, name: str, data: bytes) -> None:
    """Written in place under its final name, as a careless owner would."""
    (inbox.inbox / name).write_bytes(data)


def scan_until_read(inbox: Inbox, name: str, scans: int = 3) -> None:
    for _ in range(scans):
        inbox.scan()
        if not (inbox.inbox / name).exists():
            return
    raise AssertionError(f"{name} still waits after {scans} scans")


def rejection(inbox: Inbox, name: str) -> str:
    assert (inbox.rejected / name).exists(), f"{name} was not rejected"
    return (inbox.rejected / f"{name}.error.txt").read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize(
    ("name", "data", "cause"),
    [
        # cut in the middle of the third line
        ("cut.jsonl", GOOD_JSONL[: GOOD_JSONL.index(b"t-2") + 10], "line 3: not valid JSON"),
        # cut in the middle of a flow mapping
        ("cut.yaml", GOOD_YAML[: GOOD_YAML.index(b"y-3") + 20], "not valid YAML"),
        ("latin1.jsonl", GOOD_JSONL.replace(b"t-1", "t-é".encode("latin-1")), "not UTF-8 text"),
        ("latin1.yaml", GOOD_YAML.replace(b"y-1", "y-é".encode("latin-1")), "not UTF-8 text"),
        ("empty.jsonl", b"", "the file is empty (0 bytes)"),
        ("empty.yaml", b"", "the file is empty (0 bytes)"),
        ("empty.issc", b"", "the file is empty (0 bytes)"),
        ("garbage.issc", b"\x00" + os.urandom(4095), "not a valid bundle archive"),
        ("blank.jsonl", b"\n\n  \n", "the file holds no tasks"),
    ],
)
def test_a_broken_task_file_or_bundle_is_rejected_naming_the_cause(
    inbox: Inbox, store: Store, name: str, data: bytes, cause: str
) -> None:
    drop(inbox, name, data)
    scan_until_read(inbox, name)
    note = rejection(inbox, name)
    assert note.startswith(f"{name}: ") and cause in note, note
    assert store.state_counts()["NA"] == 0  # all or nothing


def test_a_truncated_bundle_is_rejected(inbox: Inbox, bundle: bytes) -> None:
    for cut in (len(bundle) // 2, len(bundle) - 5, 100):
        name = f"cut-{cut}.issc"
        drop(inbox, name, bundle[:cut])
        scan_until_read(inbox, name)
        note = rejection(inbox, name)
        assert "not a valid bundle archive" in note and "ended before" in note, note


def test_a_file_name_that_is_not_utf8_is_rejected_not_raised(inbox: Inbox) -> None:
    name = os.fsdecode(b"tasks-\xff.jsonl")
    (inbox.inbox / name).write_bytes(GOOD_JSONL)
    scan_until_read(inbox, name)
    assert "the file name is not valid UTF-8" in rejection(inbox, name)


def test_a_file_still_being_written_is_read_once_its_size_holds_for_a_scan(
    inbox: Inbox, store: Store
) -> None:
    path = inbox.inbox / "slow.jsonl"
    half = GOOD_JSONL[: GOOD_JSONL.index(b"t-3") - 5]  # cut mid-line: invalid as it is
    with open(path, "wb") as f:
        f.write(half)
        f.flush()
        assert inbox.scan() == []  # first sight: waited for
        f.write(b"x")  # ...the writer goes on: the size changed, still waited for
        f.flush()
        assert inbox.scan() == []
        assert path.exists()
        f.seek(len(half))
        f.write(GOOD_JSONL[len(half) :])
        f.flush()
        assert inbox.scan() == []
    [item] = inbox.scan()  # unchanged since the last scan: read, whole
    assert len(item.task_pks) == 5
    assert (inbox.accepted / "slow.jsonl").exists()
    assert store.state_counts()["NA"] == 5


def test_a_zero_byte_file_is_waited_for_then_rejected(inbox: Inbox) -> None:
    """A writer that created the file and has not written yet gets one scan interval."""
    path = inbox.inbox / "later.yaml"
    path.write_bytes(b"")
    inbox.scan()
    assert path.exists()
    path.write_bytes(GOOD_YAML)
    inbox.scan()
    assert path.exists()  # it changed: one more scan
    inbox.scan()
    assert (inbox.accepted / "later.yaml").exists()
    (inbox.inbox / "never.yaml").write_bytes(b"")
    scan_until_read(inbox, "never.yaml")
    assert "the file is empty" in rejection(inbox, "never.yaml")


def test_a_full_disk_leaves_the_file_waiting_and_says_so(
    inbox: Inbox, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"input data"
    (inbox.inbox / "data.txt").write_bytes(data)
    drop(
        inbox,
        "files.yaml",
        b"project: primes\ntasks:\n  - {id: f-1, input: 1, files: {d: data.txt}}\n",
    )

    def no_room(self: ContentStore, source: Path, max_size: int = 0) -> tuple[str, int]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ContentStore, "add_file", no_room)
    for _ in range(3):
        assert inbox.scan() == []
        assert (inbox.inbox / "files.yaml").exists(), "rejected for the hub's own trouble"
    assert isinstance(inbox.trouble, OSError) and inbox.trouble.errno == errno.ENOSPC
    assert not (inbox.rejected / "files.yaml").exists()
    monkeypatch.undo()
    [item] = inbox.scan()
    assert inbox.trouble is None
    assert len(item.task_pks) == 1
    assert store.offer_payloads(list(item.task_pks))[item.task_pks[0]][2][0].sha256 == (
        hashlib.sha256(data).hexdigest()
    )


def test_a_database_error_leaves_the_file_waiting(
    inbox: Inbox, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    drop(inbox, "later.jsonl", GOOD_JSONL)

    def broken(*args: object) -> None:
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(store, "add_tasks", broken)
    for _ in range(3):
        assert inbox.scan() == []
    assert isinstance(inbox.trouble, OperationalError)
    assert (inbox.inbox / "later.jsonl").exists()
    monkeypatch.undo()
    [item] = inbox.scan()
    assert len(item.task_pks) == 5
