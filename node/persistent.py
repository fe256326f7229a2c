"""Mode ``persistent``: a pool of long-lived task processes, one task at a time each.

The pool is keyed by (bundle_dir, entrypoint); each process gets its own scratch dir
``<scratch_root>/worker-<n>`` as its cwd and one task at a time: ``{"id": task_id,
"input": ...}`` as one line on stdin, one line back, ``{"id": ..., "result": ...}`` or
``{"id": ..., "error": "..."}``. A process that dies, overruns the wall limit, is
cancelled, or sends a malformed or oversized line is killed and replaced on the next task.

Files: the line carries no paths. Because a process has one task at a time, its cwd's
``in/`` and ``out/`` belong to the task in flight: before each line is sent they are
emptied and ``in/`` is filled with that task's input files (read-only copies); after a
successful reply what the process left in ``out/`` is collected as that task's output
files, and both are emptied again. A program should therefore finish writing ``out/``
before it answers, and read ``in/`` only between a task line and its answer.

As in ``node.executor``, task-level failures never raise: ``run`` returns
``RunOutcome(ok=False, error=...)``. How a process is launched and confined lives in
``node.sandbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from issc.errors import ExecutionError
from issc.manifest import Limits
from node.runs import (
    Run,
    RunOutcome,
    RunRegistry,
    RunRequest,
    decode_json,
    encode_input,
    failure,
    outputs_of,
    stage_task_files,
    wall_exceeded,
    with_stderr,
)
from node.sandbox import (
    MIB,
    STDERR_TAIL_BYTES,
    Sandbox,
    build_launch,
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
    task_owner,
    tree_cpu_seconds,
)
from node.taskfiles import reset_task_dirs, task_dirs_fresh

_MAX_PROGRAM_ERROR = 2048
_EXIT_GRACE_SECONDS = 1.0

_PoolKey = tuple[Path, tuple[str, ...]]


class _Worker:
    """One long-lived task process and what the executor knows about it."""

    def __init__(
        self,
        key: _PoolKey,
        proc: asyncio.subprocess.Process,
        scratch: Path,
        namespace: Path | None = None,
    ) -> None:
        self.key = key
        self.proc = proc
        self.scratch = scratch
        self.namespace = namespace  # its bubblewrap namespace's record (record_namespace)
        self.busy = True
        self.stderr_tail = bytearray()
        # tree_cpu_seconds at the end of its last task: the start of the next one's count.
        self.cpu_mark: float | None = None
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
        return with_stderr(reason, bytes(self.stderr_tail))

    async def retire(self) -> None:
        """Kill the process, wait for it, and remove its scratch dir."""
        self.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await self.proc.wait()
        forget_child(self.proc.pid)
        if self.namespace is not None:
            self.namespace.unlink(missing_ok=True)
        self._stderr_reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_reader
        await asyncio.to_thread(remove_tree, self.scratch)
        await asyncio.to_thread(sweep_orphans)  # setsid'd descendants, without bwrap

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

    def __init__(
        self, scratch_root: Path, max_processes: int, sandbox: Sandbox | None = None
    ) -> None:
        """Raises ExecutionError if ``max_processes`` is below 1. ``sandbox`` defaults to
        ``Sandbox()``: rlimits and a scrubbed environment only."""
        if max_processes < 1:
            raise ExecutionError(f"max_processes must be at least 1, not {max_processes}")
        self._scratch_root = scratch_root
        self._sandbox = sandbox or Sandbox()
        self._max_processes = max_processes
        self._runs = RunRegistry()
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

    async def _run(self, request: RunRequest, line: bytes, run: Run) -> RunOutcome:
        # The usual case, an idle process of this bundle, takes no task and no wait.
        worker: _Worker | str | None = self._take_idle((request.bundle_dir, request.entrypoint))
        if worker is None:
            acquiring = asyncio.ensure_future(self._acquire(request))

            def stop_acquiring() -> None:
                acquiring.cancel()

            run.attach(stop_acquiring)
            try:
                worker = await acquiring
            except asyncio.CancelledError:
                if run.stop_reason is None:
                    raise  # run() itself was cancelled, not the lease
                return failure(run.stop_reason)
            finally:
                run.detach()
        if isinstance(worker, str):
            return failure(worker)
        if run.stop_reason is not None:  # cancelled just as a process became free
            await self._release(worker, reusable=True)
            return failure(run.stop_reason)
        owner = task_owner(self._sandbox)
        reusable = False
        try:
            problem = await _staged(worker.scratch, request, owner)
            if problem is not None:
                # Nothing was sent: the process is as good as before, once in/ is empty.
                reusable = await _emptied(worker.scratch, owner)
                return failure(problem)
            outcome, reusable = await self._exchange(worker, request, line, run)
            outcome, reusable = await _settled(outcome, reusable, worker.scratch, request, owner)
            return outcome
        finally:
            await self._release(worker, reusable)

    async def _exchange(
        self, worker: _Worker, request: RunRequest, line: bytes, run: Run
    ) -> tuple[RunOutcome, bool]:
        """Send one task and read its reply. Returns the outcome and whether the process
        may take another task."""
        limits = request.limits
        run.attach(worker.kill)
        # One /proc walk per task: the count starts where the worker's last task ended.
        # Between tasks it waits for its next line, so what it burns there is its own
        # code's work (finishing the last task, say) and is charged to this task; only
        # the first task of a process starts its count here, so start-up is not charged.
        cpu_before = worker.cpu_mark
        if cpu_before is None:
            cpu_before = tree_cpu_seconds(worker.proc.pid)
        started = time.monotonic()
        try:
            async with asyncio.timeout(limits.wall_seconds):  # no task of its own, unlike wait_for
                reply = await self._send(worker, line)
        except TimeoutError:
            run.stop(wall_exceeded(limits))
            reply = None
        except _ReplyError as exc:
            run.stop(_malformed(exc, worker))
            reply = None
        finally:
            run.detach()
        wall = time.monotonic() - started
        cpu_after = worker.cpu_mark = tree_cpu_seconds(worker.proc.pid)
        cpu = 0.0
        if cpu_before is not None and cpu_after is not None:
            # A descendant that ended unreaped takes its time with it: never below zero.
            cpu = max(0.0, cpu_after - cpu_before)
        if run.stop_reason is not None:
            return failure(run.stop_reason, cpu, wall), False
        if reply is None:
            return failure(await worker.exit_reason(limits), cpu, wall), False
        try:
            result, error = _parse_reply(reply, request.task_id)
        except _ReplyError as exc:  # _release kills the process: its output is out of step
            return failure(_malformed(exc, worker), cpu, wall), False
        if error is not None:
            return failure(error, cpu, wall), True
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
                if (idle := self._take_idle(key)) is not None:
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

    def _take_idle(self, key: _PoolKey) -> _Worker | None:
        """An idle live process for ``key``, now marked busy; None if there is none. No
        await in between, so no lock is needed."""
        self._drop_dead()
        for idle in self._workers:
            if idle.key == key and not idle.busy:
                idle.busy = True
                return idle
        return None

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
        fresh_scratch(scratch, self._sandbox)
        try:
            launch = build_launch(
                request.entrypoint, request.bundle_dir, scratch, None, self._sandbox
            )
            who = popen_identity(self._sandbox)
            with spawning() as register:
                proc = await asyncio.create_subprocess_exec(
                    *launch.argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    limit=request.limits.output_mb * MIB,
                    cwd=launch.cwd,
                    env=dict(launch.env),
                    start_new_session=True,
                    user=who.user,
                    group=who.group,
                    extra_groups=who.extra_groups,
                    preexec_fn=limit_setter(request.limits, limit_cpu=False, sandbox=self._sandbox),
                )
                register(proc.pid)
        except BaseException:
            await asyncio.to_thread(remove_tree, scratch)
            raise
        namespace = None
        if self._sandbox.bwrap is not None:
            namespace = await asyncio.to_thread(record_namespace, self._scratch_root, proc.pid)
        return _Worker(key, proc, scratch, namespace)

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


async def _staged(scratch: Path, request: RunRequest, owner: tuple[int, int] | None) -> str | None:
    """A worker's ``in/`` and ``out/`` emptied and ``in/`` filled with the request's files;
    None, or why the task cannot run. Without input files and with both directories as
    the last task left them (the usual case) there is nothing to do, and no thread hop."""
    if not request.input_files and task_dirs_fresh(scratch, owner):
        return None
    return await stage_task_files(scratch, request, reset=True, owner=owner)


async def _settled(
    outcome: RunOutcome,
    reusable: bool,
    scratch: Path,
    request: RunRequest,
    owner: tuple[int, int] | None,
) -> tuple[RunOutcome, bool]:
    """After a task: its output files collected (``outputs_of``) and, if the process may
    take another task, ``in/`` and ``out/`` emptied (a 1 GiB input should not stay on
    disk while it idles). Returns the outcome and whether the process may be reused.

    One thread hop for both; none when both directories are already empty (no files in,
    none out), where neither step would change anything.
    """
    if task_dirs_fresh(scratch, owner):
        return outcome, reusable

    def settle() -> tuple[RunOutcome, bool]:
        settled = outputs_of(outcome, scratch, request)
        if not reusable:
            return settled, False
        try:
            reset_task_dirs(scratch, owner)
        except OSError:
            return settled, False
        return settled, True

    return await asyncio.to_thread(settle)


async def _emptied(scratch: Path, owner: tuple[int, int] | None) -> bool:
    """Empty a worker's ``in/`` and ``out/`` after a task (a 1 GiB input should not stay
    on disk while the process idles); False if that failed and the worker must go."""
    try:
        await asyncio.to_thread(reset_task_dirs, scratch, owner)
    except OSError:
        return False
    return True


def _malformed(exc: _ReplyError, worker: _Worker) -> str:
    return with_stderr(f"malformed reply line: {exc}", bytes(worker.stderr_tail))


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
