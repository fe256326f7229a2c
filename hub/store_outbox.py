"""Results going out: finished tasks not yet in results.jsonl, and what has been written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import ClauseElement, bindparam, insert, select, update
from sqlalchemy.sql.elements import BindParameter

from hub.changes import FileInfo
from hub.db import OUTBOX_FILES, PROJECTS, RESULTS, TASKS, StoreBase, chunks
from hub.lifecycle import FINAL_STATES
from hub.models import OutboxFile, Output, Project, Task
from hub.rawsql import select_in, update_in

# The outbox runs these for every batch of finished tasks (hub/rawsql.py).
_FINAL = [str(state) for state in FINAL_STATES]


def _unexported(states: list[BindParameter[Any]]) -> ClauseElement:
    return (
        select(
            TASKS.c.id,
            PROJECTS.c.name,
            TASKS.c.name,
            TASKS.c.state,
            RESULTS.c.result_json,
            TASKS.c.error,
            TASKS.c.node_id,
            TASKS.c.volunteer,
            TASKS.c.attempts,
            TASKS.c.cpu_seconds,
            TASKS.c.finished_at,
            TASKS.c.lease_id,
        )
        .join(PROJECTS, PROJECTS.c.id == TASKS.c.project_id)
        .outerjoin(RESULTS, RESULTS.c.lease_id == TASKS.c.lease_id)
        .where(TASKS.c.exported.is_(False), TASKS.c.state.in_(states))
        .order_by(TASKS.c.finished_at, TASKS.c.id)
        .limit(bindparam("limit"))
    )


_OUTBOX_SIZES = select(Project.name, OutboxFile.committed_size).join(
    OutboxFile, OutboxFile.project_id == Project.id
)
_PROJECT_ID = select(Project.id).where(Project.name == bindparam("project"))
_SET_SIZE = (
    update(OUTBOX_FILES)
    .where(OUTBOX_FILES.c.project_id == bindparam("b_project"))
    .values(committed_size=bindparam("b_size"))
)


def _outputs_of(leases: list[BindParameter[Any]]) -> ClauseElement:
    return (
        select(Output.lease_id, Output.name, Output.sha256, Output.size)
        .where(Output.lease_id.in_(leases))
        .order_by(Output.lease_id, Output.name)
    )


def _mark_exported(pks: list[BindParameter[Any]]) -> ClauseElement:
    return update(TASKS).where(Task.id.in_(pks)).values(exported=bindparam("exported"))


@dataclass(frozen=True, slots=True)
class FinishedTask:
    """A C or F task not yet written to the outbox."""

    pk: int
    project: str
    task_id: str
    state: str
    result_json: str | None
    error: str | None
    node_id: str | None
    volunteer: str | None
    attempts: int
    cpu_seconds: float
    finished_at: float
    lease: int | None = None
    files: tuple[FileInfo, ...] = ()  # output files of the accepted result


class OutboxStore(StoreBase):
    """Part of ``Store``: the outbox's bookkeeping."""

    def unexported(self, limit: int) -> list[FinishedTask]:
        with self.held_transaction() as conn:
            rows = select_in(conn, _unexported, _FINAL, {"limit": limit})
            tasks = [FinishedTask(*row) for row in rows]
            leases = [t.lease for t in tasks if t.state == "C" and t.lease is not None]
            files: dict[int, list[FileInfo]] = {}
            for chunk in chunks(leases):
                rows = select_in(conn, _outputs_of, chunk)
                for lease, name, sha, size in rows:
                    files.setdefault(lease, []).append(FileInfo(name, sha, size))
        return [
            replace(t, files=tuple(files.get(t.lease, ()))) if t.lease in files else t
            for t in tasks
        ]

    def outbox_sizes(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {name: size for name, size in conn.execute(_OUTBOX_SIZES)}

    def mark_exported(self, project: str, pks: Sequence[int], committed_size: int) -> None:
        """Record that results.jsonl holds these tasks and is ``committed_size`` bytes long."""
        with self.held_transaction() as conn:
            project_id = conn.execute(_PROJECT_ID, {"project": project}).scalar_one()
            for chunk in chunks(pks):
                update_in(conn, _mark_exported, chunk, {"exported": True})
            if not conn.execute(
                _SET_SIZE, {"b_project": project_id, "b_size": committed_size}
            ).rowcount:
                conn.execute(
                    insert(OUTBOX_FILES),
                    {"project_id": project_id, "committed_size": committed_size},
                )
