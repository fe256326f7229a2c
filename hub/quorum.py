"""Comparing replicas' results: when two results agree, and which group of them wins.

Pure functions over ``PendingRec`` (a successful result waiting for agreement). The
rules, decided in docs/design.md ("Quorum, trust and spot checks"):

- Two results agree when their output files are the same (name, SHA-256 and size) and
  their values are equal: as canonical JSON text by default (so a map's key order does
  not matter, and ``1`` is not ``1.0``), or, where the project declares ``tolerance: X``,
  numbers (int or float, never bool) within ``X * max(1, |a|, |b|)`` of each other,
  lists and maps compared item by item, anything else exactly.
- A task is agreed when a group of its pending results agree pairwise, come from at
  least ``quorum`` distinct volunteers and hold at least one result of a trusted
  volunteer (or one checked against the task's known answer). The agreed result is the
  group's earliest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hub.changes import FileInfo


def canonical(value: Any) -> str:
    """The canonical JSON text of ``value``: sorted keys, no spaces, UTF-8 as is."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError, RecursionError):
        # Nothing a node can send (the hub checks every result's JSON digest), but the
        # scheduler must not fail on it: such a value agrees only with an identical repr.
        return "\0" + repr(value)


@dataclass(slots=True)
class PendingRec:
    """A successful result that waits for agreement, in memory (table pending_results)."""

    lease: int
    task_pk: int
    node_id: str
    volunteer: str
    result: Any
    files: tuple[FileInfo, ...]
    cpu_seconds: float  # as credited (capped by the project's wall-time limit)
    wall_seconds: float
    at: float
    verified: bool = False  # matched the task's known answer
    canon: str = field(default="", compare=False, repr=False)
    file_key: tuple[tuple[str, str, int], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        self.canon = canonical(self.result)
        self.file_key = tuple(sorted((f.name, f.sha256, f.size) for f in self.files))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def values_agree(a: Any, b: Any, tolerance: float) -> bool:
    """``a`` and ``b`` agree within a relative ``tolerance`` (see the module's rules)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if _is_number(x) and _is_number(y):
            fx, fy = float(x), float(y)
            if not (math.isfinite(fx) and math.isfinite(fy)):
                if fx != fy:
                    return False
                continue
            if abs(fx - fy) > tolerance * max(1.0, abs(fx), abs(fy)):
                return False
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif type(x) is not type(y) or x != y:
            return False
    return True


def answer_agrees(value: Any, expected: Any, tolerance: float | None) -> bool:
    """A result's value against a known answer (spot checks); files are not compared."""
    if tolerance is None:
        return canonical(value) == canonical(expected)
    return values_agree(value, expected, tolerance)


def agree(a: PendingRec, b: PendingRec, tolerance: float | None) -> bool:
    """Two results agree: the same output files, and values equal (within tolerance)."""
    if a.file_key != b.file_key:
        return False
    if a.canon == b.canon:
        return True
    return tolerance is not None and values_agree(a.result, b.result, tolerance)


@dataclass(frozen=True, slots=True)
class Agreement:
    """The outcome of looking for agreement among a task's pending results."""

    group: tuple[PendingRec, ...] | None  # the winning group, earliest result first
    largest: int  # distinct volunteers in the largest group of agreeing results


def find_agreement(
    pending: Sequence[PendingRec],
    quorum: int,
    tolerance: float | None,
    trusted: Callable[[str], bool],
    known_answer: bool = False,
) -> Agreement:
    """The group of pending results that settles the task, if there is one.

    ``pending`` is in arrival order. With a known answer every pending result matched it
    already (a wrong one is never pending), so they all agree. Otherwise each result in
    turn anchors a group of the results that agree with every member so far (pairwise,
    greedily, in arrival order); the valid group with the most distinct volunteers wins,
    the earliest anchor breaking ties. A handful of results per task: O(n^3) is nothing.
    """
    if known_answer:
        volunteers = {p.volunteer for p in pending}
        group = tuple(pending) if pending and len(volunteers) >= quorum else None
        return Agreement(group, len(volunteers))
    best: tuple[PendingRec, ...] | None = None
    best_size = 0
    largest = 0
    for anchor in pending:
        members = [anchor]
        for other in pending:
            if other is not anchor and all(agree(other, m, tolerance) for m in members):
                members.append(other)
        size = len({m.volunteer for m in members})
        largest = max(largest, size)
        valid = size >= quorum and any(m.verified or trusted(m.volunteer) for m in members)
        if valid and size > best_size:
            order = {id(p): i for i, p in enumerate(pending)}
            best = tuple(sorted(members, key=lambda m: order[id(m)]))
            best_size = size
    return Agreement(best, largest)


def distinct_values(pending: Sequence[PendingRec], tolerance: float | None) -> int:
    """How many different answers the results hold (each joins the first it agrees with)."""
    firsts: list[PendingRec] = []
    for p in pending:
        if not any(agree(p, f, tolerance) for f in firsts):
            firsts.append(p)
    return len(firsts)


def describe_disagreement(
    pending: Sequence[PendingRec],
    quorum: int,
    tolerance: float | None,
    trusted: Callable[[str], bool],
) -> str:
    """The error of a task that failed without agreement: results, values, volunteers."""
    volunteers = sorted({p.volunteer or "?" for p in pending})
    values = distinct_values(pending, tolerance)
    untrusted = sorted({p.volunteer or "?" for p in pending if not trusted(p.volunteer)})
    text = (
        f"no agreement after {len(pending)} results (quorum {quorum}): "
        f"{values} distinct value{'s' if values != 1 else ''} from volunteers "
        f"{', '.join(volunteers)}"
    )
    if untrusted:
        text += f"; not trusted: {', '.join(untrusted)}"
    return text
