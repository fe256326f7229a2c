"""Durable changes the scheduler asks for; the store applies a batch in one transaction.

Nothing that depends on a change is told to anyone before the batch holding it has
been committed: the runtime commits, then sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hub.lifecycle import TaskState


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file by name and content: an input of a task or an output of a result."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class LeaseOffered:
    lease: int
    task_pk: int
    node_id: str
    at: float


@dataclass(frozen=True, slots=True)
class LeaseAccepted:
    lease: int
    at: float


@dataclass(frozen=True, slots=True)
class LeaseEnded:
    """A lease is over; ``outcome`` says why (see LeaseOutcome), ``detail`` adds the reason."""

    lease: int
    outcome: str
    detail: str | None
    at: float
    # For the operator's log line only: which task and node (not stored with the lease).
    task_pk: int = field(default=0, compare=False)
    node_id: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class LeaseResultRefused:
    """A result for a lease that had already ended without one (lost, expired) was
    refused (it contradicted the task's known answer): the lease's outcome becomes
    ``rejected`` (its end time stays), so that it takes no other result, after a restart
    too, and the task does not go back to the volunteer."""

    lease: int
    detail: str
    at: float


@dataclass(frozen=True, slots=True)
class TaskUpdated:
    task_pk: int
    state: TaskState
    attempts: int
    lease: int | None
    node_id: str | None


@dataclass(frozen=True, slots=True)
class TaskFinished:
    """A task reached C, F or X: its row and its result are written together."""

    task_pk: int
    state: TaskState
    attempts: int
    lease: int | None
    node_id: str | None
    volunteer: str | None
    result: Any
    error: str | None
    cpu_seconds: float
    wall_seconds: float
    at: float
    files: tuple[FileInfo, ...] = ()  # output files of the accepted result
    # Who earns credit, (volunteer, CPU seconds) each, for a task agreed by a quorum or
    # checked against a known answer; None: ``volunteer`` earns ``cpu_seconds`` if C.
    credits: tuple[tuple[str, float], ...] | None = None


@dataclass(frozen=True, slots=True)
class ResultPending:
    """A successful result that waits for agreement (quorum, trust): kept durably, judged
    when the task finishes."""

    lease: int
    task_pk: int
    node_id: str
    volunteer: str
    result: Any
    files: tuple[FileInfo, ...]
    cpu_seconds: float  # as credited: capped by the project's wall-time limit
    wall_seconds: float
    at: float
    verified: bool = False  # it matched the task's known answer (a spot check)


@dataclass(frozen=True, slots=True)
class ResultJudged:
    """What became of a pending result: see Verdict."""

    lease: int
    verdict: str


@dataclass(frozen=True, slots=True)
class TrustChanged:
    """A volunteer's results were compared: counts to add, and its trust after them."""

    volunteer: str
    agreed: int  # to add
    disagreed: int  # to add
    trusted: bool
    streak: int  # agreements in a row since it was last distrusted


@dataclass(frozen=True, slots=True)
class ProjectPauseChanged:
    """An admin paused or resumed a project: its row's ``paused`` flag."""

    project_id: int
    paused: bool


Change = (
    LeaseOffered
    | LeaseAccepted
    | LeaseEnded
    | LeaseResultRefused
    | TaskUpdated
    | TaskFinished
    | ProjectPauseChanged
    | ResultPending
    | ResultJudged
    | TrustChanged
)


class LeaseOutcome:
    """The reasons a lease ends, as recorded in the task's history."""

    COMPLETED = "completed"
    CODE_ERROR = "code_error"
    OFFER_EXPIRED = "offer_expired"
    DECLINED = "declined"
    REFUSED = "bundle_refused"
    LOST = "lost"
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"  # the project was cancelled by an admin
    REJECTED = "rejected"  # a result refused: it contradicted the task's known answer


class Verdict:
    """What became of a pending result once its task finished (or its volunteer fell)."""

    AGREED = "agreed"  # it agreed with the task's accepted result (or its known answer)
    DISAGREED = "disagreed"  # it did not: its volunteer lost trust
    DISCARDED = "discarded"  # its volunteer was caught by a spot check before it counted
    UNRESOLVED = "unresolved"  # the task failed without agreement: nobody is judged
