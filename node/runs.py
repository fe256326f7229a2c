"""What both executors share: the request and outcome of a run, the ``Executor`` protocol,
strict JSON on the way in and out, and the registry of runs in flight.

``node.executor`` (mode ``process`` and ``make_executor``) and ``node.persistent`` (mode
``persistent``) build on this module; callers import these names from ``node.executor``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from issc.errors import ExecutionError
from issc.manifest import Limits
from node.taskfiles import (
    OutputFile,
    collect_outputs,
    output_limit_reached,
    reset_task_dirs,
    stage_inputs,
)

CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run of one task: what to run, on which input, under which limits."""

    lease: int  # unique id of this run
    task_id: str
    input: Any  # JSON value
    bundle_dir: Path  # extracted, verified, read-only project files
    entrypoint: tuple[str, ...]
    limits: Limits
    # name -> checked file in the node's cache; copied read-only to in/NAME before the run
    input_files: Mapping[str, Path] = field(default_factory=dict)
    # where a successful run's out/ files are moved; None: out/ is not collected
    output_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended. ``result`` is None and ``error`` says why when ``ok`` is False;
    ``output_files`` (in the request's ``output_dir``) only come with success."""

    ok: bool
    result: Any  # JSON value
    error: str | None
    cpu_seconds: float
    wall_seconds: float
    output_files: tuple[OutputFile, ...] = ()


class Executor(Protocol):
    """Runs tasks; the node client holds one per execution mode."""

    async def run(self, request: RunRequest) -> RunOutcome:
        """Run one task to its end. Raises ExecutionError only for misuse."""
        ...

    async def cancel(self, lease: int) -> bool:
        """Kill the run of ``lease`` (its run() returns error "cancelled"); False if unknown."""
        ...

    async def close(self) -> None:
        """Kill every run and process this executor started."""
        ...


def decode_json(data: bytes) -> Any:
    """Parse strict JSON from UTF-8 bytes (no NaN or Infinity).

    Raises ValueError if it is not valid JSON.
    """
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def encode_input(value: Any) -> str:
    """One line of strict JSON. Raises ExecutionError if ``value`` is not a JSON value."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ExecutionError(f"task input is not a JSON value: {exc}") from exc


def with_stderr(reason: str, tail: bytes) -> str:
    """``reason`` followed by the stderr tail, if there is one."""
    text = tail.decode("utf-8", errors="replace").strip()
    return f"{reason}: {text}" if text else reason


def wall_exceeded(limits: Limits) -> str:
    """The error of a run stopped at its wall time limit."""
    return f"wall time limit of {limits.wall_seconds:g} s exceeded"


def failure(error: str, cpu: float = 0.0, wall: float = 0.0) -> RunOutcome:
    """A failed run's outcome."""
    return RunOutcome(ok=False, result=None, error=error, cpu_seconds=cpu, wall_seconds=wall)


async def stage_task_files(
    scratch: Path, request: RunRequest, *, reset: bool, owner: tuple[int, int] | None = None
) -> str | None:
    """Copy the request's input files into ``<scratch>/in/`` (emptying ``in/`` and ``out/``
    first if ``reset``: a persistent worker's previous task left them; made again owned by
    ``owner``, the task uid of a root node). Returns None, or why the task cannot run.
    Both steps share one thread hop; with nothing to do there is none."""

    def stage() -> None:
        if reset:
            reset_task_dirs(scratch, owner)
        if request.input_files:
            stage_inputs(scratch, request.input_files)

    if not reset and not request.input_files:
        return None
    try:
        await asyncio.to_thread(stage)
    except (OSError, ValueError) as exc:
        return f"cannot put the input files in place: {exc}"
    return None


async def with_outputs(outcome: RunOutcome, scratch: Path, request: RunRequest) -> RunOutcome:
    """``outputs_of`` in a worker thread (none is needed without an ``output_dir``)."""
    if request.output_dir is None:
        return outcome
    return await asyncio.to_thread(outputs_of, outcome, scratch, request)


def outputs_of(outcome: RunOutcome, scratch: Path, request: RunRequest) -> RunOutcome:
    """A successful outcome with the files of ``<scratch>/out/`` moved to the request's
    ``output_dir``, or a failure saying why they break the rules. A failure comes back
    with its error prefixed by the output_mb limit where ``out/`` shows the run reached it
    (``output_limit_reached``); requests without ``output_dir`` come back unchanged.
    Blocking (it copies and hashes files): call it from a worker thread."""
    if request.output_dir is None:
        return outcome
    if not outcome.ok:
        note = output_limit_reached(scratch, request.limits.output_mb)
        if note is None:
            return outcome
        return replace(outcome, error=f"{note}; {outcome.error}" if outcome.error else note)
    cpu, wall = outcome.cpu_seconds, outcome.wall_seconds
    try:
        files = collect_outputs(scratch, request.output_dir, request.limits.output_mb)
    except ValueError as exc:
        return failure(str(exc), cpu, wall)
    except OSError as exc:
        return failure(f"cannot collect the output files: {exc}", cpu, wall)
    return replace(outcome, output_files=files)


class Run:
    """One registered run: why it was stopped, if it was, and how to stop what it runs."""

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self._killer: Callable[[], None] | None = None

    def attach(self, killer: Callable[[], None]) -> None:
        """From now on, stopping this run calls ``killer``; at once if already stopped."""
        self._killer = killer
        if self.stop_reason is not None:
            killer()

    def detach(self) -> None:
        self._killer = None

    def stop(self, reason: str) -> None:
        """Record why the run ends (the first reason wins) and kill what it runs."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._killer is not None:
            self._killer()


class RunRegistry:
    """The leases in flight, so that cancel() and close() can reach them."""

    def __init__(self) -> None:
        self._runs: dict[int, Run] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    def open(self, lease: int) -> Run:
        """Register a run. Raises ExecutionError if closed or the lease is already running."""
        if self.closed:
            raise ExecutionError("the executor is closed")
        if lease in self._runs:
            raise ExecutionError(f"lease {lease} is already running")
        run = self._runs[lease] = Run()
        self._idle.clear()
        return run

    def finish(self, lease: int) -> None:
        self._runs.pop(lease, None)
        if not self._runs:
            self._idle.set()

    def cancel(self, lease: int) -> bool:
        run = self._runs.get(lease)
        if run is None:
            return False
        run.stop(CANCELLED)
        return True

    async def close(self) -> None:
        """Refuse new runs, stop every run, and wait until each has cleaned up."""
        self.closed = True
        for run in list(self._runs.values()):
            run.stop(CANCELLED)
        await self._idle.wait()
