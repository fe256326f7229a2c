"""Tasks coming in: inbox file records, task insertion, and the payloads offers carry."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ClauseElement, bindparam, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import BindParameter

from hub.changes import FileInfo
from hub.db import INBOX_FILES, TASK_INPUTS, TASKS, StoreBase, chunks, insert_blobs
from hub.models import Blob, Bundle, InboxFile, Project, Task, TaskInput
from hub.rawsql import select_in
from issc.errors import StoreError, TaskFileError

OfferPayload = tuple[str, str, list[FileInfo]]  # (task id, input JSON, input files)


def _payloads(keys: list[BindParameter[Any]]) -> ClauseElement:
    return select(Task.id, Task.name, Task.input_json).where(Task.id.in_(keys))


def _input_files(keys: list[BindParameter[Any]]) -> ClauseElement:
    return (
        select(TaskInput.task_id, TaskInput.name, TaskInput.sha256, Blob.size)
        .join(Blob, Blob.sha256 == TaskInput.sha256)
        .where(TaskInput.task_id.in_(keys))
        .order_by(TaskInput.task_id, TaskInput.name)
    )


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """One task from an inbox file, validated; ``line`` is where it starts (1-based)."""

    task_id: str
    input_json: str
    line: int
    file_paths: tuple[tuple[str, str], ...] = ()  # (NAME, PATH) as written in the task file
    files: tuple[FileInfo, ...] = ()  # the same files once they are in the content store
    expect_json: str | None = None  # a spot check's known answer, never sent to nodes


def _insert_task_inputs(
    conn: Any, entries: Sequence[TaskEntry], pks: Sequence[int], now: float
) -> None:
    """Record the input files of new tasks, and each new content once in ``blobs``."""
    rows = [
        {"task_id": pk, "name": f.name, "sha256": f.sha256}
        for entry, pk in zip(entries, pks, strict=True)
        for f in entry.files
    ]
    if not rows:
        return
    insert_blobs(conn, {f.sha256: f.size for entry in entries for f in entry.files}, now)
    conn.execute(insert(TASK_INPUTS), rows)


# The inbox runs these for every task file (a file of one task is a task's latency).
_INBOX_FILE = select(InboxFile.name, InboxFile.outcome).where(InboxFile.sha256 == bindparam("sha"))
_PROJECT_ID = select(Project.id).where(Project.name == bindparam("project"))
_INSERT_TASKS = insert(TASKS).returning(TASKS.c.id, sort_by_parameter_order=True)
_INSERT_INBOX_FILE = insert(INBOX_FILES)


def _names_taken(names: list[BindParameter[Any]]) -> ClauseElement:
    return select(Task.name).where(Task.project_id == bindparam("project"), Task.name.in_(names))


def read_offer_payloads(conn: Connection, pks: Sequence[int]) -> dict[int, OfferPayload]:
    """task key -> (task id, input JSON, input files) for building offers."""
    out: dict[int, OfferPayload] = {}
    for chunk in chunks(pks):
        rows = select_in(conn, _payloads, chunk)
        out.update((pk, (name, payload, [])) for pk, name, payload in rows)
        for pk, name, sha, size in select_in(conn, _input_files, chunk):
            out[pk][2].append(FileInfo(name, sha, size))
    return out


class InboxStore(StoreBase):
    """Part of ``Store``: what the inbox reads in and what offers send out."""

    def inbox_file(self, sha256: str) -> tuple[str, str] | None:
        """(name, outcome) of an inbox file already read with this content, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(_INBOX_FILE, {"sha": sha256}).first()
            return (row[0], row[1]) if row else None

    def current_bundle(self, project: str) -> tuple[str, bytes] | None:
        """(pinned owner key, bytes of the current bundle) of a registered project."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Project.owner_key, Bundle.content)
                .join(Bundle, Bundle.digest == Project.digest)
                .where(Project.name == project)
            ).first()
            return (row[0], row[1]) if row else None

    def record_inbox_file(self, sha256: str, name: str, outcome: str, detail: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(INBOX_FILES).values(
                    sha256=sha256, name=name, outcome=outcome, detail=detail, at=time.time()
                )
            )

    def add_tasks(
        self, project: str, entries: Sequence[TaskEntry], sha256: str, name: str, now: float
    ) -> tuple[int, list[int]]:
        """Insert a task file's tasks and record the file, atomically.

        Returns (project id, task keys). Raises TaskFileError for an unknown project or
        a task id the project already has (naming the id and its line).
        """
        try:
            with self.engine.begin() as conn:
                project_id = conn.execute(_PROJECT_ID, {"project": project}).scalar()
                if project_id is None:
                    raise TaskFileError(
                        f"unknown project {project!r}: drop its signed bundle (.issc) first"
                    )
                self._reject_existing_ids(conn, project_id, entries)
                pks: list[int] = []
                for chunk in chunks(entries, 5000):
                    result = conn.execute(
                        _INSERT_TASKS,
                        [
                            {
                                "project_id": project_id,
                                "name": e.task_id,
                                "state": "NA",
                                "input_json": e.input_json,
                                "attempts": 0,
                                "created_at": now,
                                "exported": False,
                                "source": sha256,
                                "cpu_seconds": 0.0,
                                "expect_json": e.expect_json,
                            }
                            for e in chunk
                        ],
                    )
                    pks.extend(row[0] for row in result)
                _insert_task_inputs(conn, entries, pks, now)
                conn.execute(
                    _INSERT_INBOX_FILE,
                    {
                        "sha256": sha256,
                        "name": name,
                        "outcome": "accepted",
                        "detail": f"{len(entries)} tasks",
                        "at": now,
                    },
                )
                return project_id, pks
        except IntegrityError as exc:
            raise StoreError(f"cannot add tasks: {exc.orig}") from None

    def _reject_existing_ids(
        self, conn: Any, project_id: int, entries: Sequence[TaskEntry]
    ) -> None:
        for chunk in chunks(entries):
            by_id = {e.task_id: e for e in chunk}
            rows = select_in(conn, _names_taken, list(by_id), {"project": project_id})
            # Name the first one in the file, whatever order the database returns them in.
            first = min((by_id[name] for (name,) in rows), key=lambda e: e.line, default=None)
            if first is not None:
                raise TaskFileError(
                    f"duplicate task id {first.task_id!r}: the project already has it", first.line
                )

    def offer_payloads(self, pks: Sequence[int]) -> dict[int, OfferPayload]:
        """task key -> (task id, input JSON, input files) for building offers."""
        with self.engine.connect() as conn:
            return read_offer_payloads(conn, pks)
