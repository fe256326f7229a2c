"""What the scheduler hears and what it says: events in, instructions out.

Events are facts (a node joined, asked for work, sent a result; time passed), each
carrying ``now``. Instructions are the messages the runtime must send once the durable
changes of the same batch (hub/changes.py) are committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hub.changes import Change, FileInfo


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    id: int
    name: str
    version: int
    digest: str | None  # the current bundle; None until one is registered
    size: int
    paused: bool = False
    quorum: int = 1
    output_mb: int = 64  # the bundle's limits.output_mb: a cap on uploads for its tasks
    wall_seconds: float = 600.0  # limits.wall_seconds: also caps the CPU time credited
    tolerance: float | None = None  # how replicas' numbers may differ; None: exactly equal


# ---- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeJoined:
    node_id: str
    volunteer: str
    projects: tuple[str, ...]
    held_leases: tuple[int, ...]
    now: float


@dataclass(frozen=True, slots=True)
class NodeLeft:
    node_id: str
    now: float


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    node_id: str
    now: float


@dataclass(frozen=True, slots=True)
class SlotsFree:
    node_id: str
    free: int
    now: float


@dataclass(frozen=True, slots=True)
class OffersAccepted:
    node_id: str
    leases: tuple[int, ...]
    now: float


@dataclass(frozen=True, slots=True)
class LeasesDeclined:
    node_id: str
    leases: tuple[int, ...]
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class BundleRefused:
    node_id: str
    digest: str
    reason: str
    leases: tuple[int, ...]
    now: float


@dataclass(frozen=True, slots=True)
class ResultReceived:
    node_id: str
    lease: int
    ok: bool
    result: Any
    error: str | None
    cpu_seconds: float
    wall_seconds: float
    now: float
    files: tuple[FileInfo, ...] = ()  # output files, already uploaded and checked


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class TasksAdded:
    project_id: int
    task_pks: tuple[int, ...]
    # Spot checks: (task key, known answer as JSON text) of the tasks that carry one.
    expected: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ProjectUpdated:
    project: ProjectInfo


@dataclass(frozen=True, slots=True)
class ProjectPaused:
    """An admin paused a project: no new offers; leases already out run to their end."""

    project: str
    now: float


@dataclass(frozen=True, slots=True)
class ProjectResumed:
    """An admin resumed a paused project: its waiting tasks are offered again."""

    project: str
    now: float


@dataclass(frozen=True, slots=True)
class ProjectCancelled:
    """An admin cancelled a project: every unfinished task becomes X, running ones stop."""

    project: str
    reason: str
    now: float


Event = (
    NodeJoined
    | NodeLeft
    | HeartbeatReceived
    | SlotsFree
    | OffersAccepted
    | LeasesDeclined
    | BundleRefused
    | ResultReceived
    | Tick
    | TasksAdded
    | ProjectUpdated
    | ProjectPaused
    | ProjectResumed
    | ProjectCancelled
)

# ---- instructions (besides the durable changes of hub/changes.py) -------------------------


@dataclass(frozen=True, slots=True)
class SendWelcome:
    node_id: str
    resumed: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OfferItem:
    lease: int
    task_pk: int
    project: ProjectInfo


@dataclass(frozen=True, slots=True)
class SendOffers:
    node_id: str
    items: tuple[OfferItem, ...]


@dataclass(frozen=True, slots=True)
class SendCancel:
    node_id: str
    leases: tuple[int, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class SendResultAck:
    node_id: str
    lease: int
    accepted: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class Disconnect:
    node_id: str
    reason: str


Message = SendWelcome | SendOffers | SendCancel | SendResultAck | Disconnect
Instruction = Change | Message
