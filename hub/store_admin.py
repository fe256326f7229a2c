"""Read-only queries for issc-ctl and reports: counts, task lists, lease history, nodes,
volunteers and everything held about one of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select

from hub.db import NODES, VOLUNTEERS, StoreBase, chunks, iso_time
from hub.lifecycle import TaskState
from hub.models import (
    EnrollmentToken,
    Lease,
    Node,
    PendingResult,
    Project,
    Result,
    Task,
    Volunteer,
)
from issc.errors import StoreError


class AdminStore(StoreBase):
    """Part of ``Store``: what operators ask about."""

    def state_counts(self) -> dict[str, int]:
        counts = {str(s): 0 for s in TaskState}
        with self.engine.connect() as conn:
            for state, n in conn.execute(select(Task.state, func.count()).group_by(Task.state)):
                counts[state] = n
        return counts

    def projects_summary(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every project (or only the one called ``name``) with task counts per state."""
        with self.engine.connect() as conn:
            query = select(Project.id, Project.name, Project.version, Project.paused)
            counting = select(Task.project_id, Task.state, func.count())
            if name is not None:
                query = query.where(Project.name == name)
                counting = counting.join(Project).where(Project.name == name)
            projects = conn.execute(query.order_by(Project.name)).all()
            counts: dict[int, dict[str, int]] = {
                p.id: {str(s): 0 for s in TaskState} for p in projects
            }
            rows = conn.execute(counting.group_by(Task.project_id, Task.state))
            for project_id, state, n in rows:
                counts[project_id][state] = n
        return [
            {"name": p.name, "version": p.version, "paused": bool(p.paused), "tasks": counts[p.id]}
            for p in projects
        ]

    def project_summary(self, name: str) -> dict[str, Any]:
        """One project as ``projects_summary`` shows it. Raises StoreError if unknown."""
        found = self.projects_summary(name)
        if not found:
            raise StoreError(f"no project named {name!r}")
        return found[0]

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
        history = self.task_history(project, task_id)
        verdicts = self.result_verdicts([h["id"] for h in history])
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
                    # Results that had to agree: "pending", or what became of it.
                    **({"verdict": verdicts[h["id"]]} if h["id"] in verdicts else {}),
                }
                for h in history
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

    def result_verdicts(self, leases: Sequence[int]) -> dict[int, str]:
        """lease -> what became of its result, for results that had to agree ("pending"
        while they wait; see hub.changes.Verdict)."""
        out: dict[int, str] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(leases):
                rows = conn.execute(
                    select(PendingResult.lease_id, PendingResult.verdict).where(
                        PendingResult.lease_id.in_(list(chunk))
                    )
                )
                out.update((lease, verdict or "pending") for lease, verdict in rows)
        return out

    def task_names(self, pks: Sequence[int]) -> dict[int, str]:
        """task key -> "project/task id", for log lines."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Task.id, Project.name, Task.name)
                .join(Project, Project.id == Task.project_id)
                .where(Task.id.in_(list(pks)))
            )
            return {pk: f"{project}/{name}" for pk, project, name in rows}

    def node_rows(self, node_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Node.id, Volunteer.name, Node.address, Node.slots)
                .join(Volunteer)
                .where(Node.id.in_(list(node_ids)))
            )
            return {r[0]: {"volunteer": r[1], "address": r[2], "slots": r[3]} for r in rows}

    # ---- volunteers -------------------------------------------------------------------

    def volunteers_summary(self) -> list[dict[str, Any]]:
        """Every volunteer with its credit, completed tasks and enrolled nodes, by name."""
        nodes = (
            select(Node.volunteer_id, func.count().label("n"))
            .group_by(Node.volunteer_id)
            .subquery()
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    Volunteer.name,
                    Volunteer.credit,
                    Volunteer.tasks_completed,
                    Volunteer.created_at,
                    func.coalesce(nodes.c.n, 0),
                )
                .outerjoin(nodes, nodes.c.volunteer_id == Volunteer.id)
                .order_by(Volunteer.name)
            ).all()
        return [
            {
                "volunteer": name,
                "credit": round(credit, 3),
                "tasks_completed": completed,
                "nodes": n,
                "created_at": iso_time(created),
            }
            for name, credit, completed, created, n in rows
        ]

    def volunteers_trust(self) -> dict[str, dict[str, Any]]:
        """Per volunteer: ``trusted`` and how many of its compared results agreed or not."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Volunteer.name, Volunteer.trusted, Volunteer.agreed, Volunteer.disagreed)
            )
            return {
                name: {"trusted": bool(trusted), "agreed": agreed, "disagreed": disagreed}
                for name, trusted, agreed, disagreed in rows
            }

    def volunteer_export(self, name: str) -> dict[str, Any]:
        """Everything the hub holds about one volunteer, as one JSON-ready document.

        Secrets stay out: no token hashes, no column of a node that names a hash or a
        secret. Raises StoreError if there is no such volunteer.
        """
        with self.engine.connect() as conn:
            row = conn.execute(select(VOLUNTEERS).where(Volunteer.name == name)).first()
            if row is None:
                raise StoreError(f"no volunteer named {name!r}")
            tokens = conn.execute(
                select(EnrollmentToken.created_at, EnrollmentToken.used_at, EnrollmentToken.used_by)
                .where(EnrollmentToken.volunteer_id == row.id)
                .order_by(EnrollmentToken.created_at)
            ).all()
            nodes = conn.execute(
                select(NODES).where(Node.volunteer_id == row.id).order_by(Node.first_seen)
            ).all()
            node_ids = [n.id for n in nodes]
            tasks = conn.execute(
                select(
                    Project.name,
                    Task.name,
                    Task.state,
                    Task.attempts,
                    Task.node_id,
                    Task.cpu_seconds,
                    Task.finished_at,
                    Task.error,
                )
                .join(Project, Project.id == Task.project_id)
                .where(Task.volunteer == name)
                .order_by(Task.finished_at, Task.id)
            ).all()
            leases = conn.execute(
                select(
                    Lease.id,
                    Project.name,
                    Task.name,
                    Lease.node_id,
                    Lease.offered_at,
                    Lease.accepted_at,
                    Lease.ended_at,
                    Lease.outcome,
                    Lease.detail,
                    Result.cpu_seconds,
                    Result.wall_seconds,
                )
                .join(Task, Task.id == Lease.task_id)
                .join(Project, Project.id == Task.project_id)
                .outerjoin(Result, Result.lease_id == Lease.id)
                .where(Lease.node_id.in_(node_ids))
                .order_by(Lease.id)
            ).all()
        return {
            "volunteer": name,
            "created_at": iso_time(row.created_at),
            "credit": round(row.credit, 3),
            "tasks_completed": row.tasks_completed,
            "trusted": bool(row.trusted),
            "agreed": row.agreed,
            "disagreed": row.disagreed,
            "enrollment_tokens": [
                {"created_at": iso_time(t[0]), "used_at": iso_time(t[1]), "used_by": t[2]}
                for t in tokens
            ],
            "nodes": [_public_node(n._mapping) for n in nodes],
            "tasks": [
                {
                    "project": t[0],
                    "id": t[1],
                    "state": t[2],
                    "attempts": t[3],
                    "node": t[4],
                    "cpu_seconds": round(t[5], 3),
                    "finished_at": iso_time(t[6]),
                    "error": t[7],
                }
                for t in tasks
            ],
            "leases": [
                {
                    "lease": lease[0],
                    "project": lease[1],
                    "task": lease[2],
                    "node": lease[3],
                    "offered_at": iso_time(lease[4]),
                    "accepted_at": iso_time(lease[5]),
                    "ended_at": iso_time(lease[6]),
                    "outcome": lease[7],
                    "detail": lease[8],
                    "cpu_seconds": _rounded(lease[9]),
                    "wall_seconds": _rounded(lease[10]),
                }
                for lease in leases
            ],
        }


_NODE_TIMES = ("first_seen", "last_seen")


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _public_node(row: Any) -> dict[str, Any]:
    """A node's row without its volunteer key or anything secret, times as ISO 8601."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key == "volunteer_id" or "secret" in key or "hash" in key:
            continue
        out["node" if key == "id" else key] = iso_time(value) if key in _NODE_TIMES else value
    return out
