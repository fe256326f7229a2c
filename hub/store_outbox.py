"""Results going out: finished tasks not yet in results.jsonl, and what has been written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import insert, select, update

from hub.changes import FileInfo
from hub.db import OUTBOX_FILES, PROJECTS, RESULTS, TASKS, StoreBase, chunks
from hub.lifecycle import FINAL_STATES
from hub.models import OutboxFile, Output, Project, Task


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
        task_t, proj_t, res_t = TASKS, PROJECTS, RESULTS
        query = (
            select(
                task_t.c.id,
                proj_t.c.name,
                task_t.c.name,
                task_t.c.state,
                res_t.c.result_json,
                task_t.c.error,
                task_t.c.node_id,
                task_t.c.volunteer,
                task_t.c.attempts,
                task_t.c.cpu_seconds,
                task_t.c.finished_at,
                task_t.c.lease_id,
            )
            .join(proj_t, proj_t.c.id == task_t.c.project_id)
            .outerjoin(res_t, res_t.c.lease_id == task_t.c.lease_id)
            .where(task_t.c.exported.is_(False), task_t.c.state.in_([str(s) for s in FINAL_STATES]))
            .order_by(task_t.c.finished_at, task_t.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            tasks = [FinishedTask(*row) for row in conn.execute(query)]
            leases = [t.lease for t in tasks if t.state == "C" and t.lease is not None]
            files: dict[int, list[FileInfo]] = {}
            for chunk in chunks(leases):
                rows = conn.execute(
                    select(Output.lease_id, Output.name, Output.sha256, Output.size)
                    .where(Output.lease_id.in_(list(chunk)))
                    .order_by(Output.lease_id, Output.name)
                )
                for lease, name, sha, size in rows:
                    files.setdefault(lease, []).append(FileInfo(name, sha, size))
        return [
            replace(t, files=tuple(files.get(t.lease, ()))) if t.lease in files else t
            for t in tasks
        ]

    def outbox_sizes(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Project.name, OutboxFile.committed_size).join(
                    OutboxFile, OutboxFile.project_id == Project.id
                )
            )
            return {name: size for name, size in rows}

    def mark_exported(self, project: str, pks: Sequence[int], committed_size: int) -> None:
        """Record that results.jsonl holds these tasks and is ``committed_size`` bytes long."""
        with self.engine.begin() as conn:
            project_id = conn.execute(
                select(Project.id).where(Project.name == project)
            ).scalar_one()
            for chunk in chunks(pks):
                conn.execute(update(TASKS).where(Task.id.in_(list(chunk))).values(exported=True))
            changed = conn.execute(
                update(OUTBOX_FILES)
                .where(OutboxFile.project_id == project_id)
                .values(committed_size=committed_size)
            ).rowcount
            if not changed:
                conn.execute(
                    insert(OUTBOX_FILES).values(
                        project_id=project_id, committed_size=committed_size
                    )
                )
