"""The inbox with input files: tasks carry them, used files retire, strays are rejected."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from storekit import register

from hub import inbox as inbox_module
from hub.blobs import ContentStore
from hub.inbox import Inbox
from hub.store import Store

TASKS = """project: primes
tasks:
  - {id: a, input: 1, files: {text: texts/a.txt, stop: stop.txt}}
  - {id: b, input: 2, files: {text: texts/b.txt, stop: stop.txt}}
"""


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Inbox, Store, Path]:
    monkeypatch.setattr(inbox_module, "RETIRE_GRACE", 0.0)
    store = Store(f"sqlite:///{tmp_path}/hub.db")
    store.create_schema()
    register(store)
    root = tmp_path / "inbox"
    # One scan reads a file here; the settle rule (two scans) has tests of its own.
    inbox = Inbox(root, store, ContentStore(tmp_path / "files"), settle=False)
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("alpha beta")
    (root / "texts" / "b.txt").write_text("gamma")
    (root / "stop.txt").write_text("the")
    return inbox, store, root


def test_tasks_carry_their_files_and_used_files_move_to_accepted(
    setup: tuple[Inbox, Store, Path],
) -> None:
    inbox, store, root = setup
    (root / "jobs.yaml").write_text(TASKS)
    [item] = inbox.scan()
    payloads = store.offer_payloads(list(item.task_pks))
    stop = hashlib.sha256(b"the").hexdigest()
    files = {name: {f.name: f.sha256 for f in refs} for name, _, refs in payloads.values()}
    assert files["a"] == {"stop": stop, "text": hashlib.sha256(b"alpha beta").hexdigest()}
    assert files["b"]["stop"] == stop  # shared: one copy in the store
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "accepted/jobs.yaml",
        "accepted/stop.txt",
        "accepted/texts/a.txt",
        "accepted/texts/b.txt",
    ]
    assert not (root / "texts").exists()


def test_a_file_another_waiting_task_file_needs_stays(setup: tuple[Inbox, Store, Path]) -> None:
    inbox, _, root = setup
    (root / "jobs.yaml").write_text(TASKS)
    os.utime(root / "jobs.yaml", (time.time() - 10, time.time() - 10))  # read first
    # A second task file, which will not be valid this scan (unknown project), mentions stop.txt.
    (root / "later.yaml").write_text(
        "project: nosuch\ntasks:\n  - {id: c, input: 3, files: {stop: stop.txt}}\n"
    )
    inbox.ingest(root / "jobs.yaml")
    inbox._retire_inputs()
    assert (root / "stop.txt").exists()  # later.yaml still waits and refers to it
    assert (root / "accepted" / "texts" / "a.txt").exists()


def test_a_missing_input_rejects_the_task_file_naming_it(setup: tuple[Inbox, Store, Path]) -> None:
    inbox, store, root = setup
    (root / "texts" / "b.txt").unlink()
    (root / "jobs.yaml").write_text(TASKS)
    assert inbox.scan() == []
    note = (root / "rejected" / "jobs.yaml.error.txt").read_text()
    assert "line 4" in note and "input file text (texts/b.txt)" in note
    assert "does not exist" in note
    assert store.state_counts()["NA"] == 0  # all or nothing


def test_an_unused_file_is_rejected_after_the_grace_period(
    setup: tuple[Inbox, Store, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, _, root = setup
    assert inbox.scan() == []
    assert (root / "stop.txt").exists()  # young: it may be waiting for its task file
    monkeypatch.setattr(inbox_module, "STRAY_GRACE", 0.0)
    inbox.scan()
    assert not (root / "stop.txt").exists()
    note = (root / "rejected" / "stop.txt.error.txt").read_text()
    assert "no task file used it" in note
    assert (root / "rejected" / "texts" / "a.txt").exists()


def test_a_recently_submitted_input_stays_for_the_grace_period(
    setup: tuple[Inbox, Store, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, _, root = setup
    monkeypatch.setattr(inbox_module, "RETIRE_GRACE", 60.0)
    (root / "jobs.yaml").write_text(TASKS)
    inbox.scan()
    assert (root / "stop.txt").exists()  # a submit may have just counted on it
    old = time.time() - 120
    for path in (root / "stop.txt", root / "texts" / "a.txt", root / "texts" / "b.txt"):
        os.utime(path, (old, old))
    inbox.scan()
    assert not (root / "stop.txt").exists()
    assert (root / "accepted" / "stop.txt").exists()
