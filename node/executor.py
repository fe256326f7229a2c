"""Run one task of a verified project bundle: a fresh process per task, or a long-lived one.

Two executors implement the same small interface (``Executor``):

* ``ProcessExecutor`` (mode ``process``): each run gets ``<scratch_root>/<lease>`` as a
  fresh cwd (removed afterwards) holding ``input.json``, ``tmp/``, ``in/`` (the task's
  input files, read-only copies) and ``out/``; the input also arrives on stdin. The
  result is ``result.json`` if the program wrote one (it must be valid JSON), else
  stdout: JSON if it parses, else the text with one trailing newline stripped. Exit
  status 0 is success; anything else fails with the status or signal and the last 2 KiB
  of stderr. stdout and stderr go to files the executor keeps open, so their size is
  bounded by RLIMIT_FSIZE and only ``output_mb`` of stdout is ever read.
  After a success, the files left in ``out/`` are checked and moved to the request's
  ``output_dir`` (``node.taskfiles``); breaking the rules there fails the task.
* ``PersistentExecutor`` (mode ``persistent``, in ``node.persistent``): a pool of
  long-lived processes per (bundle_dir, entrypoint), one task at a time each, fed one JSON
  line per task.

Task-level failures never raise: ``run`` returns ``RunOutcome(ok=False, error=...)``.
``ExecutionError`` is raised only for misuse: a lease already running, a closed executor,
an input that is not JSON.

This module holds process mode and ``make_executor``. What both modes share (RunRequest,
RunOutcome, the Executor protocol, strict JSON, the run registry) lives in ``node.runs``;
those names, and ``PersistentExecutor``, can still be imported from here. How a process is
launched and confined lives in ``node.sandbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from issc.errors import ExecutionError
from issc.manifest import Limits
from node.persistent import PersistentExecutor
from node.runs import (
    CANCELLED,
    Executor,
    Run,
    RunOutcome,
    RunRegistry,
    RunRequest,
    decode_json,
    encode_input,
    failure,
    stage_task_files,
    wall_exceeded,
    with_outputs,
    with_stderr,
)
from node.sandbox import (
    MIB,
    STDERR_TAIL_BYTES,
    Sandbox,
    build_launch,
    default_sandbox,
    describe_exit,
    forget_child,
    fresh_scratch,
    kill_group,
    limit_setter,
    popen_identity,
    record_namespace,
    remove_tree,
    spawning,
    sweep_orphans,
)

__all__ = [
    "CANCELLED",
    "INPUT_FILE",
    "RESULT_FILE",
    "Executor",
    "PersistentExecutor",
    "ProcessExecutor",
    "RunOutcome",
    "RunRequest",
    "decode_json",
    "encode_input",
    "make_executor",
]

RESULT_FILE = "result.json"
INPUT_FILE = "input.json"
# Not part of the contract. The executor reads them through the fds it opened, so a program
# that replaces them (with a symlink to a node secret, say) cannot make it read anything else.
_STDOUT_FILE = ".issc-stdout"
_STDERR_FILE = ".issc-stderr"


def make_executor(
    mode: str, scratch_root: Path, slots: int, sandbox: Sandbox | None = None
) -> Executor:
    """The executor for a bundle's execution mode; ``slots`` bounds persistent processes.
    ``sandbox`` defaults to the node's (``default_sandbox``: bubblewrap where installed).

    Raises ExecutionError for an unknown mode.
    """
    sandbox = sandbox or default_sandbox()
    if mode == "process":
        return ProcessExecutor(scratch_root, sandbox)
    if mode == "persistent":
        return PersistentExecutor(scratch_root, max_processes=slots, sandbox=sandbox)
    raise ExecutionError(f"unknown execution mode {mode!r}")


# ----------------------------------------------------------------------- process mode


class _Child:
    """A task process, reaped by a thread of its own so that its rusage is exact.

    asyncio's child watchers discard rusage, and a busy node's thread pool must not be
    tied up by long waits, hence one plain thread per child.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        loop: asyncio.AbstractEventLoop,
        namespace_root: Path | None = None,
    ) -> None:
        self.popen = popen
        self._namespace_root = namespace_root  # where its bwrap namespace is recorded, if so
        self.exited: asyncio.Future[tuple[int, float]] = loop.create_future()
        self._lock = threading.Lock()
        self._reaped = False
        thread = threading.Thread(
            target=self._reap, args=(loop,), name=f"issc-reap-{popen.pid}", daemon=True
        )
        thread.start()

    def kill(self) -> None:
        """SIGKILL the child's whole process group, unless the child is already reaped."""
        # Under the lock the reaper cannot reap in between, so the pid is still ours.
        with self._lock:
            if not self._reaped:
                kill_group(self.popen.pid)

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        pid = self.popen.pid
        root = self._namespace_root
        record = record_namespace(root, pid) if root is not None else None
        try:
            if hasattr(os, "waitid"):
                # Wait without reaping: while the child is a zombie its pid, and so its
                # group id, cannot be reused, and killing the group hits only its own.
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            with self._lock:
                kill_group(pid)  # background children die with the run
                _pid, status, usage = os.wait4(pid, 0)
                self._reaped = True
                forget_child(pid)
            outcome = (os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime)
        except OSError:  # ChildProcessError: someone else reaped it; status and rusage are lost
            outcome = (-signal.SIGKILL, 0.0)
        if record is not None:
            record.unlink(missing_ok=True)  # the namespace ended with bwrap
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(self._deliver, outcome)

    def _deliver(self, outcome: tuple[int, float]) -> None:
        self.popen.returncode = outcome[0]  # so Popen never tries to reap it again
        if not self.exited.done():
            self.exited.set_result(outcome)


@dataclass(slots=True)
class _Streams:
    """The files a task process reads and writes, held open by the executor."""

    stdin: IO[bytes]
    stdout: IO[bytes]
    stderr: IO[bytes]

    def close(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()


class ProcessExecutor:
    """Mode ``process``: one fresh, sandboxed process per task.

    ``sandbox`` defaults to ``Sandbox()``: rlimits and a scrubbed environment only.
    """

    def __init__(self, scratch_root: Path, sandbox: Sandbox | None = None) -> None:
        self._scratch_root = scratch_root
        self._sandbox = sandbox or Sandbox()
        self._runs = RunRegistry()

    async def run(self, request: RunRequest) -> RunOutcome:
        """Run one task in its own process.

        Raises ExecutionError if the lease is already running, the executor is closed or
        the input is not a JSON value; every task-level failure is an outcome instead.
        """
        payload = encode_input(request.input)
        run = self._runs.open(request.lease)
        try:
            return await self._run(request, payload, run)
        finally:
            self._runs.finish(request.lease)

    async def cancel(self, lease: int) -> bool:
        """Kill the run of ``lease``; its run() returns error "cancelled". False if unknown."""
        return self._runs.cancel(lease)

    async def close(self) -> None:
        """Kill every run and wait for their scratch directories to be removed."""
        await self._runs.close()

    async def _run(self, request: RunRequest, payload: str, run: Run) -> RunOutcome:
        scratch = self._scratch_root / str(request.lease)
        started = time.monotonic()
        problem = await self._prepare(scratch, request)
        if problem is not None:
            await asyncio.to_thread(remove_tree, scratch)
            return failure(problem)
        try:
            child, streams = self._start(request, payload, scratch)
        except (ExecutionError, OSError, ValueError, subprocess.SubprocessError) as exc:
            await asyncio.to_thread(remove_tree, scratch)
            return failure(f"cannot start the task: {exc}")
        run.attach(child.kill)
        try:
            returncode, cpu = await self._wait(child, request.limits, run)
            wall = time.monotonic() - started
            if run.stop_reason is not None:
                return failure(run.stop_reason, cpu, wall)
            if returncode != 0:
                tail = _tail(streams.stderr, STDERR_TAIL_BYTES)
                reason = with_stderr(describe_exit(returncode, request.limits), tail)
                cap = _stream_cap_reached(streams, request.limits)
                if cap is not None:
                    reason = f"{cap}; {reason}"
                return await with_outputs(failure(reason, cpu, wall), scratch, request)
            result, error = await asyncio.to_thread(
                _collect_result, scratch, streams.stdout, request.limits
            )
            if error is not None:
                return failure(error, cpu, wall)
            return await with_outputs(RunOutcome(True, result, None, cpu, wall), scratch, request)
        finally:
            run.detach()
            child.kill()  # a no-op after a normal exit; essential if run() itself was cancelled
            streams.close()
            await asyncio.shield(child.exited)
            await asyncio.to_thread(remove_tree, scratch)
            await asyncio.to_thread(sweep_orphans)  # setsid'd descendants, without bwrap

    async def _prepare(self, scratch: Path, request: RunRequest) -> str | None:
        """Make a fresh scratch dir with the input files in ``in/``; None, or why not."""

        def make() -> None:
            self._scratch_root.mkdir(parents=True, exist_ok=True)
            fresh_scratch(scratch, self._sandbox)

        try:
            await asyncio.to_thread(make)
        except OSError as exc:
            return f"cannot start the task: {exc}"
        return await stage_task_files(scratch, request, reset=False)

    def _start(self, request: RunRequest, payload: str, scratch: Path) -> tuple[_Child, _Streams]:
        """Write input.json into the prepared scratch dir and spawn the task process.

        Raises ExecutionError if the entrypoint cannot be resolved, OSError, ValueError (a
        NUL in an argument) or SubprocessError if the process cannot be made.
        """
        (scratch / INPUT_FILE).write_text(payload, encoding="utf-8")
        launch = build_launch(
            request.entrypoint, request.bundle_dir, scratch, request.task_id, self._sandbox
        )
        who = popen_identity(self._sandbox)
        streams = _Streams(
            stdin=open(scratch / INPUT_FILE, "rb"),  # noqa: SIM115 - closed by _Streams.close
            stdout=open(scratch / _STDOUT_FILE, "w+b"),  # noqa: SIM115
            stderr=open(scratch / _STDERR_FILE, "w+b"),  # noqa: SIM115
        )
        try:
            with spawning() as register:
                popen = subprocess.Popen(
                    launch.argv,
                    stdin=streams.stdin,
                    stdout=streams.stdout,
                    stderr=streams.stderr,
                    cwd=launch.cwd,
                    env=dict(launch.env),
                    start_new_session=True,
                    user=who.user,
                    group=who.group,
                    extra_groups=who.extra_groups,
                    preexec_fn=limit_setter(request.limits, limit_cpu=True, sandbox=self._sandbox),
                )
                register(popen.pid)
        except BaseException:
            streams.close()
            raise
        namespace_root = self._scratch_root if self._sandbox.bwrap else None
        return _Child(popen, asyncio.get_running_loop(), namespace_root), streams

    @staticmethod
    async def _wait(child: _Child, limits: Limits, run: Run) -> tuple[int, float]:
        """Wait for the child to exit, killing its group when the wall limit passes."""
        try:
            return await asyncio.wait_for(asyncio.shield(child.exited), limits.wall_seconds)
        except TimeoutError:
            run.stop(wall_exceeded(limits))
            return await asyncio.shield(child.exited)


def _stream_cap_reached(streams: _Streams, limits: Limits) -> str | None:
    """Which of stdout/stderr ran into the output_mb cap (RLIMIT_FSIZE), if one did."""
    for name, stream in (("stdout", streams.stdout), ("stderr", streams.stderr)):
        if os.fstat(stream.fileno()).st_size >= limits.output_mb * MIB:
            return f"{name} reached the output_mb limit of {limits.output_mb} MiB"
    return None


def _tail(stream: IO[bytes], size: int) -> bytes:
    """The last ``size`` bytes of a file the executor holds open."""
    end = os.fstat(stream.fileno()).st_size
    return os.pread(stream.fileno(), size, max(0, end - size))


def _collect_result(scratch: Path, stdout: IO[bytes], limits: Limits) -> tuple[Any, str | None]:
    """The result of a successful run: result.json if written, else stdout.

    Returns (result, None), or (None, why the output is unusable).
    """
    limit = limits.output_mb * MIB
    try:
        data = _read_result_file(scratch / RESULT_FILE, limit, limits.output_mb)
    except ValueError as exc:
        return None, str(exc)
    if data is not None:
        try:
            return decode_json(data), None
        except ValueError as exc:
            return None, f"{RESULT_FILE} is not valid JSON: {exc}"
    size = os.fstat(stdout.fileno()).st_size
    if size >= limit:  # RLIMIT_FSIZE stops it at the limit: a program that ignored that
        return None, f"stdout reached the output_mb limit of {limits.output_mb} MiB"
    raw = os.pread(stdout.fileno(), size, 0)
    try:
        return decode_json(raw), None
    except ValueError:
        text = raw.decode("utf-8", errors="replace")
        return text.removesuffix("\n").removesuffix("\r"), None


def _read_result_file(path: Path, limit: int, output_mb: int) -> bytes | None:
    """The bytes of result.json, or None if the program wrote none.

    Raises ValueError if it is not a regular file (a symlink to a node secret, a FIFO
    that would block) or larger than the output limit.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{RESULT_FILE} cannot be read: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{RESULT_FILE} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{RESULT_FILE} exceeds the output limit of {output_mb} MiB")
        return stream.read(limit + 1)
