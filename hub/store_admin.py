"""Read-only queries for issc-ctl and reports: counts, task lists, lease history, nodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select

from hub.db import StoreBase, iso_time
from hub.lifecycle import TaskState
from hub.models import Lease, Node, Project, Task, Volunteer
from issc.errors import StoreError


class AdminStore(StoreBase):
    """Part of ``Store``: what operators ask about."""

    def state_counts(self) -> dict[str, int]:
        counts = {str(s): 0 for s in TaskState}
        with self.engine.connect() as conn:
            for state, n in conn.execute(select(Task.state, func.count()).group_by(Task.state)):
                counts[state] = n
        return counts

    def projects_summary(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            projects = conn.execute(
                select(Project.id, Project.name, Project.version, Project.paused).order_by(
                    Project.name
                )
            ).all()
            counts: dict[int, dict[str, int]] = {
                p.id: {str(s): 0 for s in TaskState} for p in projects
            }
            rows = conn.execute(
                select(Task.project_id, Task.state, func.count()).group_by(
                    Task.project_id, Task.state
                )
            )
            for project_id, state, n in rows:
                counts[project_id][state] = n
        return [
            {"name": p.name, "version": p.version, "paused": bool(p.paused), "tasks": counts[p.id]}
            for p in projects
        ]

    def tasks_of(self, project: str, state: str | None) -> list[dict[str, Any]]:
        """Raises StoreError if the project does not exist."""
        with self.engine.connect() as conn:
            project_id = conn.execute(select(Project.id).where(Project.name == project)).scalar()
            if project_id is None:
                raise StoreError(f"no project named {project!r}")
            query = select(Task.name, Task.state, Task.node_id, Task.attempts).where(
                Task.project_id == project_id
            )
            if state is not None:
                query = query.where(Task.state == state)
            return [
                {"id": name, "state": st, "node": node, "attempts": attempts}
                for name, st, node, attempts in conn.execute(query.order_by(Task.id))
            ]

    def task_detail(self, project: str, task_id: str) -> dict[str, Any]:
        """One task with its lease history. Raises StoreError if there is no such task."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Task.state, Task.attempts, Task.node_id, Task.error)
                .join(Project, Project.id == Task.project_id)
                .where(Project.name == project, Task.name == task_id)
            ).first()
        if row is None:
            raise StoreError(f"no task {task_id!r} in project {project!r}")
        return {
            "id": task_id,
            "state": row.state,
            "node": row.node_id,
            "attempts": row.attempts,
            "error": row.error,
            "history": [
                {
                    "lease": h["id"],
                    "node": h["node_id"],
                    "offered_at": iso_time(h["offered_at"]),
                    "accepted_at": iso_time(h["accepted_at"]),
                    "ended_at": iso_time(h["ended_at"]),
                    "outcome": h["outcome"],
                    "detail": h["detail"],
                }
                for h in self.task_history(project, task_id)
            ],
        }

    def task_history(self, project: str, task_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    Lease.id,
                    Lease.node_id,
                    Lease.offered_at,
                    Lease.accepted_at,
                    Lease.ended_at,
                    Lease.outcome,
                    Lease.detail,
                )
                .join(Task, Task.id == Lease.task_id)
                .join(Project, Project.id == Task.project_id)
                .where(Project.name == project, Task.name == task_id)
                .order_by(Lease.id)
            )
            return [dict(row._mapping) for row in rows]

    def node_rows(self, node_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Node.id, Volunteer.name, Node.address, Node.slots)
                .join(Volunteer)
                .where(Node.id.in_(list(node_ids)))
            )
            return {r[0]: {"volunteer": r[1], "address": r[2], "slots": r[3]} for r in rows}
