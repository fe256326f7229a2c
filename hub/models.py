"""The hub's tables (SQLAlchemy 2.0 declarative). Times are UNIX seconds (float, UTC)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    owner_key: Mapped[str] = mapped_column(String(128))  # pinned at the first bundle
    version: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))  # the current bundle
    size: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))
    quorum: Mapped[int] = mapped_column(Integer, default=1)
    output_mb: Mapped[int] = mapped_column(Integer, default=64)  # limits.output_mb
    wall_seconds: Mapped[float] = mapped_column(Float, default=600.0)  # limits.wall_seconds
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    # project.yaml's tolerance: how replicas' numbers may differ; NULL: exactly equal.
    tolerance: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)


class Bundle(Base):
    """Every version ever registered, so the history and the bytes stay available."""

    __tablename__ = "bundles"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    version: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class Volunteer(Base):
    __tablename__ = "volunteers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    credit: Mapped[float] = mapped_column(Float, default=0.0)
    tasks_completed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    # Trust (quorum and spot checks): results of an untrusted volunteer never count alone.
    trusted: Mapped[bool] = mapped_column(Boolean, default=True)
    agreed: Mapped[int] = mapped_column(Integer, default=0)  # results that agreed
    disagreed: Mapped[int] = mapped_column(Integer, default=0)  # results that did not
    trust_streak: Mapped[int] = mapped_column(Integer, default=0)  # agreements since distrusted


class EnrollmentToken(Base):
    """A one-time token that lets one node of a volunteer enroll under closed registration.

    Only the SHA-256 of the token is kept; the token itself is shown once, by
    ``issc-ctl volunteer add``.
    """

    __tablename__ = "enrollment_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # node id


class Node(Base):
    """A node, known by its own Ed25519 key; ``id`` is derived from the key
    (issc.nodeauth.node_id_for). The hub holds no secret of a node's."""

    __tablename__ = "nodes"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id"))
    public_key: Mapped[str] = mapped_column(String(64), unique=True)  # "ed25519:<base64>"
    address: Mapped[str] = mapped_column(String(128), default="")
    slots: Mapped[int] = mapped_column(Integer, default=0)
    # The projects the volunteer gives time to on this node, from its last hello (JSON).
    projects: Mapped[str] = mapped_column(Text, default="[]")
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("project_id", "name"),
        Index("ix_tasks_project_state", "project_id", "state"),
        Index("ix_tasks_unexported", "exported", "state"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(128))  # the owner's task id
    state: Mapped[str] = mapped_column(String(2), default="NA")
    input_json: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # live or final lease
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    volunteer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    exported: Mapped[bool] = mapped_column(Boolean, default=False)  # line in results.jsonl
    source: Mapped[str] = mapped_column(String(64))  # SHA-256 of the inbox file
    # A spot check's known answer (JSON), from the task file's ``expect``; never offered.
    expect_json: Mapped[str | None] = mapped_column(Text, nullable=True, default=None)


class Lease(Base):
    """One offer of a task to a node; the rows of a task are its history."""

    __tablename__ = "leases"
    __table_args__ = (Index("ix_leases_task", "task_id"), Index("ix_leases_live", "ended_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    node_id: Mapped[str] = mapped_column(String(32))
    offered_at: Mapped[float] = mapped_column(Float)
    accepted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class Result(Base):
    """An accepted result, keyed by the lease that produced it (so it is recorded once)."""

    __tablename__ = "results"
    lease_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    ok: Mapped[bool] = mapped_column(Boolean)
    result_json: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cpu_seconds: Mapped[float] = mapped_column(Float)
    wall_seconds: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)


class PendingResult(Base):
    """A successful result of a task whose results must agree (quorum, trust, spot
    checks), keyed by its lease; ``verdict`` is NULL while it waits, then what became of
    it (hub.changes.Verdict: agreed, disagreed, discarded, unresolved)."""

    __tablename__ = "pending_results"
    __table_args__ = (Index("ix_pending_results_task", "task_id", "verdict"),)
    lease_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    node_id: Mapped[str] = mapped_column(String(32))
    volunteer: Mapped[str] = mapped_column(String(64))
    result_json: Mapped[str] = mapped_column(Text)
    files_json: Mapped[str] = mapped_column(Text, default="[]")  # [[name, sha256, size], ...]
    cpu_seconds: Mapped[float] = mapped_column(Float)  # as credited (capped)
    wall_seconds: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    verified: Mapped[bool] = mapped_column(Boolean, default=False)  # matched a known answer
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True, default=None)


class InboxFile(Base):
    """Every inbox file ever read, by content, so the same file is never ingested twice."""

    __tablename__ = "inbox_files"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[float] = mapped_column(Float)


class OutboxFile(Base):
    """How many bytes of a project's results.jsonl are committed (see hub/outbox.py)."""

    __tablename__ = "outbox_files"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    committed_size: Mapped[int] = mapped_column(BigInteger, default=0)


class Blob(Base):
    """A file in the hub's content store (<data_dir>/files), input or output, by digest."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class TaskInput(Base):
    """An input file of a task: placed as in/NAME before the run."""

    __tablename__ = "task_inputs"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))


class Output(Base):
    """An output file of an accepted result, keyed by the lease that produced it."""

    __tablename__ = "outputs"
    lease_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    size: Mapped[int] = mapped_column(BigInteger)


class HealthProbe(Base):
    """One row the hub rewrites to learn that the database takes writes again, after a
    commit failed (a full disk, a database that went away): see HubRuntime's recovery."""

    __tablename__ = "health_probe"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    probed_at: Mapped[float] = mapped_column(Float)
