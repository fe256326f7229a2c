"""The scheduler core: pure, with no I/O and no clock of its own.

``Scheduler.handle(*events)`` takes what happened (a node asks for work, accepts an
offer, sends a heartbeat or a result; time passed) and returns instructions: durable
changes for the store (hub/changes.py) and messages for nodes. The runtime commits
the changes of a batch before it sends any message, so nobody is told of a state the
database does not hold. ``now`` travels inside the events, so tests drive time.

Memory holds only what scheduling needs: per project a queue of waiting task keys,
and a record for each task that has had a lease and is not finished.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from hub.changes import (
    LeaseAccepted,
    LeaseEnded,
    LeaseOffered,
    LeaseOutcome,
    ProjectPauseChanged,
    TaskFinished,
    TaskUpdated,
)
from hub.events import (
    BundleRefused,
    Disconnect,
    Event,
    HeartbeatReceived,
    Instruction,
    LeasesDeclined,
    NodeJoined,
    NodeLeft,
    OfferItem,
    OffersAccepted,
    ProjectCancelled,
    ProjectInfo,
    ProjectPaused,
    ProjectResumed,
    ProjectUpdated,
    ResultReceived,
    SendCancel,
    SendOffers,
    SendResultAck,
    SendWelcome,
    SlotsFree,
    TasksAdded,
    Tick,
)
from hub.lifecycle import TaskEvent, TaskState, next_state

# A project's code failing this many times on a task is deterministic: the task is F.
CODE_ERRORS_BEFORE_FAIL = 2


@dataclass(frozen=True, slots=True)
class Settings:
    max_attempts: int
    offer_timeout: float
    lease_window: float  # heartbeat_interval * heartbeat_misses


@dataclass(slots=True)
class TaskRec:
    pk: int
    project_id: int
    state: TaskState = TaskState.NA
    attempts: int = 0
    code_errors: int = 0
    lease: int | None = None
    past_leases: list[int] = field(default_factory=list)


@dataclass(slots=True)
class LeaseRec:
    id: int
    task_pk: int
    node_id: str
    accepted: bool
    offered_at: float


@dataclass(slots=True)
class NodeRec:
    node_id: str
    volunteer: str
    projects: tuple[str, ...] = ()
    connected: bool = False
    demand: int = 0
    last_seen: float = 0.0
    leases: set[int] = field(default_factory=set)
    refused_digests: set[str] = field(default_factory=set)
    next_project: int = 0  # round-robin start among the node's projects


@dataclass(slots=True)
class Snapshot:
    """What the store holds at start-up, for Scheduler.restore."""

    projects: list[ProjectInfo] = field(default_factory=list)
    waiting: dict[int, list[int]] = field(default_factory=dict)  # project id -> NA task keys
    tasks: list[TaskRec] = field(default_factory=list)  # unfinished tasks that had leases
    leases: list[LeaseRec] = field(default_factory=list)  # live (TA or A) leases
    past_leases: list[LeaseRec] = field(default_factory=list)  # ended leases of those tasks
    node_volunteers: dict[str, str] = field(default_factory=dict)  # node id -> volunteer
    next_lease_id: int = 1


class Scheduler:
    """Decides who runs what. Every public method is pure: state in memory, no I/O."""

    def __init__(self, settings: Settings, snapshot: Snapshot | None = None, now: float = 0.0):
        self.settings = settings
        self.projects: dict[int, ProjectInfo] = {}
        self.project_ids: dict[str, int] = {}
        self.queues: dict[int, deque[int]] = {}
        self.tasks: dict[int, TaskRec] = {}
        self.leases: dict[int, LeaseRec] = {}
        self.past_leases: dict[int, LeaseRec] = {}  # ended leases of unfinished tasks
        self.offered: OrderedDict[int, float] = OrderedDict()  # TA lease -> deadline, in order
        self.nodes: dict[str, NodeRec] = {}
        self.finished_while_waiting: set[int] = set()  # queue entries to skip
        self.next_lease_id = 1
        self._out: list[Instruction] = []
        if snapshot is not None:
            self._restore(snapshot, now)

    # ---- public -----------------------------------------------------------------------

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply events in order, then hand out work; return the instructions."""
        self._out = []
        now = 0.0
        for event in events:
            now = getattr(event, "now", now)
            self._dispatch(event)
        self._assign(now)
        out, self._out = self._out, []
        return out

    def waiting_count(self) -> int:
        return sum(len(q) for q in self.queues.values())

    # ---- restore ----------------------------------------------------------------------

    def _restore(self, snap: Snapshot, now: float) -> None:
        for project in snap.projects:
            self._set_project(project)
        for project_id, pks in snap.waiting.items():
            self.queues.setdefault(project_id, deque()).extend(pks)
        for task in snap.tasks:
            self.tasks[task.pk] = task
        for lease in snap.leases:
            self.leases[lease.id] = lease
            node = self.nodes.get(lease.node_id)
            if node is None:
                volunteer = snap.node_volunteers.get(lease.node_id, "")
                # Until it reconnects, a node's leases live for one heartbeat window from now.
                node = self.nodes[lease.node_id] = NodeRec(lease.node_id, volunteer, last_seen=now)
            node.leases.add(lease.id)
            if not lease.accepted:
                self.offered[lease.id] = now + self.settings.offer_timeout
        for lease in snap.past_leases:
            self.past_leases[lease.id] = lease
        self.next_lease_id = snap.next_lease_id

    # ---- dispatch ---------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        match event:
            case NodeJoined():
                self._node_joined(event)
            case NodeLeft():
                if (node := self.nodes.get(event.node_id)) is not None:
                    node.connected = False
                    node.demand = 0
            case HeartbeatReceived():
                self._touch(event.node_id, event.now)
            case SlotsFree():
                if (node := self._touch(event.node_id, event.now)) is not None:
                    # The node counts only what runs; offers still in flight are ours to count.
                    outstanding = sum(1 for lid in node.leases if not self.leases[lid].accepted)
                    node.demand = max(0, event.free - outstanding)
            case OffersAccepted():
                self._accept(event)
            case LeasesDeclined():
                self._touch(event.node_id, event.now)
                for lease_id in self._own_leases(event.node_id, event.leases):
                    self._end_lease(lease_id, LeaseOutcome.DECLINED, event.reason, event.now)
            case BundleRefused():
                self._bundle_refused(event)
            case ResultReceived():
                self._result(event)
            case Tick():
                self._expire_offers(event.now)
                self._expire_silent_nodes(event.now)
            case TasksAdded():
                self.queues.setdefault(event.project_id, deque()).extend(event.task_pks)
            case ProjectUpdated():
                self._set_project(event.project)
            case ProjectPaused() | ProjectResumed():
                self._set_paused(event.project, isinstance(event, ProjectPaused))
            case ProjectCancelled():
                self._cancel_project(event)

    def _set_project(self, project: ProjectInfo) -> None:
        known = self.projects.get(project.id)
        if known is not None and known.paused != project.paused:
            # Pauses are decided here; a bundle registered meanwhile may carry an older flag.
            project = replace(project, paused=known.paused)
        self.projects[project.id] = project
        self.project_ids[project.name] = project.id
        self.queues.setdefault(project.id, deque())

    def _touch(self, node_id: str, now: float) -> NodeRec | None:
        node = self.nodes.get(node_id)
        if node is not None and node.connected:
            node.last_seen = now
            return node
        return None

    def _own_leases(self, node_id: str, lease_ids: Iterable[int]) -> list[int]:
        """The given leases that are live and held by node_id (a node speaks only for itself)."""
        return [
            lid for lid in lease_ids if (lease := self.leases.get(lid)) and lease.node_id == node_id
        ]

    # ---- nodes ------------------------------------------------------------------------

    def _node_joined(self, event: NodeJoined) -> None:
        node = self.nodes.get(event.node_id)
        if node is None:
            node = self.nodes[event.node_id] = NodeRec(event.node_id, event.volunteer)
        node.volunteer = event.volunteer
        node.projects = event.projects
        node.connected = True
        node.demand = 0
        node.last_seen = event.now
        held = set(event.held_leases)
        resumed = tuple(sorted(lid for lid in node.leases if lid in held))
        for lease_id in sorted(node.leases - held):
            # The node no longer knows this lease (it lost its data, or never got the offer).
            lease = self.leases[lease_id]
            outcome = LeaseOutcome.LOST if lease.accepted else LeaseOutcome.OFFER_EXPIRED
            self._end_lease(lease_id, outcome, "node reconnected without it", event.now)
        self._out.append(SendWelcome(node.node_id, resumed))

    def _expire_silent_nodes(self, now: float) -> None:
        window = self.settings.lease_window
        for node in list(self.nodes.values()):
            if now - node.last_seen <= window:
                continue
            if node.leases:
                detail = f"no heartbeat for {now - node.last_seen:.1f} s"
                for lease_id in sorted(node.leases):
                    self._end_lease(lease_id, LeaseOutcome.LOST, detail, now)
            if node.connected:
                node.connected = False
                node.demand = 0
                self._out.append(Disconnect(node.node_id, "missed heartbeats"))
            if not node.connected and not node.leases:
                del self.nodes[node.node_id]

    # ---- offers and leases ------------------------------------------------------------

    def _assign(self, now: float) -> None:
        for node in self.nodes.values():
            if not node.connected or node.demand <= 0:
                continue
            items: list[OfferItem] = []
            while node.demand > 0:
                picked = self._next_task_for(node)
                if picked is None:
                    break
                task, project = picked
                items.append(self._offer(task, project, node, now))
                node.demand -= 1
            if items:
                self._out.append(SendOffers(node.node_id, tuple(items)))

    def _next_task_for(self, node: NodeRec) -> tuple[TaskRec, ProjectInfo] | None:
        names = node.projects
        for i in range(len(names)):
            project_id = self.project_ids.get(names[(node.next_project + i) % len(names)])
            if project_id is None:
                continue
            project = self.projects[project_id]
            if project.paused or project.digest is None or project.digest in node.refused_digests:
                continue
            task = self._pop_waiting(project_id)
            if task is not None:
                node.next_project = (node.next_project + i + 1) % len(names)
                return task, project
        return None

    def _pop_waiting(self, project_id: int) -> TaskRec | None:
        queue = self.queues.get(project_id)
        while queue:
            pk = queue.popleft()
            if pk in self.finished_while_waiting:
                # A late result completed this task after it was requeued.
                self.finished_while_waiting.discard(pk)
                continue
            task = self.tasks.get(pk)
            if task is None:
                task = self.tasks[pk] = TaskRec(pk, project_id)
            return task
        return None

    def _offer(self, task: TaskRec, project: ProjectInfo, node: NodeRec, now: float) -> OfferItem:
        lease_id = self.next_lease_id
        self.next_lease_id += 1
        self.leases[lease_id] = LeaseRec(lease_id, task.pk, node.node_id, False, now)
        self.offered[lease_id] = now + self.settings.offer_timeout
        node.leases.add(lease_id)
        task.state = next_state(task.state, TaskEvent.OFFER)
        task.lease = lease_id
        self._out.append(LeaseOffered(lease_id, task.pk, node.node_id, now))
        self._out.append(TaskUpdated(task.pk, task.state, task.attempts, lease_id, node.node_id))
        return OfferItem(lease_id, task.pk, project)

    def _accept(self, event: OffersAccepted) -> None:
        self._touch(event.node_id, event.now)
        for lease_id in self._own_leases(event.node_id, event.leases):
            lease = self.leases[lease_id]
            if lease.accepted:
                continue  # accepted twice: the first one counted
            lease.accepted = True
            self.offered.pop(lease_id, None)
            task = self.tasks[lease.task_pk]
            task.state = next_state(task.state, TaskEvent.ACCEPT)
            task.attempts += 1
            self._out.append(LeaseAccepted(lease_id, event.now))
            self._out.append(
                TaskUpdated(task.pk, task.state, task.attempts, lease_id, lease.node_id)
            )

    def _expire_offers(self, now: float) -> None:
        while self.offered:
            lease_id, deadline = next(iter(self.offered.items()))
            if deadline > now:
                break
            self._end_lease(lease_id, LeaseOutcome.OFFER_EXPIRED, "not accepted in time", now)

    def _bundle_refused(self, event: BundleRefused) -> None:
        node = self._touch(event.node_id, event.now)
        if node is not None:
            node.refused_digests.add(event.digest)
        for lease_id in self._own_leases(event.node_id, event.leases):
            self._end_lease(lease_id, LeaseOutcome.REFUSED, event.reason, event.now)

    def _drop_lease(self, lease_id: int, outcome: str, detail: str | None, now: float) -> LeaseRec:
        """Remove a live lease everywhere, keep it for late results, record why it ended."""
        lease = self.leases.pop(lease_id)
        self.offered.pop(lease_id, None)
        if (node := self.nodes.get(lease.node_id)) is not None:
            node.leases.discard(lease_id)
        task = self.tasks[lease.task_pk]
        self.past_leases[lease_id] = lease
        task.past_leases.append(lease_id)
        if task.lease == lease_id:
            task.lease = None
        self._out.append(LeaseEnded(lease_id, outcome, detail, now, lease.task_pk, lease.node_id))
        return lease

    def _end_lease(self, lease_id: int, outcome: str, detail: str | None, now: float) -> None:
        """End the task's live lease and move the task on according to why it ended."""
        lease = self._drop_lease(lease_id, outcome, detail, now)
        task = self.tasks[lease.task_pk]
        if outcome in (LeaseOutcome.DECLINED, LeaseOutcome.OFFER_EXPIRED):
            if lease.accepted:
                task.attempts -= 1  # a lease given back cleanly is not a failed attempt
            event = (
                TaskEvent.DECLINE if outcome == LeaseOutcome.DECLINED else TaskEvent.OFFER_EXPIRED
            )
            self._requeue(task, event)
            return
        if outcome == LeaseOutcome.REFUSED and not lease.accepted:
            task.attempts += 1  # refusing the bundle is a failed attempt, not a give-back
        if task.attempts >= self.settings.max_attempts:
            tries = f"{task.attempts} attempt{'s' if task.attempts != 1 else ''}"
            error = f"gave up after {tries}; last: {outcome}: {detail}"
            self._finish(task, TaskState.F, lease, None, now, error=error)
        else:
            self._requeue(task, TaskEvent.LEASE_LOST)

    def _requeue(self, task: TaskRec, event: TaskEvent) -> None:
        task.state = next_state(task.state, event)
        # Retries go to the front: they are the oldest work and may block a project's end.
        self.queues.setdefault(task.project_id, deque()).appendleft(task.pk)
        self._out.append(TaskUpdated(task.pk, task.state, task.attempts, None, None))

    # ---- admin: pause, resume, cancel -------------------------------------------------

    def _set_paused(self, name: str, paused: bool) -> None:
        """Paused projects get no new offers (_next_task_for); leases out run to their end."""
        project_id = self.project_ids.get(name)
        if project_id is None or self.projects[project_id].paused == paused:
            return
        self.projects[project_id] = replace(self.projects[project_id], paused=paused)
        self._out.append(ProjectPauseChanged(project_id, paused))

    def _cancel_project(self, event: ProjectCancelled) -> None:
        """Every unfinished task of the project becomes X; its live leases end and the
        nodes holding them are told to stop. Tasks added later are a new start."""
        project_id = self.project_ids.get(event.project)
        if project_id is None:
            return
        queue = self.queues.get(project_id, deque())
        self.queues[project_id] = deque()
        for pk in queue:
            if pk in self.finished_while_waiting:
                self.finished_while_waiting.discard(pk)  # finished already (a late result)
                continue
            self._cancel_task(self.tasks.get(pk) or TaskRec(pk, project_id), None, event)
        stops: dict[str, list[int]] = {}
        for task in [t for t in self.tasks.values() if t.project_id == project_id]:
            lease = None
            if task.lease is not None:  # TA or A: offered to, or running on, a node
                lease = self._drop_lease(
                    task.lease, LeaseOutcome.CANCELLED, event.reason, event.now
                )
                stops.setdefault(lease.node_id, []).append(lease.id)
            self._cancel_task(task, lease, event)
        for node_id, leases in sorted(stops.items()):
            self._out.append(SendCancel(node_id, tuple(leases), event.reason))

    def _cancel_task(self, task: TaskRec, lease: LeaseRec | None, event: ProjectCancelled) -> None:
        task.state = next_state(task.state, TaskEvent.CANCEL)
        node = self.nodes.get(lease.node_id) if lease is not None else None
        self._out.append(
            TaskFinished(
                task_pk=task.pk,
                state=task.state,
                attempts=task.attempts,
                lease=lease.id if lease is not None else None,
                node_id=lease.node_id if lease is not None else None,
                volunteer=node.volunteer if node else None,
                result=None,
                error=event.reason,
                cpu_seconds=0.0,
                wall_seconds=0.0,
                at=event.now,
            )
        )
        for lease_id in task.past_leases:
            self.past_leases.pop(lease_id, None)
        self.tasks.pop(task.pk, None)

    # ---- results ----------------------------------------------------------------------

    def _result(self, event: ResultReceived) -> None:
        self._touch(event.node_id, event.now)
        lease = self.leases.get(event.lease) or self.past_leases.get(event.lease)
        if lease is None:
            # Unknown, or its task finished already (a result sent twice): ack, record nothing.
            self._ack(event, False, "no such unfinished lease: task finished or lease unknown")
            return
        if lease.node_id != event.node_id:
            self._ack(event, False, "lease held by another node")
            return
        task = self.tasks[lease.task_pk]
        if not event.ok:
            self._code_error(task, lease, event)
            return
        if event.lease in self.leases:
            self._drop_lease(event.lease, LeaseOutcome.COMPLETED, None, event.now)
        if task.lease is not None:
            # A late result wins over the lease that replaced it: cancel that one on its node.
            other = self._drop_lease(
                task.lease, LeaseOutcome.SUPERSEDED, f"lease {lease.id} finished", event.now
            )
            self._out.append(SendCancel(other.node_id, (other.id,), "task completed elsewhere"))
        if not lease.accepted:
            task.attempts += 1  # a result for an unconfirmed offer still was an attempt
        self._finish(task, TaskState.C, lease, event, event.now, error=None)
        self._ack(event, True, None)

    def _code_error(self, task: TaskRec, lease: LeaseRec, event: ResultReceived) -> None:
        """The project's code failed: retry elsewhere, unless it failed like this before."""
        if event.lease not in self.leases:
            self._ack(event, False, "lease no longer live")
            return
        self._drop_lease(event.lease, LeaseOutcome.CODE_ERROR, event.error, event.now)
        task.code_errors += 1
        if not lease.accepted:
            task.attempts += 1
        deterministic = task.code_errors >= CODE_ERRORS_BEFORE_FAIL
        if deterministic or task.attempts >= self.settings.max_attempts:
            self._finish(task, TaskState.F, lease, event, event.now, error=event.error)
        else:
            self._requeue(task, TaskEvent.LEASE_LOST)
        self._ack(event, True, None)

    def _finish(
        self,
        task: TaskRec,
        state: TaskState,
        lease: LeaseRec,
        result: ResultReceived | None,
        now: float,
        error: str | None,
    ) -> None:
        event = TaskEvent.COMPLETE if state is TaskState.C else TaskEvent.GIVE_UP
        if task.state is TaskState.NA:
            self.finished_while_waiting.add(task.pk)
        task.state = next_state(task.state, event)
        node = self.nodes.get(lease.node_id)
        self._out.append(
            TaskFinished(
                task_pk=task.pk,
                state=task.state,
                attempts=task.attempts,
                lease=lease.id,
                node_id=lease.node_id or None,
                volunteer=node.volunteer if node else None,
                result=result.result if result and result.ok else None,
                error=error,
                cpu_seconds=self._credited_cpu(task, result),
                wall_seconds=result.wall_seconds if result else 0.0,
                at=now,
                files=result.files if result and result.ok else (),
            )
        )
        for lease_id in task.past_leases:
            self.past_leases.pop(lease_id, None)
        del self.tasks[task.pk]

    def _credited_cpu(self, task: TaskRec, result: ResultReceived | None) -> float:
        """The CPU seconds a result claims, capped by its project's wall-time limit.

        Credit follows these seconds, and a node's word is all the hub has: no run can
        have used more CPU than its limit allowed, so a claim beyond it is cut there.
        """
        if result is None:
            return 0.0
        limit = self.projects[task.project_id].wall_seconds
        return min(result.cpu_seconds, limit)

    def _ack(self, event: ResultReceived, accepted: bool, reason: str | None) -> None:
        self._out.append(SendResultAck(event.node_id, event.lease, accepted, reason))
