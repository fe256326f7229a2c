"""The outbox writes each finished task to results.jsonl exactly once, whatever crashes.

A real store (SQLite in tmp_path) keeps the bookkeeping; a crash between the append
and the commit is simulated by a mark_exported that raises after the file was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hub import outbox as outbox_module
from hub.blobs import ContentStore
from hub.changes import LeaseAccepted, LeaseEnded, LeaseOffered, TaskFinished
from hub.lifecycle import TaskState
from hub.outbox import Outbox
from hub.store import Store, TaskEntry
from issc.manifest import Limits, Manifest

CONTRACT_LINE = (
    '{"id": "r-17", "state": "C", "result": 1229, "error": null, "node": "n-3f2a", '
    '"volunteer": "alice", "attempts": 1, "cpu_seconds": 0.41, '
    '"finished_at": "2026-11-28T07:00:00Z", "files": []}'
)
FINISHED_AT = datetime(2026, 11, 28, 7, 0, 0, tzinfo=UTC).timestamp()


class Crash(Exception):
    """The hub dying at an awkward moment."""


class Hub:
    """A store with projects, and a way to finish tasks as the scheduler would."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = Store(f"sqlite:///{tmp_path}/hub.db")
        self.store.create_schema()
        self.outbox_dir = tmp_path / "outbox"
        self.outbox = Outbox(self.outbox_dir, self.store, ContentStore(tmp_path / "files"))
        self.next_lease = 1
        self.pks: dict[tuple[str, str], int] = {}

    def project(self, name: str) -> None:
        content = name.encode()
        manifest = Manifest(
            name=name,
            version=1,
            entrypoint=("python3", "main.py"),
            mode="process",
            limits=Limits(),
            quorum=1,
            files=(),
            owner_key="ed25519:" + "A" * 43 + "=",
        )
        self.store.register_bundle(manifest, hashlib.sha256(content).hexdigest(), content, 0.0)

    def tasks(self, project: str, ids: Sequence[str]) -> None:
        entries = [TaskEntry(task_id, json.dumps(i), i + 1) for i, task_id in enumerate(ids)]
        source = hashlib.sha256(repr((project, list(ids))).encode()).hexdigest()
        _, pks = self.store.add_tasks(project, entries, source, "tasks.jsonl", 0.0)
        self.pks.update(((project, task_id), pk) for task_id, pk in zip(ids, pks, strict=True))

    def finish(
        self,
        project: str,
        task_id: str,
        *,
        result: object = 7,
        ok: bool = True,
        node: str = "n-3f2a",
        volunteer: str = "alice",
        cpu: float = 0.41,
        at: float = FINISHED_AT,
    ) -> None:
        pk, lease = self.pks[(project, task_id)], self.next_lease
        self.next_lease += 1
        self.store.apply(
            [
                LeaseOffered(lease, pk, node, at - 2),
                LeaseAccepted(lease, at - 1),
                LeaseEnded(lease, "completed" if ok else "code_error", None, at),
                TaskFinished(
                    task_pk=pk,
                    state=TaskState.C if ok else TaskState.F,
                    attempts=1,
                    lease=lease,
                    node_id=node,
                    volunteer=volunteer,
                    result=result if ok else None,
                    error=None if ok else "Traceback: boom",
                    cpu_seconds=cpu,
                    wall_seconds=cpu,
                    at=at,
                ),
            ]
        )

    def results(self, project: str) -> Path:
        return self.outbox_dir / project / "results.jsonl"

    def lines(self, project: str) -> list[dict[str, object]]:
        text = self.results(project).read_text(encoding="utf-8")
        assert text.endswith("\n") or not text
        return [json.loads(line) for line in text.splitlines()]

    def ids(self, project: str) -> list[object]:
        return [line["id"] for line in self.lines(project)]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path)
    h.project("primes")
    try:
        yield h
    finally:
        h.store.close()


def crash_after_append(monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
    """From now on, die right after the lines were appended and fsynced."""

    def mark_exported(project: str, pks: Sequence[int], committed_size: int) -> None:
        raise Crash(f"killed before recording {len(pks)} tasks of {project}")

    monkeypatch.setattr(store, "mark_exported", mark_exported)


def test_a_line_has_the_contract_shape(hub: Hub) -> None:
    hub.tasks("primes", ["r-17"])
    hub.finish("primes", "r-17", result=1229)
    assert hub.outbox.export() == 1
    assert hub.results("primes").read_text(encoding="utf-8") == CONTRACT_LINE + "\n"


def test_a_failed_task_has_its_error_and_no_result(hub: Hub) -> None:
    hub.tasks("primes", ["bad"])
    hub.finish("primes", "bad", ok=False, cpu=0.123456)
    hub.outbox.export()
    (line,) = hub.lines("primes")
    assert line == {
        "id": "bad",
        "state": "F",
        "result": None,
        "error": "Traceback: boom",
        "node": "n-3f2a",
        "volunteer": "alice",
        "attempts": 1,
        "cpu_seconds": 0.123,
        "finished_at": "2026-11-28T07:00:00Z",
        "files": [],
    }


def test_results_of_any_json_shape_survive(hub: Hub) -> None:
    values: list[object] = [None, "text", [1, [2.5]], {"nested": {"ü": True}}, 10**18]
    hub.tasks("primes", [f"t{i}" for i in range(len(values))])
    for i, value in enumerate(values):
        hub.finish("primes", f"t{i}", result=value, at=FINISHED_AT + i)
    hub.outbox.export()
    assert [line["result"] for line in hub.lines("primes")] == values


def test_export_writes_each_task_once(hub: Hub) -> None:
    hub.tasks("primes", ["a", "b", "c"])
    hub.finish("primes", "a", at=FINISHED_AT + 2)
    hub.finish("primes", "b", at=FINISHED_AT + 1)
    assert hub.outbox.export() == 2
    assert hub.outbox.export() == 0
    assert hub.ids("primes") == ["b", "a"]  # in the order they finished
    hub.finish("primes", "c", at=FINISHED_AT + 3)
    assert hub.outbox.export() == 1
    assert hub.outbox.export() == 0
    assert hub.ids("primes") == ["b", "a", "c"]
    size = hub.results("primes").stat().st_size
    assert hub.store.outbox_sizes() == {"primes": size}


def test_unfinished_tasks_are_not_exported(hub: Hub) -> None:
    hub.tasks("primes", ["a", "b"])
    assert hub.outbox.export() == 0
    assert not hub.results("primes").exists()


def test_each_project_has_its_own_file(hub: Hub) -> None:
    hub.project("mandel")
    hub.tasks("primes", ["p1", "p2"])
    hub.tasks("mandel", ["m1", "p1"])
    for project, task_id in [("primes", "p1"), ("mandel", "m1"), ("mandel", "p1")]:
        hub.finish(project, task_id)
    assert hub.outbox.export() == 3
    assert hub.ids("primes") == ["p1"]
    assert hub.ids("mandel") == ["m1", "p1"]


def test_many_tasks_in_several_batches(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "BATCH", 3)
    ids = [f"t{i:02d}" for i in range(10)]
    hub.tasks("primes", ids)
    for i, task_id in enumerate(ids):
        hub.finish("primes", task_id, at=FINISHED_AT + i)
    assert hub.outbox.export() == 10
    assert hub.ids("primes") == ids


def test_a_crash_between_append_and_commit_writes_nothing_twice(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hub.tasks("primes", ["a", "b", "c", "d"])
    hub.finish("primes", "a", at=FINISHED_AT)
    hub.outbox.export()
    committed = hub.results("primes").stat().st_size
    hub.finish("primes", "b", at=FINISHED_AT + 1)
    hub.finish("primes", "c", at=FINISHED_AT + 2)

    with monkeypatch.context() as patch:
        crash_after_append(patch, hub.store)
        with pytest.raises(Crash):
            hub.outbox.export()
    # The lines of b and c reached the disk; the store does not know it.
    assert hub.ids("primes") == ["a", "b", "c"]
    assert hub.store.outbox_sizes() == {"primes": committed}

    hub.finish("primes", "d", at=FINISHED_AT + 3)
    with caplog.at_level(logging.WARNING, logger="hub.outbox"):
        assert hub.outbox.export() == 3
    assert "unrecorded bytes from an interrupted export" in caplog.text
    assert hub.ids("primes") == ["a", "b", "c", "d"]
    assert hub.outbox.export() == 0
    assert hub.store.outbox_sizes() == {"primes": hub.results("primes").stat().st_size}


def test_a_crash_on_the_very_first_export(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.tasks("primes", ["a", "b"])
    hub.finish("primes", "a")
    hub.finish("primes", "b")
    with monkeypatch.context() as patch:
        crash_after_append(patch, hub.store)
        with pytest.raises(Crash):
            hub.outbox.export()
        with pytest.raises(Crash):
            hub.outbox.export()  # crashing again and again changes nothing
    assert hub.store.outbox_sizes() == {}
    assert hub.outbox.export() == 2
    assert hub.ids("primes") == ["a", "b"]


def test_a_torn_last_line_is_cut_off(hub: Hub) -> None:
    """Killed in the middle of a write: half a line past the recorded size."""
    hub.tasks("primes", ["a", "b"])
    hub.finish("primes", "a")
    hub.outbox.export()
    with hub.results("primes").open("ab") as f:
        f.write(b'{"id": "b", "sta')
    hub.finish("primes", "b")
    assert hub.outbox.export() == 1
    assert hub.ids("primes") == ["a", "b"]


def test_a_file_shorter_than_recorded(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    """The owner took the results away (truncated or moved the file): new lines go on."""
    hub.tasks("primes", ["a", "b", "c", "d"])
    hub.finish("primes", "a")
    hub.finish("primes", "b")
    hub.outbox.export()
    hub.results("primes").write_bytes(b"")
    hub.finish("primes", "c", at=FINISHED_AT + 1)
    with caplog.at_level(logging.WARNING, logger="hub.outbox"):
        assert hub.outbox.export() == 1
    assert "shorter than recorded" in caplog.text
    assert hub.ids("primes") == ["c"]
    assert hub.store.outbox_sizes() == {"primes": hub.results("primes").stat().st_size}

    hub.results("primes").unlink()  # moved away whole
    hub.finish("primes", "d", at=FINISHED_AT + 2)
    assert hub.outbox.export() == 1
    assert hub.ids("primes") == ["d"]
    assert hub.outbox.export() == 0
