"""The executors run real processes: tiny Python programs in bundle dirs under tmp_path."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from issc.errors import ExecutionError
from issc.manifest import Limits
from node.executor import (
    Executor,
    PersistentExecutor,
    ProcessExecutor,
    RunRequest,
    make_executor,
)
from node.sandbox import Sandbox

pytestmark = pytest.mark.timeout(30)

LIMITS = Limits(wall_seconds=10, memory_mb=256, output_mb=1)
ENTRYPOINT = ("python3", "main.py")


def make_bundle(root: Path, source: str, name: str = "bundle") -> Path:
    """A bundle dir whose main.py is ``source``."""
    bundle = root / name
    bundle.mkdir()
    (bundle / "main.py").write_text(textwrap.dedent(source))
    return bundle


def make_request(
    bundle: Path,
    task_input: Any = None,
    *,
    lease: int = 1,
    limits: Limits = LIMITS,
    entrypoint: tuple[str, ...] = ENTRYPOINT,
) -> RunRequest:
    return RunRequest(
        lease=lease,
        task_id=f"t-{lease}",
        input=task_input,
        bundle_dir=bundle,
        entrypoint=entrypoint,
        limits=limits,
    )


def is_dead(pid: int) -> bool:
    """Gone, or a zombie: PID 1 in a container may never reap orphans."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in {"Z", "X"}


async def wait_dead(pid: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not is_dead(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def wait_for_file(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.02)


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    return tmp_path / "scratch"


@pytest.fixture
async def process_executor(scratch_root: Path) -> AsyncIterator[ProcessExecutor]:
    executor = ProcessExecutor(scratch_root)
    yield executor
    await executor.close()


# ---------------------------------------------------------------------- process mode


async def test_stdout_json_is_the_result(tmp_path: Path, process_executor: ProcessExecutor) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import json, sys
        numbers = json.load(sys.stdin)
        print(json.dumps({"sum": sum(numbers)}))
        """,
    )
    outcome = await process_executor.run(make_request(bundle, [1, 2, 3]))
    assert outcome.ok, outcome.error
    assert outcome.result == {"sum": 6}
    assert outcome.error is None
    assert outcome.wall_seconds > 0


async def test_result_json_is_preferred_over_stdout(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import json
        with open("result.json", "w") as f:
            json.dump({"from": "file"}, f)
        print(json.dumps({"from": "stdout"}))
        """,
    )
    outcome = await process_executor.run(make_request(bundle))
    assert outcome.ok, outcome.error
    assert outcome.result == {"from": "file"}


async def test_invalid_result_json_fails(tmp_path: Path, process_executor: ProcessExecutor) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        open("result.json", "w").write("{not json")
        print("[1, 2]")
        """,
    )
    outcome = await process_executor.run(make_request(bundle))
    assert not outcome.ok
    assert outcome.result is None
    assert outcome.error is not None and "result.json is not valid JSON" in outcome.error


async def test_non_json_stdout_is_a_string(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(tmp_path, 'print("1229 primes found")\n')
    outcome = await process_executor.run(make_request(bundle))
    assert outcome.ok, outcome.error
    assert outcome.result == "1229 primes found"


async def test_input_on_stdin_and_in_input_json_is_identical(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import json, sys
        from_stdin = sys.stdin.read()
        from_file = open("input.json").read()
        print(json.dumps({"same": from_stdin == from_file, "input": json.loads(from_file)}))
        """,
    )
    task_input = {"n": [1, 2.5, None], "text": "caf\u00e9\nline"}
    outcome = await process_executor.run(make_request(bundle, task_input))
    assert outcome.ok, outcome.error
    assert outcome.result == {"same": True, "input": task_input}


async def test_nonzero_exit_fails_with_the_stderr_tail(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import sys
        sys.stderr.write("noise " * 2000 + "\\nthe real reason\\n")
        print("[1]")
        sys.exit(3)
        """,
    )
    outcome = await process_executor.run(make_request(bundle))
    assert not outcome.ok
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.startswith("exit status 3: ")
    assert outcome.error.endswith("the real reason")
    assert len(outcome.error) < 2200  # the tail, not all 12 KB of stderr


async def test_wall_limit_kills_the_program_and_its_background_children(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    bundle = make_bundle(
        tmp_path,
        """
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open(json.load(sys.stdin), "w").write(str(child.pid))
        time.sleep(60)
        """,
    )
    limits = Limits(wall_seconds=0.8, memory_mb=256, output_mb=1)
    outcome = await process_executor.run(make_request(bundle, str(pid_file), limits=limits))
    assert not outcome.ok
    assert outcome.error == "wall time limit of 0.8 s exceeded"
    assert outcome.wall_seconds < 3
    assert await wait_dead(int(pid_file.read_text()))


async def test_background_children_die_when_the_program_exits(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    bundle = make_bundle(
        tmp_path,
        """
        import json, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        open(json.load(sys.stdin), "w").write(str(child.pid))
        print(child.pid)
        """,
    )
    outcome = await process_executor.run(make_request(bundle, str(pid_file)))
    assert outcome.ok, outcome.error
    assert await wait_dead(int(pid_file.read_text()))


async def test_cancel_kills_a_running_task(
    tmp_path: Path, scratch_root: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import time
        open("started", "w").close()
        time.sleep(60)
        """,
    )
    running = asyncio.create_task(process_executor.run(make_request(bundle, lease=5)))
    await wait_for_file(scratch_root / "5" / "started")
    assert await process_executor.cancel(5) is True
    outcome = await running
    assert not outcome.ok
    assert outcome.error == "cancelled"
    assert outcome.wall_seconds < 5
    assert await process_executor.cancel(5) is False  # finished: unknown now


async def test_cancel_of_an_unknown_lease_is_false(process_executor: ProcessExecutor) -> None:
    assert await process_executor.cancel(404) is False


async def test_environment_is_scrubbed(
    tmp_path: Path,
    scratch_root: Path,
    process_executor: ProcessExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ISSC_TEST_SECRET", "do-not-leak")
    bundle = make_bundle(tmp_path, "import json, os\nprint(json.dumps(dict(os.environ)))\n")
    outcome = await process_executor.run(make_request(bundle, lease=3))
    assert outcome.ok, outcome.error
    env = outcome.result
    assert "ISSC_TEST_SECRET" not in env
    assert set(env) == {"PATH", "HOME", "TMPDIR", "LANG", "ISSC_TASK_ID", "ISSC_BUNDLE_DIR"}
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["HOME"] == str(scratch_root / "3")
    assert env["TMPDIR"] == str(scratch_root / "3" / "tmp")
    assert env["ISSC_TASK_ID"] == "t-3"
    assert env["ISSC_BUNDLE_DIR"] == str(bundle.resolve())


async def test_cwd_is_a_fresh_scratch_dir_removed_afterwards(
    tmp_path: Path, scratch_root: Path, process_executor: ProcessExecutor
) -> None:
    leftover = scratch_root / "7" / "leftover.txt"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("from a crashed run")
    bundle = make_bundle(
        tmp_path,
        """
        import json, os
        os.makedirs("out/deep")
        os.chmod("out", 0o500)  # the executor must still be able to remove it
        print(json.dumps({"cwd": os.getcwd(), "entries": sorted(os.listdir("."))}))
        """,
    )
    outcome = await process_executor.run(make_request(bundle, lease=7))
    assert outcome.ok, outcome.error
    assert outcome.result["cwd"] == str(scratch_root / "7")
    assert {"input.json", "out", "tmp"} <= set(outcome.result["entries"])
    assert "leftover.txt" not in outcome.result["entries"]
    assert not (scratch_root / "7").exists()


async def test_memory_limit_makes_a_big_allocation_fail(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(tmp_path, "block = bytearray(1024 ** 3)\nprint(len(block))\n")
    limits = Limits(wall_seconds=10, memory_mb=200, output_mb=1)
    outcome = await process_executor.run(make_request(bundle, limits=limits))
    assert not outcome.ok
    assert outcome.error is not None and "MemoryError" in outcome.error


async def test_output_limit_bounds_the_files_a_task_writes(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(tmp_path, "open('out/big.bin', 'wb').write(bytes(3 * 1024 * 1024))\n")
    outcome = await process_executor.run(make_request(bundle))
    assert not outcome.ok
    # Python ignores SIGXFSZ, so the write fails with EFBIG instead of the signal killing it.
    assert outcome.error is not None and "File too large" in outcome.error


async def test_stdout_beyond_the_output_limit_is_not_a_result(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(tmp_path, "import sys\nsys.stdout.write('x' * (3 * 1024 * 1024))\n")
    outcome = await process_executor.run(make_request(bundle))
    assert not outcome.ok
    assert outcome.result is None


async def test_cpu_seconds_are_measured_for_a_busy_loop(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import time
        start = time.process_time()
        while time.process_time() - start < 0.3:
            pass
        print(1)
        """,
    )
    outcome = await process_executor.run(make_request(bundle))
    assert outcome.ok, outcome.error
    assert 0.25 <= outcome.cpu_seconds < 5


async def test_bare_python3_runs_the_nodes_interpreter_isolated(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import json, sys
        flags = sys.flags
        print(json.dumps([sys.executable, flags.no_user_site, flags.ignore_environment]))
        """,
    )
    outcome = await process_executor.run(make_request(bundle))
    assert outcome.ok, outcome.error
    assert outcome.result == [sys.executable, 1, 1]


async def test_an_entrypoint_file_in_the_bundle_runs_from_the_scratch_dir(
    tmp_path: Path, scratch_root: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(tmp_path, "")
    script = bundle / "run.sh"
    script.write_text('#!/bin/sh\nprintf \'{"cwd": "%s"}\\n\' "$(pwd)"\n')
    script.chmod(0o755)
    outcome = await process_executor.run(make_request(bundle, lease=4, entrypoint=("run.sh",)))
    assert outcome.ok, outcome.error
    assert outcome.result == {"cwd": str(scratch_root / "4")}


async def test_unknown_entrypoint_program_fails_the_task(
    tmp_path: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(tmp_path, "print(1)\n")
    request = make_request(bundle, entrypoint=("issc-no-such-program", "main.py"))
    outcome = await process_executor.run(request)
    assert not outcome.ok
    assert outcome.error is not None and "issc-no-such-program" in outcome.error


async def test_a_running_lease_cannot_run_twice(
    tmp_path: Path, scratch_root: Path, process_executor: ProcessExecutor
) -> None:
    bundle = make_bundle(tmp_path, "import time\nopen('started', 'w').close()\ntime.sleep(60)\n")
    running = asyncio.create_task(process_executor.run(make_request(bundle, lease=9)))
    await wait_for_file(scratch_root / "9" / "started")
    with pytest.raises(ExecutionError, match="already running"):
        await process_executor.run(make_request(bundle, lease=9))
    await process_executor.close()
    assert (await running).error == "cancelled"
    with pytest.raises(ExecutionError, match="closed"):
        await process_executor.run(make_request(bundle, lease=10))


# -------------------------------------------------------------------- persistent mode

WORKER = """
import json, os, sys, time
for line in sys.stdin:
    message = json.loads(line)
    task = message["input"]
    reply = {"id": message["id"],
             "result": {"pid": os.getpid(), "cwd": os.getcwd(), "has_out": os.path.isdir("out")}}
    if task == "sleep":
        time.sleep(0.8)
    elif task == "hang":
        open("started", "w").close()
        time.sleep(60)
    elif task == "error":
        reply = {"id": message["id"], "error": "bad input"}
    elif task == "exit":
        sys.stderr.write("dying on purpose\\n")
        sys.stderr.flush()
        os._exit(3)
    elif task == "garbage":
        reply = "this is not a reply"
    elif task == "huge":
        reply = "x" * (2 * 1024 * 1024)
    elif task == "burn":
        start = time.process_time()
        while time.process_time() - start < 0.3:
            pass
    sys.stdout.write(json.dumps(reply) + "\\n")
    sys.stdout.flush()
"""

SHORT = Limits(wall_seconds=0.5, memory_mb=256, output_mb=1)


@pytest.fixture
async def persistent(scratch_root: Path) -> AsyncIterator[PersistentExecutor]:
    executor = PersistentExecutor(scratch_root, max_processes=2)
    yield executor
    await executor.close()


async def run_ok(executor: Executor, bundle: Path, task: str, lease: int) -> Any:
    outcome = await executor.run(make_request(bundle, task, lease=lease))
    assert outcome.ok, outcome.error
    return outcome.result


async def test_persistent_runs_several_tasks_through_one_process(
    tmp_path: Path, scratch_root: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    results = [await run_ok(persistent, bundle, "pid", lease) for lease in (1, 2, 3)]
    assert len({result["pid"] for result in results}) == 1
    assert Path(results[0]["cwd"]).parent == scratch_root
    assert results[0]["has_out"] is True


async def test_persistent_runs_two_tasks_in_parallel(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    started = time.monotonic()
    first, second = await asyncio.gather(
        run_ok(persistent, bundle, "sleep", 1), run_ok(persistent, bundle, "sleep", 2)
    )
    assert time.monotonic() - started < 1.5  # one after the other would take 1.6 s
    assert first["pid"] != second["pid"]


async def test_persistent_error_reply_fails_the_task_and_keeps_the_process(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    pid = (await run_ok(persistent, bundle, "pid", 1))["pid"]
    outcome = await persistent.run(make_request(bundle, "error", lease=2))
    assert not outcome.ok
    assert outcome.error == "bad input"
    assert (await run_ok(persistent, bundle, "pid", 3))["pid"] == pid


async def test_persistent_process_exiting_mid_task_is_replaced(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    pid = (await run_ok(persistent, bundle, "pid", 1))["pid"]
    outcome = await persistent.run(make_request(bundle, "exit", lease=2))
    assert not outcome.ok
    assert outcome.error is not None
    assert "exit status 3" in outcome.error
    assert "dying on purpose" in outcome.error
    assert (await run_ok(persistent, bundle, "pid", 3))["pid"] != pid


async def test_persistent_wall_limit_kills_and_replaces_the_process(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    pid = (await run_ok(persistent, bundle, "pid", 1))["pid"]
    outcome = await persistent.run(make_request(bundle, "hang", lease=2, limits=SHORT))
    assert not outcome.ok
    assert outcome.error == "wall time limit of 0.5 s exceeded"
    assert outcome.wall_seconds < 3
    assert await wait_dead(pid)
    assert (await run_ok(persistent, bundle, "pid", 3))["pid"] != pid


async def test_persistent_malformed_reply_kills_the_process(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    pid = (await run_ok(persistent, bundle, "pid", 1))["pid"]
    outcome = await persistent.run(make_request(bundle, "garbage", lease=2))
    assert not outcome.ok
    assert outcome.error is not None and "malformed reply line" in outcome.error
    assert await wait_dead(pid)
    assert (await run_ok(persistent, bundle, "pid", 3))["pid"] != pid


async def test_persistent_oversized_reply_kills_the_process(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    pid = (await run_ok(persistent, bundle, "pid", 1))["pid"]
    outcome = await persistent.run(make_request(bundle, "huge", lease=2))
    assert not outcome.ok
    assert outcome.error is not None and "longer than the output limit" in outcome.error
    assert (await run_ok(persistent, bundle, "pid", 3))["pid"] != pid


async def test_persistent_process_failing_at_start_up_reports_its_stderr(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, "import sys\nsys.stderr.write('no GPU here\\n')\nsys.exit(2)\n")
    outcome = await persistent.run(make_request(bundle, "pid"))
    assert not outcome.ok
    assert outcome.error is not None
    assert "exit status 2" in outcome.error
    assert "no GPU here" in outcome.error


async def test_persistent_cancel_kills_the_running_task(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    result = await run_ok(persistent, bundle, "pid", 1)
    running = asyncio.create_task(persistent.run(make_request(bundle, "hang", lease=2)))
    await wait_for_file(Path(result["cwd"]) / "started")
    assert await persistent.cancel(2) is True
    outcome = await running
    assert outcome.error == "cancelled"
    assert await wait_dead(result["pid"])


async def test_persistent_cpu_seconds_are_measured(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    await run_ok(persistent, bundle, "pid", 1)
    outcome = await persistent.run(make_request(bundle, "burn", lease=2))
    assert outcome.ok, outcome.error
    assert 0.2 <= outcome.cpu_seconds < 5


async def test_persistent_newer_bundle_retires_idle_processes_of_the_old_one(
    tmp_path: Path, scratch_root: Path
) -> None:
    old = make_bundle(tmp_path, WORKER, name="v1")
    new = make_bundle(tmp_path, WORKER, name="v2")
    executor = PersistentExecutor(scratch_root, max_processes=1)
    try:
        old_pid = (await run_ok(executor, old, "pid", 1))["pid"]
        assert (await run_ok(executor, new, "pid", 2))["pid"] != old_pid
        assert await wait_dead(old_pid)
    finally:
        await executor.close()


async def test_persistent_close_ends_every_process(tmp_path: Path, scratch_root: Path) -> None:
    bundle = make_bundle(tmp_path, WORKER)
    # Sandbox(): the pid the worker reports must be the node's view of it (no PID namespace).
    executor = make_executor("persistent", scratch_root, slots=2, sandbox=Sandbox())
    result = await run_ok(executor, bundle, "pid", 1)
    await executor.close()
    assert await wait_dead(result["pid"])
    assert not Path(result["cwd"]).exists()


def test_make_executor_rejects_an_unknown_mode(tmp_path: Path) -> None:
    with pytest.raises(ExecutionError, match="unknown execution mode"):
        make_executor("threads", tmp_path, slots=1)
