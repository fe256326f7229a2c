"""The task lifecycle as one table: every legal (state, event) -> next state.

States are the contract's: NA (waiting), TA (offered), A (leased), C (completed),
F (failed), X (cancelled). Anything not in the table is illegal and raises
IllegalTransition naming the state and the event, so a scheduler bug cannot silently
move a task somewhere it should never be.
"""

from __future__ import annotations

from enum import StrEnum

from issc.errors import IsscError


class TaskState(StrEnum):
    NA = "NA"
    TA = "TA"
    A = "A"
    C = "C"
    F = "F"
    X = "X"


FINAL_STATES = frozenset({TaskState.C, TaskState.F, TaskState.X})


class TaskEvent(StrEnum):
    OFFER = "offer"  # the hub offers the task to a node
    ACCEPT = "accept"  # the node confirms the offer; an attempt is counted
    OFFER_EXPIRED = "offer_expired"  # no accept within offer_timeout
    DECLINE = "decline"  # the node gives the lease back (no attempt counted)
    LEASE_LOST = "lease_lost"  # heartbeats missed, bundle refused, or code error: retry
    GIVE_UP = "give_up"  # attempts used up, or the code failed deterministically
    COMPLETE = "complete"  # a result was accepted (possibly late, from an earlier lease)
    CANCEL = "cancel"  # the owner or an admin cancelled it
    # Replicas (quorum > 1, or a result that must be confirmed): a task may hold several
    # live leases at once and keep successful results pending until enough agree.
    REPLICA_END = "replica_end"  # one lease ended; the task's other leases stay as they were
    LAST_ACCEPTED_END = "last_accepted_end"  # the last accepted lease ended; offers remain
    RESULT_PENDING = "result_pending"  # a result waits for agreement; no lease is live


TRANSITIONS: dict[tuple[TaskState, TaskEvent], TaskState] = {
    (TaskState.NA, TaskEvent.OFFER): TaskState.TA,
    (TaskState.TA, TaskEvent.ACCEPT): TaskState.A,
    (TaskState.TA, TaskEvent.OFFER_EXPIRED): TaskState.NA,
    (TaskState.TA, TaskEvent.DECLINE): TaskState.NA,
    (TaskState.TA, TaskEvent.LEASE_LOST): TaskState.NA,
    (TaskState.TA, TaskEvent.GIVE_UP): TaskState.F,
    (TaskState.A, TaskEvent.DECLINE): TaskState.NA,
    (TaskState.A, TaskEvent.LEASE_LOST): TaskState.NA,
    (TaskState.A, TaskEvent.GIVE_UP): TaskState.F,
    # A late result from an earlier lease may complete a task that was requeued or re-offered.
    (TaskState.NA, TaskEvent.COMPLETE): TaskState.C,
    (TaskState.TA, TaskEvent.COMPLETE): TaskState.C,
    (TaskState.A, TaskEvent.COMPLETE): TaskState.C,
    (TaskState.NA, TaskEvent.CANCEL): TaskState.X,
    (TaskState.TA, TaskEvent.CANCEL): TaskState.X,
    (TaskState.A, TaskEvent.CANCEL): TaskState.X,
    # Replicas: another lease of a task that has some already (never for quorum 1 with a
    # trusted volunteer). A is "at least one live lease accepted", TA "live leases, none
    # accepted", NA "no live lease" (pending results or not).
    (TaskState.TA, TaskEvent.OFFER): TaskState.TA,
    (TaskState.A, TaskEvent.OFFER): TaskState.A,
    (TaskState.A, TaskEvent.ACCEPT): TaskState.A,
    (TaskState.TA, TaskEvent.REPLICA_END): TaskState.TA,
    (TaskState.A, TaskEvent.REPLICA_END): TaskState.A,
    (TaskState.A, TaskEvent.LAST_ACCEPTED_END): TaskState.TA,
    (TaskState.NA, TaskEvent.RESULT_PENDING): TaskState.NA,
    (TaskState.TA, TaskEvent.RESULT_PENDING): TaskState.NA,
    (TaskState.A, TaskEvent.RESULT_PENDING): TaskState.NA,
    # Replicas that never agreed, up to the bound (a late result may be the last one).
    (TaskState.NA, TaskEvent.GIVE_UP): TaskState.F,
}


class IllegalTransition(IsscError):
    """A task was asked to take an event its state does not allow."""

    def __init__(self, state: TaskState, event: TaskEvent) -> None:
        super().__init__(f"task in state {state} cannot take event {event}")
        self.state = state
        self.event = event


def next_state(state: TaskState, event: TaskEvent) -> TaskState:
    """The state after ``event``; raises IllegalTransition if the table has no entry."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def transition_table_markdown() -> str:
    """The table as Markdown, so docs/protocol.md can be checked against the code."""
    rows = ["| state | event | next state |", "|---|---|---|"]
    rows += [f"| {s} | {e} | {n} |" for (s, e), n in TRANSITIONS.items()]
    return "\n".join(rows)
