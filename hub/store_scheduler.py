"""The scheduler's side of the store: the start-up snapshot and batches of changes.

``apply`` writes a whole batch of scheduler changes in one transaction: durability
costs one sync per batch, not one per task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from hub import faults
from hub.changes import (
    Change,
    FileInfo,
    LeaseAccepted,
    LeaseEnded,
    LeaseOffered,
    LeaseOutcome,
    LeaseResultRefused,
    ProjectPauseChanged,
    ResultJudged,
    ResultPending,
    TaskFinished,
    TaskUpdated,
    TrustChanged,
)
from hub.db import (
    LEASES,
    OUTPUTS,
    PENDING_RESULTS,
    PROJECTS,
    RESULTS,
    TASKS,
    VOLUNTEERS,
    StoreBase,
    insert_blobs,
    project_info,
    update_by_id,
)
from hub.lifecycle import TaskState
from hub.models import Lease, Node, PendingResult, Task, Volunteer
from hub.quorum import PendingRec
from hub.rawsql import execute_many
from hub.scheduler import LeaseRec, Snapshot, TaskRec
from hub.store_inbox import OfferPayload, read_offer_payloads
from issc.errors import StoreError

# The hot path's statements, built once: building one costs more than running it for a
# batch of a few rows.
_INSERT_LEASES = insert(LEASES)
_INSERT_PENDING = insert(PENDING_RESULTS)
_INSERT_OUTPUTS = insert(OUTPUTS)
_INSERT_RESULTS = insert(RESULTS)
_JUDGE = (
    update(PENDING_RESULTS)
    .where(PENDING_RESULTS.c.lease_id == bindparam("b_lease"))
    .values(verdict=bindparam("b_verdict"))
)
_TRUST = (
    update(VOLUNTEERS)
    .where(VOLUNTEERS.c.name == bindparam("b_name"))
    .values(
        agreed=VOLUNTEERS.c.agreed + bindparam("b_agreed"),
        disagreed=VOLUNTEERS.c.disagreed + bindparam("b_disagreed"),
        trusted=bindparam("b_trusted"),
        trust_streak=bindparam("b_streak"),
    )
)
_CREDIT = (
    update(VOLUNTEERS)
    .where(VOLUNTEERS.c.name == bindparam("b_name"))
    .values(
        tasks_completed=VOLUNTEERS.c.tasks_completed + bindparam("b_n"),
        credit=VOLUNTEERS.c.credit + bindparam("b_cpu"),
    )
)


class SchedulerStore(StoreBase):
    """Part of ``Store``: what the scheduler starts from and what it changes."""

    # ---- start-up -----------------------------------------------------------------

    def load_snapshot(self) -> Snapshot:
        """Everything the scheduler needs to carry on where the last run stopped."""
        snap = Snapshot()
        with self.engine.connect() as conn:
            snap.projects = [project_info(r) for r in conn.execute(select(PROJECTS))]
            # The scheduler puts retries at the front of a queue, the latest retry first, and
            # new tasks at the back in order: a retry's place is where its last lease ended.
            waiting_pks = select(Task.id).where(Task.state == TaskState.NA)
            last = (
                select(
                    Lease.task_id,
                    func.max(Lease.ended_at).label("ended_at"),
                    func.max(Lease.id).label("lease_id"),
                )
                .where(Lease.task_id.in_(waiting_pks))
                .group_by(Lease.task_id)
                .subquery()
            )
            waiting = conn.execute(
                select(Task.id, Task.project_id)
                .outerjoin(last, last.c.task_id == Task.id)
                .where(Task.state == TaskState.NA)
                .order_by(
                    last.c.lease_id.is_(None),
                    last.c.ended_at.desc(),
                    last.c.lease_id.desc(),
                    Task.id,
                )
            )
            for pk, project_id in waiting:
                snap.waiting.setdefault(project_id, []).append(pk)
            # A lease knows its node's volunteer (trust and credit), node record or not.
            nodes = conn.execute(select(Node.id, Volunteer.name).join(Volunteer)).all()
            snap.node_volunteers = volunteers = {node_id: name for node_id, name in nodes}
            live = conn.execute(
                select(Lease.id, Lease.task_id, Lease.node_id, Lease.accepted_at, Lease.offered_at)
                .where(Lease.ended_at.is_(None))
                .order_by(Lease.id)  # offers expire in the order they were made
            ).all()
            snap.leases = [
                LeaseRec(r[0], r[1], r[2], r[3] is not None, r[4], volunteers.get(r[2], ""))
                for r in live
            ]
            # Unfinished tasks that have had leases carry attempts and history.
            unfinished = select(Task.id).where(Task.state.in_(["NA", "TA", "A"]))
            rows = conn.execute(
                select(Task.id, Task.project_id, Task.state, Task.attempts, Task.lease_id).where(
                    Task.id.in_(unfinished), Task.id.in_(select(Lease.task_id))
                )
            ).all()
            live_ids = {r[0] for r in live}  # a task's live leases are these (snap.leases)
            tasks = {
                r[0]: TaskRec(
                    r[0], r[1], TaskState(r[2]), r[3], 0, r[4] if r[4] in live_ids else None
                )
                for r in rows
            }
            past = conn.execute(
                select(
                    Lease.id,
                    Lease.task_id,
                    Lease.node_id,
                    Lease.accepted_at,
                    Lease.offered_at,
                    Lease.outcome,
                )
                .where(Lease.ended_at.is_not(None), Lease.task_id.in_(unfinished))
                .order_by(Lease.id)
            ).all()
            for lease_id, task_pk, node_id, accepted_at, offered_at, outcome in past:
                task = tasks.get(task_pk)
                if task is None:
                    continue
                accepted = accepted_at is not None
                volunteer = volunteers.get(node_id, "")
                # The outcome says whether the lease ended with its result (it takes no
                # other one) or without (a late result may still count).
                snap.past_leases.append(
                    LeaseRec(lease_id, task_pk, node_id, accepted, offered_at, volunteer, outcome)
                )
                task.past_leases.append(lease_id)
                if outcome == LeaseOutcome.CODE_ERROR:
                    task.code_errors += 1
                elif outcome == LeaseOutcome.REJECTED and volunteer:
                    task.rejected.add(volunteer)  # a wrong known answer
            snap.tasks = list(tasks.values())
            self._load_replicas(conn, snap, tasks, unfinished)
            max_lease = conn.execute(select(func.max(Lease.id))).scalar()
            snap.next_lease_id = (max_lease or 0) + 1
        return snap

    def _load_replicas(
        self, conn: Any, snap: Snapshot, tasks: dict[int, TaskRec], unfinished: Any
    ) -> None:
        """Pending results, trust and known answers: what checking results needs."""
        rows = conn.execute(
            select(PENDING_RESULTS)
            .where(PendingResult.task_id.in_(unfinished))
            .order_by(PendingResult.received_at, PendingResult.lease_id)
        ).all()
        for row in rows:
            task = tasks.get(row.task_id)
            if task is None:
                continue
            task.answered.add(row.lease_id)  # taken once: discarded ones too
            if row.verdict is not None:
                continue
            files = json.loads(row.files_json)
            snap.pending.append(
                PendingRec(
                    lease=row.lease_id,
                    task_pk=row.task_id,
                    node_id=row.node_id,
                    volunteer=row.volunteer,
                    result=json.loads(row.result_json),
                    files=tuple(FileInfo(name, sha, size) for name, sha, size in files),
                    cpu_seconds=row.cpu_seconds,
                    wall_seconds=row.wall_seconds,
                    at=row.received_at,
                    verified=bool(row.verified),
                )
            )
        untrusted = conn.execute(
            select(Volunteer.name, Volunteer.trust_streak).where(Volunteer.trusted.is_(False))
        )
        snap.untrusted = {name: streak for name, streak in untrusted}
        answers = conn.execute(
            select(Task.id, Task.expect_json).where(
                Task.id.in_(unfinished), Task.expect_json.is_not(None)
            )
        )
        snap.expected = {pk: json.loads(text) for pk, text in answers}

    # ---- scheduler changes ------------------------------------------------------------

    def apply(
        self, changes: Sequence[Change], offer_pks: Sequence[int] = ()
    ) -> dict[int, OfferPayload]:
        """Write one batch of scheduler changes in one transaction, and read in it the
        payloads of the tasks ``offer_pks`` (store_inbox.read_offer_payloads): the round
        takes one trip to the store's thread, and a retry repeats it whole.

        Within a batch, lease inserts come first and task rows are updated in the order
        the scheduler changed them, so the last change of a row wins.
        """
        try:
            with self.held_transaction() as conn:
                offered = [
                    {"id": c.lease, "task_id": c.task_pk, "node_id": c.node_id, "offered_at": c.at}
                    for c in changes
                    if isinstance(c, LeaseOffered)
                ]
                if offered:
                    execute_many(conn, _INSERT_LEASES, offered)
                update_by_id(
                    conn,
                    LEASES,
                    [
                        {"id": c.lease, "accepted_at": c.at}
                        for c in changes
                        if isinstance(c, LeaseAccepted)
                    ],
                )
                update_by_id(
                    conn,
                    LEASES,
                    [
                        {"id": c.lease, "ended_at": c.at, "outcome": c.outcome, "detail": c.detail}
                        for c in changes
                        if isinstance(c, LeaseEnded)
                    ],
                )
                update_by_id(
                    conn,
                    LEASES,
                    [
                        {"id": c.lease, "outcome": LeaseOutcome.REJECTED, "detail": c.detail}
                        for c in changes
                        if isinstance(c, LeaseResultRefused)
                    ],
                )
                update_by_id(
                    conn,
                    TASKS,
                    [
                        {
                            "id": c.task_pk,
                            "state": str(c.state),
                            "attempts": c.attempts,
                            "lease_id": c.lease,
                            "node_id": c.node_id,
                        }
                        for c in changes
                        if isinstance(c, TaskUpdated)
                    ],
                )
                self._write_replicas(conn, changes)
                finished = [c for c in changes if isinstance(c, TaskFinished)]
                if finished:
                    self._write_finished(conn, finished)
                update_by_id(
                    conn,
                    PROJECTS,
                    [
                        {"id": c.project_id, "paused": c.paused}
                        for c in changes
                        if isinstance(c, ProjectPauseChanged)
                    ],
                )
                payloads = read_offer_payloads(conn, offer_pks) if offer_pks else {}
                faults.point("store.before_commit")
            return payloads
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot commit a batch of {len(changes)} changes: {exc}") from None

    def _write_replicas(self, conn: Any, changes: Sequence[Change]) -> None:
        """Pending results, their verdicts and the volunteers' trust (none for a quorum-1
        task of a trusted volunteer: such a batch runs no statement here)."""
        pending = [
            {
                "lease_id": c.lease,
                "task_id": c.task_pk,
                "node_id": c.node_id,
                "volunteer": c.volunteer,
                "result_json": json.dumps(c.result),
                "files_json": json.dumps([[f.name, f.sha256, f.size] for f in c.files]),
                "cpu_seconds": c.cpu_seconds,
                "wall_seconds": c.wall_seconds,
                "received_at": c.at,
                "verified": c.verified,
            }
            for c in changes
            if isinstance(c, ResultPending)
        ]
        if pending:
            execute_many(conn, _INSERT_PENDING, pending)
        verdicts = [
            {"b_lease": c.lease, "b_verdict": c.verdict}
            for c in changes
            if isinstance(c, ResultJudged)
        ]
        if verdicts:
            execute_many(conn, _JUDGE, verdicts)
        trust = [
            {
                "b_name": c.volunteer,
                "b_agreed": c.agreed,
                "b_disagreed": c.disagreed,
                "b_trusted": c.trusted,
                "b_streak": c.streak,
            }
            for c in changes
            if isinstance(c, TrustChanged)
        ]
        if trust:
            # In order, one statement per change: the last word on trust wins.
            execute_many(conn, _TRUST, trust)

    def _write_finished(self, conn: Any, finished: list[TaskFinished]) -> None:
        update_by_id(
            conn,
            TASKS,
            [
                {
                    "id": c.task_pk,
                    "state": str(c.state),
                    "attempts": c.attempts,
                    "lease_id": c.lease,
                    "node_id": c.node_id,
                    "volunteer": c.volunteer,
                    "error": c.error,
                    "cpu_seconds": c.cpu_seconds,
                    "finished_at": c.at,
                }
                for c in finished
            ],
        )
        completed = [c for c in finished if c.state is TaskState.C and c.lease is not None]
        outputs = [
            {"lease_id": c.lease, "name": f.name, "sha256": f.sha256, "size": f.size}
            for c in completed
            for f in c.files
        ]
        if outputs:
            insert_blobs(
                conn, {f.sha256: f.size for c in completed for f in c.files}, completed[0].at
            )
            execute_many(conn, _INSERT_OUTPUTS, outputs)
        if completed:
            execute_many(
                conn,
                _INSERT_RESULTS,
                [
                    {
                        "lease_id": c.lease,
                        "task_id": c.task_pk,
                        "ok": True,
                        "result_json": json.dumps(c.result),
                        "error": None,
                        "cpu_seconds": c.cpu_seconds,
                        "wall_seconds": c.wall_seconds,
                        "received_at": c.at,
                    }
                    for c in completed
                ],
            )
            credit: dict[str, tuple[int, float]] = {}
            for c in completed:
                # A task settled by agreement credits each agreeing volunteer; else its own.
                earners = c.credits if c.credits is not None else ((c.volunteer, c.cpu_seconds),)
                for volunteer, seconds in earners:
                    if volunteer:
                        n, cpu = credit.get(volunteer, (0, 0.0))
                        credit[volunteer] = (n + 1, cpu + seconds)
            if credit:
                execute_many(
                    conn,
                    _CREDIT,
                    [{"b_name": k, "b_n": n, "b_cpu": cpu} for k, (n, cpu) in credit.items()],
                )
