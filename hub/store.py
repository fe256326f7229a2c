"""The hub's store: the source of truth, behind one class, on any SQLAlchemy database.

All methods are synchronous and meant to run on one worker thread (see AsyncStore),
so the event loop never waits on the disk. ``apply`` writes a whole batch of
scheduler changes in one transaction: durability costs one sync per batch, not one
per task. SQLite runs in WAL mode with synchronous=FULL, so a commit survives a kill.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Engine,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    make_url,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import QueuePool, StaticPool

from hub.changes import (
    Change,
    FileInfo,
    LeaseAccepted,
    LeaseEnded,
    LeaseOffered,
    TaskFinished,
    TaskUpdated,
)
from hub.events import (
    ProjectInfo,
)
from hub.lifecycle import FINAL_STATES, TaskState
from hub.models import (
    Base,
    Blob,
    Bundle,
    InboxFile,
    Lease,
    Node,
    OutboxFile,
    Output,
    Project,
    Result,
    Task,
    TaskInput,
    Volunteer,
)
from hub.scheduler import (
    LeaseRec,
    Snapshot,
    TaskRec,
)
from issc.errors import StoreError, TaskFileError
from issc.manifest import Manifest

T = TypeVar("T")


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


PROJECTS, BUNDLES, VOLUNTEERS, NODES = map(_table, (Project, Bundle, Volunteer, Node))
TASKS, LEASES, RESULTS = map(_table, (Task, Lease, Result))
INBOX_FILES, OUTBOX_FILES = map(_table, (InboxFile, OutboxFile))
BLOBS, TASK_INPUTS, OUTPUTS = map(_table, (Blob, TaskInput, Output))
_CHUNK = 500  # rows per IN (...) query, well under every database's parameter limit


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """One task from an inbox file, validated; ``line`` is where it starts (1-based)."""

    task_id: str
    input_json: str
    line: int
    file_paths: tuple[tuple[str, str], ...] = ()  # (NAME, PATH) as written in the task file
    files: tuple[FileInfo, ...] = ()  # the same files once they are in the content store


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


def iso_time(stamp: float | None) -> str | None:
    """UNIX seconds as ISO 8601 UTC, the form results.jsonl and issc-ctl --json use."""
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _update_by_id(conn: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    """``UPDATE table SET ... WHERE id = :id`` for every row, as one executemany.

    Every row must have the same keys: ``id`` and the columns to set.
    """
    if not rows:
        return
    columns = [key for key in rows[0] if key != "id"]
    statement = (
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values({column: bindparam(f"b_{column}") for column in columns})
    )
    conn.execute(statement, [{f"b_{key}": value for key, value in row.items()} for row in rows])


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
    _insert_blobs(conn, {f.sha256: f.size for entry in entries for f in entry.files}, now)
    conn.execute(insert(TASK_INPUTS), rows)


def _insert_blobs(conn: Any, sizes: dict[str, int], now: float) -> None:
    """Add a ``blobs`` row for each digest that has none yet."""
    known: set[str] = set()
    for chunk in _chunks(list(sizes)):
        known.update(conn.execute(select(Blob.sha256).where(Blob.sha256.in_(chunk))).scalars())
    new = [
        {"sha256": sha, "size": size, "created_at": now}
        for sha, size in sizes.items()
        if sha not in known
    ]
    if new:
        conn.execute(insert(BLOBS), new)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss too
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and full sync. Raises StoreError."""
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            # An in-memory database lives and dies with its one connection: every thread
            # must share that connection (StaticPool), or each sees an empty database.
            in_memory = parsed.database in (None, "", ":memory:") or (
                parsed.query.get("mode") == "memory"
            )
            engine = create_engine(
                url,
                # One thread uses the store, so a file database keeps one pooled connection
                # (QueuePool) instead of opening one, with its PRAGMAs, per call.
                poolclass=StaticPool if in_memory else QueuePool,
                connect_args={"check_same_thread": False},
            )
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot open database {url!r}: {exc}") from None


class Store:
    """Every read and write the hub makes. Raises StoreError on database failures."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def create_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot create the schema: {exc}") from None

    def close(self) -> None:
        self.engine.dispose()

    # ---- start-up -----------------------------------------------------------------

    def load_snapshot(self) -> Snapshot:
        """Everything the scheduler needs to carry on where the last run stopped."""
        snap = Snapshot()
        with self.engine.connect() as conn:
            snap.projects = [_project_info(r) for r in conn.execute(select(PROJECTS))]
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
            live = conn.execute(
                select(Lease.id, Lease.task_id, Lease.node_id, Lease.accepted_at, Lease.offered_at)
                .where(Lease.ended_at.is_(None))
                .order_by(Lease.id)  # offers expire in the order they were made
            ).all()
            snap.leases = [LeaseRec(r[0], r[1], r[2], r[3] is not None, r[4]) for r in live]
            # Unfinished tasks that have had leases carry attempts and history.
            unfinished = select(Task.id).where(Task.state.in_(["NA", "TA", "A"]))
            rows = conn.execute(
                select(Task.id, Task.project_id, Task.state, Task.attempts, Task.lease_id).where(
                    Task.id.in_(unfinished), Task.id.in_(select(Lease.task_id))
                )
            ).all()
            tasks = {r[0]: TaskRec(r[0], r[1], TaskState(r[2]), r[3], 0, r[4]) for r in rows}
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
                snap.past_leases.append(LeaseRec(lease_id, task_pk, node_id, accepted, offered_at))
                task.past_leases.append(lease_id)
                if outcome == "code_error":
                    task.code_errors += 1
            snap.tasks = list(tasks.values())
            nodes = conn.execute(select(Node.id, Volunteer.name).join(Volunteer)).all()
            snap.node_volunteers = {node_id: name for node_id, name in nodes}
            max_lease = conn.execute(select(func.max(Lease.id))).scalar()
            snap.next_lease_id = (max_lease or 0) + 1
        return snap

    # ---- scheduler changes ------------------------------------------------------------

    def apply(self, changes: Sequence[Change]) -> None:
        """Write one batch of scheduler changes in one transaction.

        Within a batch, lease inserts come first and task rows are updated in the order
        the scheduler changed them, so the last change of a row wins.
        """
        try:
            with self.engine.begin() as conn:
                offered = [
                    {"id": c.lease, "task_id": c.task_pk, "node_id": c.node_id, "offered_at": c.at}
                    for c in changes
                    if isinstance(c, LeaseOffered)
                ]
                if offered:
                    conn.execute(insert(LEASES), offered)
                _update_by_id(
                    conn,
                    LEASES,
                    [
                        {"id": c.lease, "accepted_at": c.at}
                        for c in changes
                        if isinstance(c, LeaseAccepted)
                    ],
                )
                _update_by_id(
                    conn,
                    LEASES,
                    [
                        {"id": c.lease, "ended_at": c.at, "outcome": c.outcome, "detail": c.detail}
                        for c in changes
                        if isinstance(c, LeaseEnded)
                    ],
                )
                _update_by_id(
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
                finished = [c for c in changes if isinstance(c, TaskFinished)]
                if finished:
                    self._write_finished(conn, finished)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot commit a batch of {len(changes)} changes: {exc}") from None

    def _write_finished(self, conn: Any, finished: list[TaskFinished]) -> None:
        _update_by_id(
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
            _insert_blobs(
                conn, {f.sha256: f.size for c in completed for f in c.files}, completed[0].at
            )
            conn.execute(insert(OUTPUTS), outputs)
        if completed:
            conn.execute(
                insert(RESULTS),
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
                if c.volunteer:
                    n, cpu = credit.get(c.volunteer, (0, 0.0))
                    credit[c.volunteer] = (n + 1, cpu + c.cpu_seconds)
            if credit:
                conn.execute(
                    update(VOLUNTEERS)
                    .where(VOLUNTEERS.c.name == bindparam("b_name"))
                    .values(
                        tasks_completed=VOLUNTEERS.c.tasks_completed + bindparam("b_n"),
                        credit=VOLUNTEERS.c.credit + bindparam("b_cpu"),
                    ),
                    [{"b_name": k, "b_n": n, "b_cpu": cpu} for k, (n, cpu) in credit.items()],
                )

    # ---- projects and bundles ---------------------------------------------------------

    def register_bundle(
        self, manifest: Manifest, digest: str, content: bytes, now: float
    ) -> tuple[ProjectInfo, bool]:
        """Register a new project or a newer version; returns (project, changed).

        Raises StoreError if another key signed the project before, or if the version
        is not newer than the registered one (an identical bundle is not an error).
        """
        with self.engine.begin() as conn:
            row = conn.execute(select(PROJECTS).where(Project.name == manifest.name)).first()
            if row is not None:
                if row.owner_key != manifest.owner_key:
                    raise StoreError(
                        f"project {manifest.name!r} is registered with another owner key "
                        f"({row.owner_key}); this bundle is signed by {manifest.owner_key}"
                    )
                if row.digest == digest:
                    return _project_info(row), False
                if manifest.version <= row.version:
                    raise StoreError(
                        f"project {manifest.name!r} version {manifest.version} is not newer "
                        f"than the registered version {row.version}"
                    )
            values = {
                "version": manifest.version,
                "digest": digest,
                "size": len(content),
                "mode": manifest.mode,
                "quorum": manifest.quorum,
                "output_mb": manifest.limits.output_mb,
            }
            if row is None:
                project_id = conn.execute(
                    insert(PROJECTS).values(
                        name=manifest.name,
                        owner_key=manifest.owner_key,
                        paused=False,
                        created_at=now,
                        **values,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            else:
                project_id = row.id
                conn.execute(update(PROJECTS).where(Project.id == project_id).values(**values))
            conn.execute(
                insert(BUNDLES).values(
                    digest=digest,
                    project_id=project_id,
                    version=manifest.version,
                    size=len(content),
                    content=content,
                    created_at=now,
                )
            )
            fresh = conn.execute(select(PROJECTS).where(Project.id == project_id)).one()
            return _project_info(fresh), True

    def bundle_content(self, digest: str) -> bytes | None:
        with self.engine.connect() as conn:
            return conn.execute(select(Bundle.content).where(Bundle.digest == digest)).scalar()

    # ---- inbox ------------------------------------------------------------------------

    def inbox_file(self, sha256: str) -> tuple[str, str] | None:
        """(name, outcome) of an inbox file already read with this content, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(InboxFile.name, InboxFile.outcome).where(InboxFile.sha256 == sha256)
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
        task_t = TASKS
        try:
            with self.engine.begin() as conn:
                project_id = conn.execute(
                    select(Project.id).where(Project.name == project)
                ).scalar()
                if project_id is None:
                    raise TaskFileError(
                        f"unknown project {project!r}: drop its signed bundle (.issc) first"
                    )
                self._reject_existing_ids(conn, project_id, entries)
                pks: list[int] = []
                for chunk in _chunks(entries, 5000):
                    result = conn.execute(
                        insert(task_t).returning(task_t.c.id, sort_by_parameter_order=True),
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
                            }
                            for e in chunk
                        ],
                    )
                    pks.extend(row[0] for row in result)
                _insert_task_inputs(conn, entries, pks, now)
                conn.execute(
                    insert(INBOX_FILES).values(
                        sha256=sha256,
                        name=name,
                        outcome="accepted",
                        detail=f"{len(entries)} tasks",
                        at=now,
                    )
                )
                return project_id, pks
        except IntegrityError as exc:
            raise StoreError(f"cannot add tasks: {exc.orig}") from None

    def _reject_existing_ids(
        self, conn: Any, project_id: int, entries: Sequence[TaskEntry]
    ) -> None:
        for chunk in _chunks(entries):
            by_id = {e.task_id: e for e in chunk}
            taken = conn.execute(
                select(Task.name).where(Task.project_id == project_id, Task.name.in_(list(by_id)))
            ).scalars()
            # Name the first one in the file, whatever order the database returns them in.
            first = min((by_id[name] for name in taken), key=lambda e: e.line, default=None)
            if first is not None:
                raise TaskFileError(
                    f"duplicate task id {first.task_id!r}: the project already has it", first.line
                )

    def offer_payloads(self, pks: Sequence[int]) -> dict[int, tuple[str, str, list[FileInfo]]]:
        """task key -> (task id, input JSON, input files) for building offers."""
        out: dict[int, tuple[str, str, list[FileInfo]]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(pks):
                rows = conn.execute(
                    select(Task.id, Task.name, Task.input_json).where(Task.id.in_(list(chunk)))
                )
                out.update((pk, (name, payload, [])) for pk, name, payload in rows)
                files = conn.execute(
                    select(TaskInput.task_id, TaskInput.name, TaskInput.sha256, Blob.size)
                    .join(Blob, Blob.sha256 == TaskInput.sha256)
                    .where(TaskInput.task_id.in_(list(chunk)))
                    .order_by(TaskInput.task_id, TaskInput.name)
                )
                for pk, name, sha, size in files:
                    out[pk][2].append(FileInfo(name, sha, size))
        return out

    # ---- volunteers and nodes ---------------------------------------------------------

    def enroll_node(
        self,
        volunteer: str,
        node_id: str | None,
        node_secret: str | None,
        open_registration: bool,
        address: str,
        slots: int,
        now: float,
    ) -> tuple[str, str]:
        """Authenticate a returning node or enroll a new one; returns (node id, secret).

        Raises StoreError naming the reason when the node may not join.
        """
        with self.engine.begin() as conn:
            vol_id = conn.execute(select(Volunteer.id).where(Volunteer.name == volunteer)).scalar()
            if vol_id is None:
                if not open_registration:
                    raise StoreError(f"unknown volunteer {volunteer!r} and registration is closed")
                vol_id = conn.execute(
                    insert(VOLUNTEERS).values(
                        name=volunteer, credit=0.0, tasks_completed=0, created_at=now
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            if node_id is not None:
                row = conn.execute(select(NODES).where(Node.id == node_id)).first()
                if row is not None:
                    if node_secret is None or _hash_secret(node_secret) != row.secret_hash:
                        raise StoreError(f"node {node_id}: wrong node secret")
                    if row.volunteer_id != vol_id:
                        raise StoreError(f"node {node_id} belongs to another volunteer")
                    conn.execute(
                        update(NODES)
                        .where(Node.id == node_id)
                        .values(last_seen=now, address=address, slots=slots)
                    )
                    assert node_secret is not None
                    return node_id, node_secret
            new_id = node_id if node_id is not None else f"n-{secrets.token_hex(4)}"
            secret = secrets.token_urlsafe(24)
            conn.execute(
                insert(NODES).values(
                    id=new_id,
                    volunteer_id=vol_id,
                    secret_hash=_hash_secret(secret),
                    address=address,
                    slots=slots,
                    first_seen=now,
                    last_seen=now,
                )
            )
            return new_id, secret

    # ---- outbox -----------------------------------------------------------------------

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
            for chunk in _chunks(leases):
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
            for chunk in _chunks(pks):
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

    # ---- admin queries ----------------------------------------------------------------

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


def _project_info(row: Any) -> ProjectInfo:
    return ProjectInfo(
        id=row.id,
        name=row.name,
        version=row.version,
        digest=row.digest,
        size=row.size,
        paused=bool(row.paused),
        quorum=row.quorum,
        output_mb=row.output_mb,
    )


class AsyncStore:
    """Runs Store methods on one worker thread so the event loop never blocks on I/O."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="issc-store")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the store's thread; database errors become StoreError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: fn(*args))
        except SQLAlchemyError as exc:
            raise StoreError(f"database error in {getattr(fn, '__name__', fn)}: {exc}") from exc

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
