"""Failpoints for fault tests (fail-rs, FoundationDB's BUGGIFY): off unless asked for.

``ISSC_HUB_FAULTS``, read once when the hub starts (``configure_from_env``), names what
to do at which point, comma-separated ``point=action``::

    ISSC_HUB_FAULTS=store.before_commit=kill@40,outbox.after_fsync=delay@0.5

``kill@N`` logs one CRITICAL line naming the point and SIGKILLs the process the N-th time
the point is reached; ``enospc@N`` raises ``OSError(ENOSPC)`` there the N-th time;
``delay@SECONDS`` sleeps there every time. A point may carry several actions. The points
and where they are (each is one ``point(name)`` call):

- ``store.before_commit``: the scheduler's batch transaction, after its statements,
  before the commit (store thread);
- ``runtime.after_commit``: a batch committed, none of its messages sent (event loop:
  ``kill`` only, a sleep there would stop the whole hub);
- ``outbox.after_fsync``: result lines appended and fsynced, their length not recorded
  yet (store thread);
- ``upload.after_fsync``: an upload chunk written and fsynced, its ``upload_ack`` not
  sent yet (a worker thread).

Without the variable every point costs one truth test. For fault tests only: the chaos
harness (bench/chaos.py) and tests/unit/test_faults.py.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from issc.errors import ConfigError

ENV = "ISSC_HUB_FAULTS"
ActionKind = Literal["kill", "delay", "enospc"]
# Which actions each point takes: a blocking sleep only off the event loop.
POINTS: dict[str, frozenset[ActionKind]] = {
    "store.before_commit": frozenset({"kill", "delay", "enospc"}),
    "runtime.after_commit": frozenset({"kill"}),
    "outbox.after_fsync": frozenset({"kill", "delay", "enospc"}),
    "upload.after_fsync": frozenset({"kill", "delay", "enospc"}),
}
SYNTAX = "point=kill@N, point=enospc@N or point=delay@SECONDS, comma-separated"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Action:
    """What to do at a point: ``kill`` or ``enospc`` the ``nth`` time it is reached,
    ``delay`` for ``seconds`` every time."""

    kind: ActionKind
    nth: int = 0
    seconds: float = 0.0


# Armed points (empty: failpoints are off), and how often each was reached.
_armed: dict[str, tuple[Action, ...]] = {}
_reached: dict[str, int] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, tuple[Action, ...]]:
    """The actions per point of a spec; an empty spec arms nothing.

    Raises:
        ConfigError: the spec is malformed (the message names ``ISSC_HUB_FAULTS``).
    """
    armed: dict[str, list[Action]] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, action_text = (part.strip() for part in item.partition("="))
        if not eq or not name or not action_text:
            raise _error(item, f"not point=action ({SYNTAX})")
        if name not in POINTS:
            raise _error(item, f"unknown point {name!r} (known: {', '.join(sorted(POINTS))})")
        action = _parse_action(item, action_text)
        if action.kind not in POINTS[name]:
            allowed = ", ".join(sorted(POINTS[name]))
            raise _error(item, f"{name} takes only {allowed}")
        armed.setdefault(name, []).append(action)
    return {name: tuple(actions) for name, actions in armed.items()}


def _parse_action(item: str, text: str) -> Action:
    kind, at, value = text.partition("@")
    if not at or kind not in ("kill", "delay", "enospc"):
        raise _error(item, f"unknown action {text!r} ({SYNTAX})")
    if kind == "delay":
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            raise _error(item, f"delay@{value}: SECONDS must be a number >= 0")
        return Action("delay", seconds=seconds)
    if not value.isdigit() or int(value) < 1:
        raise _error(item, f"{kind}@{value}: N must be a whole number >= 1")
    return Action("kill" if kind == "kill" else "enospc", nth=int(value))


def _error(item: str, why: str) -> ConfigError:
    return ConfigError(f"{ENV}: {item!r}: {why}")


def configure(spec: str | None) -> None:
    """Arm the points of ``spec`` (None or empty: none), counting from zero again.

    Raises:
        ConfigError: the spec is malformed; nothing is armed then.
    """
    armed = parse(spec or "")
    with _lock:
        _reached.clear()
        _armed.clear()
        _armed.update(armed)
    if armed:
        log.warning(
            "failpoints armed (%s, for fault tests only): %s",
            ENV,
            ", ".join(f"{name}={_describe(a)}" for name, acts in armed.items() for a in acts),
        )


def configure_from_env(environ: Mapping[str, str] = os.environ) -> None:
    """Arm what ``ISSC_HUB_FAULTS`` says; once, when the hub starts.

    Raises:
        ConfigError: the variable is set and malformed.
    """
    configure(environ.get(ENV))


def armed() -> dict[str, tuple[Action, ...]]:
    """The armed points (a copy)."""
    with _lock:
        return dict(_armed)


def point(name: str) -> None:
    """A failpoint: nothing unless ``name`` is armed (one truth test when none is).

    Raises:
        OSError: ENOSPC, when an ``enospc@N`` action of ``name`` is due.
    """
    if _armed:
        _reach(name)


def _reach(name: str) -> None:
    with _lock:
        actions = _armed.get(name)
        if not actions:
            return
        count = _reached[name] = _reached.get(name, 0) + 1
    for action in actions:
        if action.kind == "delay":
            time.sleep(action.seconds)
        elif count == action.nth and action.kind == "kill":
            log.critical(
                "failpoint %s reached (%s, time %d): killing the process (SIGKILL)",
                name,
                _describe(action),
                count,
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            os._exit(128 + signal.SIGKILL)  # not reached
        elif count == action.nth and action.kind == "enospc":
            log.error("failpoint %s reached (%s): raising ENOSPC", name, _describe(action))
            raise OSError(errno.ENOSPC, f"No space left on device (failpoint {name})")


def _describe(action: Action) -> str:
    if action.kind == "delay":
        return f"delay@{action.seconds:g}"
    return f"{action.kind}@{action.nth}"
