"""Run one task of a verified project bundle: a fresh process per task, or a long-lived one.

Two executors implement the same small interface (``Executor``):

* ``ProcessExecutor`` (mode ``process``): each run gets ``<scratch_root>/<lease>`` as a
  fresh cwd (removed afterwards) holding ``input.json``, ``tmp/`` and ``out/``; the input
  also arrives on stdin. The result is ``result.json`` if the program wrote one (it must
  be valid JSON), else stdout: JSON if it parses, else the text with one trailing newline
  stripped. Exit status 0 is success; anything else fails with the status or signal and
  the last 2 KiB of stderr. stdout and stderr go to files the executor keeps open, so
  their size is bounded by RLIMIT_FSIZE and only ``output_mb`` of stdout is ever read.
* ``PersistentExecutor`` (mode ``persistent``): a pool of long-lived processes per
  (bundle_dir, entrypoint), each with its own scratch dir ``<scratch_root>/worker-<n>``
  and one task at a time: ``{"id": task_id, "input": ...}`` as one line on stdin, one
  line back, ``{"id": ..., "result": ...}`` or ``{"id": ..., "error": "..."}``. A process
  that dies, overruns the wall limit, is cancelled, or sends a malformed or oversized
  line is killed and replaced on the next task.

How a process is launched and confined lives in ``node.sandbox``. Task-level failures
never raise: ``run`` returns ``RunOutcome(ok=False, error=...)``. ``ExecutionError`` is
raised only for misuse: a lease already running, a closed executor, an input that is not
JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from issc.errors import ExecutionError
from issc.manifest import Limits
from node.sandbox import (
    MIB,
    STDERR_TAIL_BYTES,
    build_launch,
    describe_exit,
    fresh_scratch,
    kill_group,
    limit_setter,
    process_cpu_seconds,
    remove_tree,
)

CANCELLED = "cancelled"
RESULT_FILE = "result.json"
INPUT_FILE = "input.json"
# Not part of the contract. The executor reads them through the fds it opened, so a program
# that replaces them (with a symlink to a node secret, say) cannot make it read anything else.
_STDOUT_FILE = ".issc-stdout"
_STDERR_FILE = ".issc-stderr"
_MAX_PROGRAM_ERROR = 2048
_EXIT_GRACE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run of one task: what to run, on which input, under which limits."""

    lease: int  # unique id of this run
    task_id: str
    input: Any  # JSON value
    bundle_dir: Path  # extracted, verified, read-only project files
    entrypoint: tuple[str, ...]
    limits: Limits


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended. ``result`` is None and ``error`` says why when ``ok`` is False."""

    ok: bool
    result: Any  # JSON value
    error: str | None
    cpu_seconds: float
    wall_seconds: float


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


def make_executor(mode: str, scratch_root: Path, slots: int) -> Executor:
    """The executor for a bundle's execution mode; ``slots`` bounds persistent processes.

    Raises ExecutionError for an unknown mode.
    """
    if mode == "process":
        return ProcessExecutor(scratch_root)
    if mode == "persistent":
        return PersistentExecutor(scratch_root, max_processes=slots)
    raise ExecutionError(f"unknown execution mode {mode!r}")


# ---------------------------------------------------------------------------- helpers


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


def _with_stderr(reason: str, tail: bytes) -> str:
    """``reason`` followed by the stderr tail, if there is one."""
    text = tail.decode("utf-8", errors="replace").strip()
    return f"{reason}: {text}" if text else reason


def _wall_exceeded(limits: Limits) -> str:
    return f"wall time limit of {limits.wall_seconds:g} s exceeded"


def _failure(error: str, cpu: float = 0.0, wall: float = 0.0) -> RunOutcome:
    return RunOutcome(ok=False, result=None, error=error, cpu_seconds=cpu, wall_seconds=wall)


class _Run:
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


class _RunRegistry:
    """The leases in flight, so that cancel() and close() can reach them."""

    def __init__(self) -> None:
        self._runs: dict[int, _Run] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    def open(self, lease: int) -> _Run:
        """Register a run. Raises ExecutionError if closed or the lease is already running."""
        if self.closed:
            raise ExecutionError("the executor is closed")
        if lease in self._runs:
            raise ExecutionError(f"lease {lease} is already running")
        run = self._runs[lease] = _Run()
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


# ----------------------------------------------------------------------- process mode


class _Child:
    """A task process, reaped by a thread of its own so that its rusage is exact.

    asyncio's child watchers discard rusage, and a busy node's thread pool must not be
    tied up by long waits, hence one plain thread per child.
    """

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.popen = popen
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
        try:
            if hasattr(os, "waitid"):
                # Wait without reaping: while the child is a zombie its pid, and so its
                # group id, cannot be reused, and killing the group hits only its own.
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            with self._lock:
                kill_group(pid)  # background children die with the run
                _pid, status, usage = os.wait4(pid, 0)
                self._reaped = True
            outcome = (os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime)
        except OSError:  # ChildProcessError: someone else reaped it; status and rusage are lost
            outcome = (-signal.SIGKILL, 0.0)
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
    """Mode ``process``: one fresh, sandboxed process per task."""

    def __init__(self, scratch_root: Path) -> None:
        self._scratch_root = scratch_root
        self._runs = _RunRegistry()

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

    async def _run(self, request: RunRequest, payload: str, run: _Run) -> RunOutcome:
        scratch = self._scratch_root / str(request.lease)
        started = time.monotonic()
        try:
            child, streams = self._start(request, payload, scratch)
        except (ExecutionError, OSError, ValueError, subprocess.SubprocessError) as exc:
            await asyncio.to_thread(remove_tree, scratch)
            return _failure(f"cannot start the task: {exc}")
        run.attach(child.kill)
        try:
            returncode, cpu = await self._wait(child, request.limits, run)
            wall = time.monotonic() - started
            if run.stop_reason is not None:
                return _failure(run.stop_reason, cpu, wall)
            if returncode != 0:
                tail = _tail(streams.stderr, STDERR_TAIL_BYTES)
                reason = _with_stderr(describe_exit(returncode, request.limits), tail)
                return _failure(reason, cpu, wall)
            result, error = await asyncio.to_thread(
                _collect_result, scratch, streams.stdout, request.limits
            )
            if error is not None:
                return _failure(error, cpu, wall)
            return RunOutcome(True, result, None, cpu, wall)
        finally:
            run.detach()
            child.kill()  # a no-op after a normal exit; essential if run() itself was cancelled
            streams.close()
            await asyncio.shield(child.exited)
            await asyncio.to_thread(remove_tree, scratch)

    def _start(self, request: RunRequest, payload: str, scratch: Path) -> tuple[_Child, _Streams]:
        """Prepare the scratch dir and spawn the task process.

        Raises ExecutionError if the entrypoint cannot be resolved, OSError, ValueError (a
        NUL in an argument) or SubprocessError if the scratch dir or process cannot be made.
        """
        self._scratch_root.mkdir(parents=True, exist_ok=True)
        fresh_scratch(scratch)
        (scratch / INPUT_FILE).write_text(payload, encoding="utf-8")
        launch = build_launch(request.entrypoint, request.bundle_dir, scratch, request.task_id)
        streams = _Streams(
            stdin=open(scratch / INPUT_FILE, "rb"),  # noqa: SIM115 - closed by _Streams.close
            stdout=open(scratch / _STDOUT_FILE, "w+b"),  # noqa: SIM115
            stderr=open(scratch / _STDERR_FILE, "w+b"),  # noqa: SIM115
        )
        try:
            popen = subprocess.Popen(
                launch.argv,
                stdin=streams.stdin,
                stdout=streams.stdout,
                stderr=streams.stderr,
                cwd=launch.cwd,
                env=dict(launch.env),
                start_new_session=True,
                preexec_fn=limit_setter(request.limits, limit_cpu=True),
            )
        except BaseException:
            streams.close()
            raise
        return _Child(popen, asyncio.get_running_loop()), streams

    @staticmethod
    async def _wait(child: _Child, limits: Limits, run: _Run) -> tuple[int, float]:
        """Wait for the child to exit, killing its group when the wall limit passes."""
        try:
            return await asyncio.wait_for(asyncio.shield(child.exited), limits.wall_seconds)
        except TimeoutError:
            run.stop(_wall_exceeded(limits))
            return await asyncio.shield(child.exited)


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
    if size > limit:
        return None, f"stdout exceeds the output limit of {limits.output_mb} MiB"
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


# -------------------------------------------------------------------- persistent mode

_PoolKey = tuple[Path, tuple[str, ...]]


class _Worker:
    """One long-lived task process and what the executor knows about it."""

    def __init__(self, key: _PoolKey, proc: asyncio.subprocess.Process, scratch: Path) -> None:
        self.key = key
        self.proc = proc
        self.scratch = scratch
        self.busy = True
        self.stderr_tail = bytearray()
        # Drained all the time: a full stderr pipe would block the process mid-task.
        self._stderr_reader = asyncio.create_task(self._drain_stderr())

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        """SIGKILL the process group, unless the process is known to be gone."""
        if self.alive:
            kill_group(self.proc.pid)

    async def exit_reason(self, limits: Limits) -> str:
        """Why the process ended mid-task, with its stderr tail. Kills it if it lingers."""
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), _EXIT_GRACE_SECONDS)
        except TimeoutError:  # it closed stdout but kept running
            self.kill()
        returncode = await self.proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._stderr_reader), _EXIT_GRACE_SECONDS)
        reason = f"worker process ended ({describe_exit(returncode, limits)})"
        return _with_stderr(reason, bytes(self.stderr_tail))

    async def retire(self) -> None:
        """Kill the process, wait for it, and remove its scratch dir."""
        self.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await self.proc.wait()
        self._stderr_reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_reader
        await asyncio.to_thread(remove_tree, self.scratch)

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr_tail += chunk
            del self.stderr_tail[:-STDERR_TAIL_BYTES]  # only the tail is ever reported


class _ReplyError(Exception):
    """A reply line that breaks the persistent protocol; the process is not to be trusted."""


class PersistentExecutor:
    """Mode ``persistent``: long-lived processes, one task at a time each.

    At most ``max_processes`` processes exist at once, over all bundles; when a task
    needs a process for a bundle that has none free, an idle process of another bundle
    (an older version, typically) is retired to make room.
    """

    def __init__(self, scratch_root: Path, max_processes: int) -> None:
        """Raises ExecutionError if ``max_processes`` is below 1."""
        if max_processes < 1:
            raise ExecutionError(f"max_processes must be at least 1, not {max_processes}")
        self._scratch_root = scratch_root
        self._max_processes = max_processes
        self._runs = _RunRegistry()
        self._workers: list[_Worker] = []
        self._starting = 0
        self._changed = asyncio.Condition()
        self._retiring: set[asyncio.Task[None]] = set()
        self._serial = itertools.count(1)

    async def run(self, request: RunRequest) -> RunOutcome:
        """Run one task on a pooled process, starting one if needed.

        Raises ExecutionError if the lease is already running, the executor is closed or
        the input is not a JSON value; every task-level failure is an outcome instead.
        """
        line = encode_input({"id": request.task_id, "input": request.input}) + "\n"
        run = self._runs.open(request.lease)
        try:
            return await self._run(request, line.encode(), run)
        finally:
            self._runs.finish(request.lease)

    async def cancel(self, lease: int) -> bool:
        """Kill the run of ``lease`` (and its process); False if unknown."""
        return self._runs.cancel(lease)

    async def close(self) -> None:
        """Kill every run and every process, and remove their scratch dirs."""
        await self._runs.close()
        async with self._changed:
            workers, self._workers = self._workers, []
        await asyncio.gather(*(worker.retire() for worker in workers))
        await asyncio.gather(*self._retiring)

    async def _run(self, request: RunRequest, line: bytes, run: _Run) -> RunOutcome:
        acquiring = asyncio.ensure_future(self._acquire(request))

        def stop_acquiring() -> None:
            acquiring.cancel()

        run.attach(stop_acquiring)
        try:
            worker = await acquiring
        except asyncio.CancelledError:
            if run.stop_reason is None:
                raise  # run() itself was cancelled, not the lease
            return _failure(run.stop_reason)
        finally:
            run.detach()
        if isinstance(worker, str):
            return _failure(worker)
        if run.stop_reason is not None:  # cancelled just as a process became free
            await self._release(worker, reusable=True)
            return _failure(run.stop_reason)
        reusable = False
        try:
            outcome, reusable = await self._exchange(worker, request, line, run)
            return outcome
        finally:
            await self._release(worker, reusable)

    async def _exchange(
        self, worker: _Worker, request: RunRequest, line: bytes, run: _Run
    ) -> tuple[RunOutcome, bool]:
        """Send one task and read its reply. Returns the outcome and whether the process
        may take another task."""
        limits = request.limits
        run.attach(worker.kill)
        cpu_before = process_cpu_seconds(worker.proc.pid)
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(self._send(worker, line), limits.wall_seconds)
        except TimeoutError:
            run.stop(_wall_exceeded(limits))
            reply = None
        except _ReplyError as exc:
            run.stop(_malformed(exc, worker))
            reply = None
        finally:
            run.detach()
        wall = time.monotonic() - started
        cpu_after = process_cpu_seconds(worker.proc.pid)
        cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else 0.0
        if run.stop_reason is not None:
            return _failure(run.stop_reason, cpu, wall), False
        if reply is None:
            return _failure(await worker.exit_reason(limits), cpu, wall), False
        try:
            result, error = _parse_reply(reply, request.task_id)
        except _ReplyError as exc:  # _release kills the process: its output is out of step
            return _failure(_malformed(exc, worker), cpu, wall), False
        if error is not None:
            return _failure(error, cpu, wall), True
        return RunOutcome(True, result, None, cpu, wall), True

    @staticmethod
    async def _send(worker: _Worker, line: bytes) -> bytes | None:
        """Write one task line and read one reply line; None if the process went away.

        Raises _ReplyError if the reply line is too long.
        """
        assert worker.proc.stdin is not None and worker.proc.stdout is not None
        try:
            worker.proc.stdin.write(line)
            await worker.proc.stdin.drain()
            reply = await worker.proc.stdout.readline()
        except (BrokenPipeError, ConnectionResetError):
            return None
        except ValueError as exc:  # StreamReader's limit: the line is longer than output_mb
            raise _ReplyError("longer than the output limit") from exc
        # A line cut short by end of file means the process died while writing it.
        return reply if reply.endswith(b"\n") else None

    async def _acquire(self, request: RunRequest) -> _Worker | str:
        """An idle process for the request's bundle, started if needed; else why not."""
        key: _PoolKey = (request.bundle_dir, request.entrypoint)
        async with self._changed:
            while True:
                self._drop_dead()
                for idle in self._workers:
                    if idle.key == key and not idle.busy:
                        idle.busy = True
                        return idle
                if self._make_room():
                    self._starting += 1
                    break
                await self._changed.wait()
        worker: _Worker | None = None
        try:
            worker = await self._spawn(key, request)
            return worker
        except (ExecutionError, OSError, ValueError, subprocess.SubprocessError) as exc:
            return f"cannot start the task: {exc}"
        finally:
            async with self._changed:
                self._starting -= 1
                if worker is not None:
                    self._workers.append(worker)
                self._changed.notify_all()

    def _make_room(self) -> bool:
        """Whether one more process may start, retiring an idle one of any bundle if full."""
        if len(self._workers) + self._starting < self._max_processes:
            return True
        idle = next((worker for worker in self._workers if not worker.busy), None)
        if idle is None:
            return False
        self._workers.remove(idle)
        self._retire_later(idle)
        return True

    def _drop_dead(self) -> None:
        """Forget idle processes that died between tasks."""
        for worker in [w for w in self._workers if not w.busy and not w.alive]:
            self._workers.remove(worker)
            self._retire_later(worker)

    def _retire_later(self, worker: _Worker) -> None:
        task = asyncio.create_task(worker.retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _spawn(self, key: _PoolKey, request: RunRequest) -> _Worker:
        """Start a process for ``key`` in a scratch dir of its own.

        Raises ExecutionError, OSError, ValueError or SubprocessError if it cannot start.
        """
        scratch = self._scratch_root / f"worker-{next(self._serial)}"
        self._scratch_root.mkdir(parents=True, exist_ok=True)
        fresh_scratch(scratch)
        try:
            launch = build_launch(request.entrypoint, request.bundle_dir, scratch, None)
            proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=request.limits.output_mb * MIB,
                cwd=launch.cwd,
                env=dict(launch.env),
                start_new_session=True,
                preexec_fn=limit_setter(request.limits, limit_cpu=False),
            )
        except BaseException:
            await asyncio.to_thread(remove_tree, scratch)
            raise
        return _Worker(key, proc, scratch)

    async def _release(self, worker: _Worker, reusable: bool) -> None:
        """Return a process to its pool, or retire it if it cannot be trusted with more."""
        async with self._changed:
            keep = reusable and worker.alive and not self._runs.closed
            if keep:
                # Cleared here, not when a task starts, so that what a process wrote while
                # starting up (a traceback, say) reaches the first task's error.
                worker.stderr_tail.clear()
                worker.busy = False
            elif worker in self._workers:
                self._workers.remove(worker)
        if not keep:
            await asyncio.shield(worker.retire())
        async with self._changed:
            self._changed.notify_all()


def _malformed(exc: _ReplyError, worker: _Worker) -> str:
    return _with_stderr(f"malformed reply line: {exc}", bytes(worker.stderr_tail))


def _parse_reply(line: bytes, task_id: str) -> tuple[Any, str | None]:
    """(result, None) or (None, the program's error) from a reply line.

    Raises _ReplyError if the line is not a reply to this task.
    """
    try:
        reply = decode_json(line)
    except ValueError as exc:
        raise _ReplyError(f"not JSON ({exc}): {line[:80]!r}") from exc
    if not isinstance(reply, dict) or reply.get("id") != task_id:
        raise _ReplyError(f"not a reply to task {task_id!r}: {line[:80]!r}")
    error = reply.get("error")
    if error is not None:
        text = error if isinstance(error, str) else json.dumps(error)
        return None, text[:_MAX_PROGRAM_ERROR]
    if "result" not in reply:
        raise _ReplyError("neither result nor error")
    return reply["result"], None
