"""The scheduler core: pure, with no I/O and no clock of its own.

``Scheduler.handle(*events)`` takes what happened (a node asks for work, accepts an
offer, sends a heartbeat or a result; time passed) and returns instructions: durable
changes for the store (hub/changes.py) and messages for nodes. The runtime commits
the changes of a batch before it sends any message, so nobody is told of a state the
database does not hold. ``now`` travels inside the events, so tests drive time.

Memory holds only what scheduling needs: per project a queue of waiting task keys,
and a record for each task that has had a lease and is not finished.

Replicas (docs/design.md, "Quorum, trust and spot checks"): a task of a project with
``quorum: N`` is run by N nodes of N different volunteers, and its successful results
wait, pending, until N of them agree; a result of a volunteer that is not trusted, or an
answer to a task with a known answer, is checked the same way. A quorum-1 task run by a
trusted volunteer takes exactly the single-lease path it always took.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from hub.changes import (
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
    Verdict,
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
from hub.quorum import (
    Agreement,
    PendingRec,
    agree,
    answer_agrees,
    describe_disagreement,
    find_agreement,
)

# A project's code failing this many times on a task is deterministic: the task is F.
CODE_ERRORS_BEFORE_FAIL = 2
# Agreements in a row after which a distrusted volunteer is trusted again.
TRUST_AFTER = 10
# Replica-queue entries one offer looks at before it gives up on a node for this round
# (every one of them already has a replica or a pending result of the node's volunteer).
MAX_SKIPS = 8
# The ack of a result that is not taken, whatever the reason: never says "spot check".
NOT_ACCEPTED = "result not accepted"
# The ack of a second result for a lease that ended with its first one (docs/protocol.md,
# section 7, rule 5): the same words whatever the first one was (a success, a code
# error, a refused answer), so that it tells a spot-check liar nothing either.
ALREADY_ENDED = "lease already ended with a result"
# How a lease ends with its own result: such a lease takes no other one.
RESULT_OUTCOMES = frozenset(
    {LeaseOutcome.COMPLETED, LeaseOutcome.CODE_ERROR, LeaseOutcome.REJECTED}
)

# Where a task's key waits (TaskRec.queued).
NOT_QUEUED, IN_QUEUE, IN_REPLICAS = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Settings:
    max_attempts: int
    offer_timeout: float
    lease_window: float  # heartbeat_interval * heartbeat_misses


@dataclass(slots=True, init=False)
class TaskRec:
    """An unfinished task that has had a lease (or is about to get one)."""

    pk: int
    project_id: int
    state: TaskState
    attempts: int
    code_errors: int
    leases: set[int]  # live leases: at most one unless its results must agree
    past_leases: list[int]
    pending: list[PendingRec]  # successful results waiting for agreement, oldest first
    answered: set[int]  # leases whose successful result it took (pending, judged, discarded)
    target: int  # results and live leases it wants: set while it has pending results
    queued: int  # NOT_QUEUED, IN_QUEUE (the project's queue) or IN_REPLICAS
    rejected: set[str]  # volunteers whose answer contradicted its known answer

    def __init__(
        self,
        pk: int,
        project_id: int,
        state: TaskState = TaskState.NA,
        attempts: int = 0,
        code_errors: int = 0,
        lease: int | None = None,
        past_leases: list[int] | None = None,
        *,
        answered: Iterable[int] = (),
    ) -> None:
        self.pk = pk
        self.project_id = project_id
        self.state = state
        self.attempts = attempts
        self.code_errors = code_errors
        self.leases = {lease} if lease is not None else set()
        self.past_leases = list(past_leases or ())
        self.pending = []
        self.answered = set(answered)
        self.target = 0
        self.queued = NOT_QUEUED
        self.rejected = set()

    @property
    def lease(self) -> int | None:
        """The newest live lease (the only one, unless results must agree), or None."""
        return max(self.leases) if self.leases else None


@dataclass(slots=True)
class LeaseRec:
    id: int
    task_pk: int
    node_id: str
    accepted: bool
    offered_at: float
    # The volunteer of the lease's node, known for as long as the lease is (a node record
    # may be gone before a late result arrives); "" only if nobody knows: never trusted.
    volunteer: str = ""
    # Why it ended (LeaseOutcome), None while live; one of RESULT_OUTCOMES: its result came.
    outcome: str | None = None


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
    pending: list[PendingRec] = field(default_factory=list)  # of unfinished tasks, in order
    untrusted: dict[str, int] = field(default_factory=dict)  # volunteer -> agreements since
    expected: dict[int, Any] = field(default_factory=dict)  # task key -> known answer


class Scheduler:
    """Decides who runs what. Every public method is pure: state in memory, no I/O."""

    def __init__(self, settings: Settings, snapshot: Snapshot | None = None, now: float = 0.0):
        self.settings = settings
        self.projects: dict[int, ProjectInfo] = {}
        self.project_ids: dict[str, int] = {}
        # Per project: tasks without a live lease or a pending result, retries in front.
        self.queues: dict[int, deque[int]] = {}
        # Per project: tasks that have replicas out or results pending and want more.
        self.replica_queues: dict[int, deque[int]] = {}
        self.tasks: dict[int, TaskRec] = {}
        self.leases: dict[int, LeaseRec] = {}
        self.past_leases: dict[int, LeaseRec] = {}  # ended leases of unfinished tasks
        self.offered: OrderedDict[int, float] = OrderedDict()  # TA lease -> deadline, in order
        self.nodes: dict[str, NodeRec] = {}
        # Entries of ``queues`` to skip, by task: the task finished, or moved to the
        # replica queue, while its key waited there (a count: a key may wait twice).
        self.finished_while_waiting: dict[int, int] = {}
        self.expected: dict[int, Any] = {}  # task key -> known answer (spot checks)
        self.untrusted: dict[str, int] = {}  # volunteer -> agreements in a row since distrusted
        self.pending_tasks: dict[str, set[int]] = {}  # volunteer -> tasks with its pending results
        self.next_lease_id = 1
        self.hungry: dict[str, None] = {}  # connected nodes with demand > 0, in join order
        self.next_silence_check = 0.0  # no node's heartbeat window ends before this
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
        return sum(len(q) for q in self.queues.values()) + sum(
            len(q) for q in self.replica_queues.values()
        )

    def trusted(self, volunteer: str) -> bool:
        """Whether the volunteer's results may count alone; one nobody knows ("") may not."""
        return bool(volunteer) and volunteer not in self.untrusted

    # ---- restore ----------------------------------------------------------------------

    def _restore(self, snap: Snapshot, now: float) -> None:
        for project in snap.projects:
            self._set_project(project)
        self.untrusted = dict(snap.untrusted)
        self.expected = dict(snap.expected)
        for task in snap.tasks:
            self.tasks[task.pk] = task
        for lease in snap.leases:
            if not lease.volunteer:
                lease.volunteer = snap.node_volunteers.get(lease.node_id, "")
            self.leases[lease.id] = lease
            node = self.nodes.get(lease.node_id)
            if node is None:
                volunteer = snap.node_volunteers.get(lease.node_id, "")
                # Until it reconnects, a node's leases live for one heartbeat window from now.
                node = self.nodes[lease.node_id] = NodeRec(lease.node_id, volunteer, last_seen=now)
            node.leases.add(lease.id)
            if (holder := self.tasks.get(lease.task_pk)) is not None:
                holder.leases.add(lease.id)
            if not lease.accepted:
                self.offered[lease.id] = now + self.settings.offer_timeout
        for lease in snap.past_leases:
            if not lease.volunteer:
                lease.volunteer = snap.node_volunteers.get(lease.node_id, "")
            self.past_leases[lease.id] = lease
        for rec in snap.pending:
            if (holder := self.tasks.get(rec.task_pk)) is not None:
                holder.pending.append(rec)
                self.pending_tasks.setdefault(rec.volunteer, set()).add(holder.pk)
        for project_id, pks in snap.waiting.items():
            queue = self.queues.setdefault(project_id, deque())
            for pk in pks:
                waiting = self.tasks.get(pk)
                if waiting is not None and (waiting.pending or waiting.rejected):
                    continue  # not for every volunteer: queued below, with replicas
                queue.append(pk)
                if waiting is not None:
                    waiting.queued = IN_QUEUE
        for task in self.tasks.values():
            if task.pending:
                self._retarget(task)
            self._queue(task)  # tasks with replicas out or results pending that want more
        self.next_lease_id = snap.next_lease_id

    # ---- dispatch ---------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        match event:
            case NodeJoined():
                self._node_joined(event)
            case NodeLeft():
                if (node := self.nodes.get(event.node_id)) is not None:
                    node.connected = False
                    self._set_demand(node, 0)
            case HeartbeatReceived():
                self._touch(event.node_id, event.now)
            case SlotsFree():
                if (node := self._touch(event.node_id, event.now)) is not None:
                    # The node counts only what runs; offers still in flight are ours to count.
                    outstanding = sum(1 for lid in node.leases if not self.leases[lid].accepted)
                    self._set_demand(node, max(0, event.free - outstanding))
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
                for pk, answer in event.expected:
                    self.expected[pk] = json.loads(answer)
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
        self._set_demand(node, 0)
        node.last_seen = event.now
        deadline = event.now + self.settings.lease_window
        self.next_silence_check = min(self.next_silence_check, deadline)
        held = set(event.held_leases)
        resumed = tuple(sorted(lid for lid in node.leases if lid in held))
        for lease_id in sorted(node.leases - held):
            # The node no longer knows this lease (it lost its data, or never got the offer).
            lease = self.leases[lease_id]
            outcome = LeaseOutcome.LOST if lease.accepted else LeaseOutcome.OFFER_EXPIRED
            self._end_lease(lease_id, outcome, "node reconnected without it", event.now)
        self._out.append(SendWelcome(node.node_id, resumed))

    def _expire_silent_nodes(self, now: float) -> None:
        # A scan of every node is due only when the earliest silence deadline has passed
        # (heartbeats only move deadlines later): per round that is O(1), not O(nodes).
        if now < self.next_silence_check:
            return
        window = self.settings.lease_window
        earliest = math.inf
        for node in list(self.nodes.values()):
            if now - node.last_seen <= window:
                earliest = min(earliest, node.last_seen + window)
                continue
            if node.leases:
                detail = f"no heartbeat for {now - node.last_seen:.1f} s"
                for lease_id in sorted(node.leases):
                    self._end_lease(lease_id, LeaseOutcome.LOST, detail, now)
            if node.connected:
                node.connected = False
                self._set_demand(node, 0)
                self._out.append(Disconnect(node.node_id, "missed heartbeats"))
            if not node.connected and not node.leases:
                del self.nodes[node.node_id]
        self.next_silence_check = earliest

    # ---- offers and leases ------------------------------------------------------------

    def _set_demand(self, node: NodeRec, demand: int) -> None:
        node.demand = demand
        if demand > 0 and node.connected:
            self.hungry[node.node_id] = None
        else:
            self.hungry.pop(node.node_id, None)

    def _assign(self, now: float) -> None:
        # Only nodes that want work are visited, and only while work is queued: with
        # thousands of idle nodes connected, a round costs nothing when the queues are empty.
        if not self.hungry or not self._work_queued():
            return
        for node_id in list(self.hungry):
            if not self._work_queued():
                return
            node = self.nodes.get(node_id)
            if node is None or not node.connected or node.demand <= 0:
                self.hungry.pop(node_id, None)
                continue
            items: list[OfferItem] = []
            while node.demand > 0:
                picked = self._next_task_for(node)
                if picked is None:
                    break
                task, project = picked
                items.append(self._offer(task, project, node, now))
                node.demand -= 1
            if node.demand <= 0:
                self.hungry.pop(node_id, None)
            if items:
                self._out.append(SendOffers(node.node_id, tuple(items)))

    def _work_queued(self) -> bool:
        """Whether any queue holds a task key (perhaps a stale one, skipped when popped)."""
        return any(self.queues.values()) or any(self.replica_queues.values())

    def _next_task_for(self, node: NodeRec) -> tuple[TaskRec, ProjectInfo] | None:
        names = node.projects
        for i in range(len(names)):
            project_id = self.project_ids.get(names[(node.next_project + i) % len(names)])
            if project_id is None:
                continue
            project = self.projects[project_id]
            if project.paused or project.digest is None or project.digest in node.refused_digests:
                continue
            task = self._pop_waiting(project_id, node)
            if task is not None:
                node.next_project = (node.next_project + i + 1) % len(names)
                return task, project
        return None

    def _pop_waiting(self, project_id: int, node: NodeRec) -> TaskRec | None:
        """The next task of the project for this node, taken off its queue.

        Tasks that want another replica come first, each to a node of a volunteer that
        holds no live lease and no pending result of it; one that this node's volunteer
        holds goes to the back of the line, at most MAX_SKIPS of them per offer.
        """
        replicas = self.replica_queues.get(project_id)
        if replicas:
            for _ in range(min(len(replicas), MAX_SKIPS)):
                pk = replicas.popleft()
                task = self.tasks.get(pk)
                if task is None or task.queued != IN_REPLICAS:
                    continue  # finished meanwhile, or queued elsewhere since
                if self._replicas_wanted(task) <= 0:
                    task.queued = NOT_QUEUED
                    continue
                if self._holds(task, node.volunteer):
                    replicas.append(pk)
                    continue
                task.queued = NOT_QUEUED
                return task
        queue = self.queues.get(project_id)
        while queue:
            pk = queue.popleft()
            if self._take_stale(pk):
                continue  # a late result completed this task after it was requeued
            task = self.tasks.get(pk)
            if task is None:
                task = self.tasks[pk] = TaskRec(pk, project_id)
                return task
            if task.queued != IN_QUEUE:
                continue  # not waiting here any more
            task.queued = NOT_QUEUED
            return task
        return None

    def _mark_stale(self, pk: int) -> None:
        self.finished_while_waiting[pk] = self.finished_while_waiting.get(pk, 0) + 1

    def _take_stale(self, pk: int) -> bool:
        """Whether this queue entry of ``pk`` is one to skip (and forget)."""
        count = self.finished_while_waiting.get(pk)
        if count is None:
            return False
        if count > 1:
            self.finished_while_waiting[pk] = count - 1
        else:
            del self.finished_while_waiting[pk]
        return True

    def _holds(self, task: TaskRec, volunteer: str) -> bool:
        """The volunteer has a live lease or a pending result of the task already (or
        answered it wrongly: a task with a known answer does not go back to them)."""
        if volunteer in task.rejected:
            return True
        for lease_id in task.leases:
            if self.leases[lease_id].volunteer == volunteer:
                return True
        return any(p.volunteer == volunteer for p in task.pending)

    def _target(self, task: TaskRec) -> int:
        """How many results and live leases the task wants in all."""
        return task.target if task.pending else self.projects[task.project_id].quorum

    def _replicas_wanted(self, task: TaskRec) -> int:
        return self._target(task) - len(task.pending) - len(task.leases)

    def _queue(self, task: TaskRec) -> None:
        """Put the task where nodes find it, if it wants another lease and is not queued.

        A task with nothing out and nothing pending goes to the front of its project's
        queue (a retry: the oldest work); one that wants another replica to the back of
        the replica queue.
        """
        wanted = self._replicas_wanted(task)
        picky = bool(task.leases or task.pending or task.rejected)  # not for every volunteer
        if task.queued == IN_REPLICAS and (wanted <= 0 or not picky):
            # A late result made another replica needless, or its replicas all ended
            # without a result (a retry now, like any other). Both are rare, and a replica
            # queue is short: the linear removal is cheap.
            with contextlib.suppress(ValueError):
                self.replica_queues[task.project_id].remove(task.pk)
            task.queued = NOT_QUEUED
        if task.queued != NOT_QUEUED or wanted <= 0:
            return
        if picky:
            self.replica_queues.setdefault(task.project_id, deque()).append(task.pk)
            task.queued = IN_REPLICAS
        else:
            self.queues.setdefault(task.project_id, deque()).appendleft(task.pk)
            task.queued = IN_QUEUE

    def _offer(self, task: TaskRec, project: ProjectInfo, node: NodeRec, now: float) -> OfferItem:
        lease_id = self.next_lease_id
        self.next_lease_id += 1
        self.leases[lease_id] = LeaseRec(
            lease_id, task.pk, node.node_id, False, now, node.volunteer
        )
        self.offered[lease_id] = now + self.settings.offer_timeout
        node.leases.add(lease_id)
        task.state = next_state(task.state, TaskEvent.OFFER)
        task.leases.add(lease_id)
        self._out.append(LeaseOffered(lease_id, task.pk, node.node_id, now))
        self._out.append(TaskUpdated(task.pk, task.state, task.attempts, lease_id, node.node_id))
        if project.quorum > 1 or task.pending or task.rejected:
            self._queue(task)  # another replica, for another volunteer's node
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
        lease.outcome = outcome
        self.offered.pop(lease_id, None)
        if (node := self.nodes.get(lease.node_id)) is not None:
            node.leases.discard(lease_id)
        task = self.tasks[lease.task_pk]
        self.past_leases[lease_id] = lease
        if task.past_leases and lease_id < task.past_leases[-1]:
            bisect.insort(task.past_leases, lease_id)  # replicas may end in any order
        else:
            task.past_leases.append(lease_id)
        task.leases.discard(lease_id)
        self._out.append(LeaseEnded(lease_id, outcome, detail, now, lease.task_pk, lease.node_id))
        return lease

    def _end_lease(self, lease_id: int, outcome: str, detail: str | None, now: float) -> None:
        """End one live lease of a task and move the task on according to why it ended."""
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
        self._give_up_or_retry(task, lease, outcome, detail, now)

    def _failures(self, task: TaskRec) -> int:
        """Attempts that came to nothing: not a successful result, not running now.

        For a task with one lease at a time and no result yet, simply ``attempts``.
        """
        running = sum(1 for lid in task.leases if self.leases[lid].accepted)
        return task.attempts - len(task.answered) - running

    def _give_up_or_retry(
        self, task: TaskRec, lease: LeaseRec, outcome: str, detail: str | None, now: float
    ) -> None:
        if self._failures(task) >= self.settings.max_attempts:
            tries = f"{task.attempts} attempt{'s' if task.attempts != 1 else ''}"
            error = f"gave up after {tries}; last: {outcome}: {detail}"
            self._finish(task, TaskState.F, lease, None, now, error=error)
        else:
            self._requeue(task, TaskEvent.LEASE_LOST)

    def _requeue(self, task: TaskRec, event: TaskEvent) -> None:
        """A lease of the task ended without a result that counts: it wants another."""
        if task.leases:
            event = self._replica_end(task)
        task.state = next_state(task.state, event)
        # Retries go to the front: they are the oldest work and may block a project's end.
        self._queue(task)
        self._task_updated(task)

    def _replica_end(self, task: TaskRec) -> TaskEvent:
        """The event of a lease ending while others of the task stay live."""
        if task.state is TaskState.A and not any(self.leases[i].accepted for i in task.leases):
            return TaskEvent.LAST_ACCEPTED_END
        return TaskEvent.REPLICA_END

    def _task_updated(self, task: TaskRec) -> None:
        lease = task.lease
        node_id = self.leases[lease].node_id if lease is not None else None
        self._out.append(TaskUpdated(task.pk, task.state, task.attempts, lease, node_id))

    def _end_replicas(self, task: TaskRec, detail: str, reason: str, now: float) -> None:
        """The task is finished: its other live leases end and their nodes stop them."""
        stops: dict[str, list[int]] = {}
        for lease_id in sorted(task.leases):
            other = self._drop_lease(lease_id, LeaseOutcome.SUPERSEDED, detail, now)
            stops.setdefault(other.node_id, []).append(lease_id)
        for node_id, leases in stops.items():
            self._out.append(SendCancel(node_id, tuple(leases), reason))

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
        self.replica_queues[project_id] = deque()
        for pk in queue:
            if self._take_stale(pk):
                continue  # finished already (a late result)
            task = self.tasks.get(pk) or TaskRec(pk, project_id)
            if task.queued != IN_QUEUE and pk in self.tasks:
                continue  # a stale entry: the task is cancelled below
            task.queued = NOT_QUEUED
            self._cancel_task(task, None, event)
        stops: dict[str, list[int]] = {}
        for task in [t for t in self.tasks.values() if t.project_id == project_id]:
            task.queued = NOT_QUEUED
            lease = None
            for lease_id in sorted(task.leases):  # TA or A: offered to, or running on, nodes
                lease = self._drop_lease(lease_id, LeaseOutcome.CANCELLED, event.reason, event.now)
                stops.setdefault(lease.node_id, []).append(lease.id)
            self._cancel_task(task, lease, event)
        for node_id, leases in sorted(stops.items()):
            self._out.append(SendCancel(node_id, tuple(leases), event.reason))

    def _cancel_task(self, task: TaskRec, lease: LeaseRec | None, event: ProjectCancelled) -> None:
        self._close(
            task,
            TaskEvent.CANCEL,
            event.now,
            lease=lease.id if lease is not None else None,
            node_id=lease.node_id if lease is not None else None,
            volunteer=lease.volunteer if lease is not None else None,
            error=event.reason,
        )

    def _close(
        self,
        task: TaskRec,
        event: TaskEvent,
        now: float,
        *,
        lease: int | None,
        node_id: str | None,
        volunteer: str | None,
        result: Any = None,
        error: str | None = None,
        cpu_seconds: float = 0.0,
        wall_seconds: float = 0.0,
        files: tuple[FileInfo, ...] = (),
        credits: tuple[tuple[str, float], ...] | None = None,
    ) -> None:
        """The task reaches C, F or X by ``event``: written with its result, forgotten."""
        task.state = next_state(task.state, event)
        self._out.append(
            TaskFinished(
                task_pk=task.pk,
                state=task.state,
                attempts=task.attempts,
                lease=lease,
                node_id=node_id or None,
                volunteer=volunteer or None,
                result=result,
                error=error,
                cpu_seconds=cpu_seconds,
                wall_seconds=wall_seconds,
                at=now,
                files=files,
                credits=credits,
            )
        )
        self._forget(task)

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
        if task.answered and lease.id in task.answered:
            self._ack(event, False, "result already recorded")  # sent twice
            return
        if lease.outcome in RESULT_OUTCOMES:
            # Its one result came already (a code error, a refused answer): rule 5.
            self._ack(event, False, ALREADY_ENDED)
            return
        if not event.ok:
            self._code_error(task, lease, event)
            return
        project = self.projects[task.project_id]
        volunteer = lease.volunteer  # not its node record's: that may be gone by now
        if (
            project.quorum > 1
            or task.pending
            or not self.trusted(volunteer)
            or task.pk in self.expected
        ):
            self._checked_result(task, project, lease, volunteer, event)
            return
        # One result settles the task: quorum 1, a trusted volunteer, no known answer.
        if event.lease in self.leases:
            self._drop_lease(event.lease, LeaseOutcome.COMPLETED, None, event.now)
        if not lease.accepted:
            task.attempts += 1  # a result for an unconfirmed offer still was an attempt
        # A late result wins over a lease that replaced it: that one is cancelled on its node.
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
        if deterministic or self._failures(task) >= self.settings.max_attempts:
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
        if task.leases and state is TaskState.C:
            self._end_replicas(task, f"lease {lease.id} finished", "task completed elsewhere", now)
        elif task.leases:
            self._end_replicas(task, "task failed", "task failed elsewhere", now)
        ok = result is not None and result.ok
        self._close(
            task,
            event,
            now,
            lease=lease.id,
            node_id=lease.node_id,
            volunteer=lease.volunteer,
            result=result.result if result and ok else None,
            error=error,
            cpu_seconds=self._credited_cpu(task, result),
            wall_seconds=result.wall_seconds if result else 0.0,
            files=result.files if result and ok else (),
        )

    def _forget(self, task: TaskRec) -> None:
        """The task is finished: drop what memory held for it."""
        if task.queued == IN_QUEUE:
            self._mark_stale(task.pk)  # its queue entry is skipped
        for rec in task.pending:
            # Pending results that were never judged (the task failed or was cancelled).
            self._out.append(ResultJudged(rec.lease, Verdict.UNRESOLVED))
            self._unindex(rec.volunteer, task.pk)
        for lease_id in task.past_leases:
            self.past_leases.pop(lease_id, None)
        self.expected.pop(task.pk, None)
        self.tasks.pop(task.pk, None)

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

    # ---- results that must agree: quorum, trust, spot checks ---------------------------

    def _checked_result(
        self,
        task: TaskRec,
        project: ProjectInfo,
        lease: LeaseRec,
        volunteer: str,
        event: ResultReceived,
    ) -> None:
        """A successful result that does not settle the task alone: it is checked against
        the task's known answer, if any, then waits with the task's other results until
        enough of them agree."""
        now = event.now
        known = task.pk in self.expected
        if known and not answer_agrees(event.result, self.expected[task.pk], project.tolerance):
            self._wrong_answer(task, lease, volunteer, event)
            return
        ended = event.lease in self.leases
        if ended:
            self._drop_lease(event.lease, LeaseOutcome.COMPLETED, None, now)
        if not lease.accepted:
            task.attempts += 1  # a result for an unconfirmed offer still was an attempt
        rec = PendingRec(
            lease=lease.id,
            task_pk=task.pk,
            node_id=lease.node_id,
            volunteer=volunteer,
            result=event.result,
            files=event.files,
            cpu_seconds=self._credited_cpu(task, event),
            wall_seconds=event.wall_seconds,
            at=now,
            verified=known,
        )
        self._out.append(
            ResultPending(
                rec.lease,
                task.pk,
                rec.node_id,
                volunteer,
                rec.result,
                rec.files,
                rec.cpu_seconds,
                rec.wall_seconds,
                now,
                known,
            )
        )
        self._leave_main_queue(task)  # with a result pending it is a replica like the others
        task.pending.append(rec)
        task.answered.add(lease.id)
        self.pending_tasks.setdefault(volunteer, set()).add(task.pk)
        if known:
            self._judge(volunteer, agreed=True)
        self._settle(task, project, now, lease_ended=ended)
        self._ack(event, True, None)

    def _settle(self, task: TaskRec, project: ProjectInfo, now: float, lease_ended: bool) -> None:
        """Finish the task if its pending results agree, or fail it at the bound; else
        ask for as many more replicas as agreement still needs."""
        agreement = self._agreement(task, project)
        if agreement.group is not None:
            self._complete_agreed(task, project, agreement.group, now)
            return
        if len(task.pending) >= 2 * project.quorum + 1:
            self._fail_unagreed(task, project, now)
            return
        self._retarget(task, agreement.largest)
        if not task.leases:
            task.state = next_state(task.state, TaskEvent.RESULT_PENDING)
        elif lease_ended:
            task.state = next_state(task.state, self._replica_end(task))
        self._queue(task)
        self._task_updated(task)

    def _agreement(self, task: TaskRec, project: ProjectInfo) -> Agreement:
        known = task.pk in self.expected
        return find_agreement(task.pending, project.quorum, project.tolerance, self.trusted, known)

    def _retarget(self, task: TaskRec, largest: int | None = None) -> None:
        """How many results and live leases the task wants, from its pending results.

        Short of a group of ``quorum`` agreeing volunteers, it wants as many more as the
        largest group lacks, or one more if that group has no trusted volunteer in it;
        never more than ``2 * quorum + 1`` results in all.
        """
        project = self.projects[task.project_id]
        quorum = project.quorum
        if largest is None:
            largest = self._agreement(task, project).largest
        more = max(1, quorum - largest)
        task.target = min(len(task.pending) + more, 2 * quorum + 1)

    def _complete_agreed(
        self, task: TaskRec, project: ProjectInfo, group: tuple[PendingRec, ...], now: float
    ) -> None:
        """C with the group's earliest result. Every pending result is judged against it:
        agreeing ones earn their volunteers credit and trust, the others lose trust."""
        agreed = group[0]
        members = {id(p) for p in group}
        credits: list[tuple[str, float]] = []
        for rec in task.pending:
            ok = id(rec) in members or agree(rec, agreed, project.tolerance)
            self._out.append(ResultJudged(rec.lease, Verdict.AGREED if ok else Verdict.DISAGREED))
            if ok and rec.volunteer:
                credits.append((rec.volunteer, rec.cpu_seconds))
            if not rec.verified:  # a checked answer was judged when it arrived
                self._judge(rec.volunteer, agreed=ok)
            self._unindex(rec.volunteer, task.pk)
        task.pending = []
        self._end_replicas(task, f"lease {agreed.lease} finished", "task completed elsewhere", now)
        self._close(
            task,
            TaskEvent.COMPLETE,
            now,
            lease=agreed.lease,
            node_id=agreed.node_id,
            volunteer=agreed.volunteer,
            result=agreed.result,
            cpu_seconds=agreed.cpu_seconds,
            wall_seconds=agreed.wall_seconds,
            files=agreed.files,
            credits=tuple(credits),
        )

    def _fail_unagreed(self, task: TaskRec, project: ProjectInfo, now: float) -> None:
        """F: the bound of results is reached and no group of them agrees."""
        error = describe_disagreement(task.pending, project.quorum, project.tolerance, self.trusted)
        last = task.pending[-1]
        self._end_replicas(task, "task failed", "task failed elsewhere", now)
        self._close(  # every pending result: unresolved
            task,
            TaskEvent.GIVE_UP,
            now,
            lease=last.lease,
            node_id=last.node_id,
            volunteer=last.volunteer,
            error=error,
            credits=(),
        )

    def _wrong_answer(
        self, task: TaskRec, lease: LeaseRec, volunteer: str, event: ResultReceived
    ) -> None:
        """A spot check failed: the result is refused, the task runs again elsewhere, and
        the volunteer is distrusted, its results still waiting elsewhere discarded."""
        now = event.now
        self._distrust(volunteer, now)
        if volunteer:
            task.rejected.add(volunteer)  # it goes to other volunteers from now on
        if event.lease in self.leases:
            self._drop_lease(event.lease, LeaseOutcome.REJECTED, NOT_ACCEPTED, now)
            if not lease.accepted:
                task.attempts += 1
            self._give_up_or_retry(task, lease, LeaseOutcome.REJECTED, NOT_ACCEPTED, now)
        else:
            # A late answer: it is the lease's one result all the same (no second try at
            # the known answer), recorded with the lease so that a restart knows it too.
            detail = f"{NOT_ACCEPTED}, after the lease ended ({lease.outcome})"
            lease.outcome = LeaseOutcome.REJECTED
            self._out.append(LeaseResultRefused(lease.id, detail, now))
            self._leave_main_queue(task)  # the task may wait for anyone
            self._queue(task)
        self._ack(event, False, NOT_ACCEPTED)

    def _leave_main_queue(self, task: TaskRec) -> None:
        """A task waiting in its project's queue that is no longer for every volunteer
        (a result pending, an answer refused) waits among the replicas instead."""
        if task.queued == IN_QUEUE:
            self._mark_stale(task.pk)  # its entry there is skipped
            task.queued = NOT_QUEUED

    def _judge(self, volunteer: str, agreed: bool) -> None:
        """Count an agreement or a disagreement of the volunteer's; trust follows."""
        if not volunteer:
            return  # a node whose volunteer this run has not heard of: nobody to judge
        if not agreed:
            self.untrusted[volunteer] = 0
            self._out.append(TrustChanged(volunteer, 0, 1, False, 0))
            return
        streak = self.untrusted.get(volunteer)
        if streak is None:
            self._out.append(TrustChanged(volunteer, 1, 0, True, 0))
        elif streak + 1 >= TRUST_AFTER:
            del self.untrusted[volunteer]
            self._out.append(TrustChanged(volunteer, 1, 0, True, 0))
        else:
            self.untrusted[volunteer] = streak + 1
            self._out.append(TrustChanged(volunteer, 1, 0, False, streak + 1))

    def _distrust(self, volunteer: str, now: float) -> None:
        """The volunteer answered a known-answer task wrongly: it is distrusted, and its
        results that wait for agreement elsewhere are discarded (replicas replace them).
        Tasks already finished stay finished: the outbox has them once and for all."""
        self._judge(volunteer, agreed=False)
        if not volunteer:
            return
        for pk in sorted(self.pending_tasks.get(volunteer, ())):
            task = self.tasks[pk]
            dropped = [p for p in task.pending if p.volunteer == volunteer and not p.verified]
            if not dropped:
                continue
            task.pending = [p for p in task.pending if p not in dropped]
            for rec in dropped:
                self._out.append(ResultJudged(rec.lease, Verdict.DISCARDED))
            if not any(p.volunteer == volunteer for p in task.pending):
                self._unindex(volunteer, pk)
            if not task.pending:
                task.target = 0  # back to its project's quorum
            else:
                project = self.projects[task.project_id]
                agreement = self._agreement(task, project)
                if agreement.group is not None:
                    self._complete_agreed(task, project, agreement.group, now)
                    continue
                self._retarget(task, agreement.largest)
            self._queue(task)

    def _unindex(self, volunteer: str, pk: int) -> None:
        tasks = self.pending_tasks.get(volunteer)
        if tasks is not None:
            tasks.discard(pk)
            if not tasks:
                del self.pending_tasks[volunteer]
