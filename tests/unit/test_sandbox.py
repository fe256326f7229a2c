"""The sandbox around task code (docs/security.md): real processes, real bubblewrap.

Tests that need bubblewrap skip where ``bwrap`` is missing or does not work; tests about
the task uid skip unless the node (this test process) runs as root.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from issc.manifest import Limits
from node.executor import PersistentExecutor, ProcessExecutor, RunOutcome, RunRequest
from node.sandbox import MAX_PROCESSES, NOBODY, Sandbox, default_sandbox

pytestmark = pytest.mark.timeout(60)

LIMITS = Limits(wall_seconds=20, memory_mb=256, output_mb=1)
SANDBOX = default_sandbox()
needs_bwrap = pytest.mark.skipif(SANDBOX.bwrap is None, reason="bubblewrap (bwrap) not usable")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the node does not run as root")


def make_bundle(root: Path, source: str) -> Path:
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "main.py").write_text(textwrap.dedent(source))
    return bundle


def request(bundle: Path, task_input: Any = None, *, limits: Limits = LIMITS) -> RunRequest:
    return RunRequest(
        lease=1,
        task_id="t-1",
        input=task_input,
        bundle_dir=bundle,
        entrypoint=("python3", "main.py"),
        limits=limits,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A node data_dir with a secret in it; scratch dirs live under it, as in the node."""
    data = tmp_path / "node-data"
    data.mkdir()
    key = data / "node.key"
    key.write_text("secret node key")
    key.chmod(0o600)
    return data


@pytest.fixture
async def sandboxed(data_dir: Path) -> AsyncIterator[ProcessExecutor]:
    executor = ProcessExecutor(data_dir / "scratch", SANDBOX)
    yield executor
    await executor.close()


async def run_ok(executor: ProcessExecutor, req: RunRequest) -> Any:
    outcome = await executor.run(req)
    assert outcome.ok, outcome.error
    return outcome.result


PROBE = """
import json, os, socket, sys
args = json.load(sys.stdin)
facts = {}
def attempt(name, action):
    try:
        action()
        facts[name] = "ok"
    except OSError as exc:
        facts[name] = exc.__class__.__name__
attempt("connect", lambda: socket.create_connection(("127.0.0.1", args["port"]), timeout=2))
attempt("read_key", lambda: open(args["key"]).read())
attempt("read_shadow", lambda: open("/etc/shadow").read())
try:
    facts["home"] = os.listdir(args["home"])
except OSError as exc:
    facts["home"] = exc.__class__.__name__
attempt("write_usr", lambda: open("/usr/issc-probe", "w"))
attempt("write_bundle", lambda: open(os.path.join(os.environ["ISSC_BUNDLE_DIR"], "x"), "w"))
attempt("write_data_dir", lambda: open(os.path.join(args["data"], "x"), "w"))
attempt("write_scratch", lambda: open("out/x", "w").write("fine"))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
facts["cap_eff"] = int(status["CapEff"].strip(), 16)
facts["cap_bnd"] = int(status["CapBnd"].strip(), 16)
facts["uid"] = os.getuid()
facts["gid"] = os.getgid()
facts["groups"] = os.getgroups()
facts["pid"] = os.getpid()
facts["processes"] = len([name for name in os.listdir("/proc") if name.isdigit()])
print(json.dumps(facts))
"""


@needs_bwrap
async def test_bubblewrap_confines_task_code(
    tmp_path: Path, data_dir: Path, sandboxed: ProcessExecutor
) -> None:
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen()
    try:
        bundle = make_bundle(tmp_path, PROBE)
        task_input = {
            "port": hub.getsockname()[1],
            "key": str(data_dir / "node.key"),
            "data": str(data_dir),
            "home": os.path.expanduser("~"),
        }
        facts = await run_ok(sandboxed, request(bundle, task_input))
    finally:
        hub.close()
    assert facts["connect"] != "ok"  # no network: the hub's port is out of reach
    assert facts["read_key"] == "FileNotFoundError"  # the data_dir is not there at all
    assert facts["read_shadow"] != "ok" or not Path("/etc/shadow").exists()
    # $HOME is not there, or holds only the way to the node's interpreter (pyenv's, a
    # virtualenv).
    home = Path.home()
    ways = [Path(sys.base_prefix).resolve(), Path(sys.prefix).absolute()]
    allowed = {way.relative_to(home).parts[0] for way in ways if way.is_relative_to(home)}
    if isinstance(facts["home"], list):
        assert allowed and set(facts["home"]) <= allowed
    else:
        assert facts["home"] in ("FileNotFoundError", "PermissionError")
    assert facts["write_usr"] != "ok"
    assert facts["write_bundle"] != "ok"
    assert facts["write_data_dir"] != "ok"
    assert facts["write_scratch"] == "ok"
    assert facts["cap_eff"] == 0
    assert facts["pid"] <= 3  # its own PID namespace
    assert facts["processes"] <= 3
    if os.geteuid() == 0:
        assert facts["cap_bnd"] == 0
        assert (facts["uid"], facts["gid"], facts["groups"]) == (*NOBODY, [])


@needs_root
async def test_task_code_of_a_root_node_runs_unprivileged(
    tmp_path: Path, sandboxed: ProcessExecutor
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import json, os
        open("out/made-by-task", "w").write("x")
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        print(json.dumps([os.getuid(), os.getgid(), int(status["CapEff"].strip(), 16)]))
        """,
    )
    if SANDBOX.bwrap is None and not _reachable_by_nobody(sys.base_prefix):
        pytest.skip("the interpreter is not reachable by nobody without bubblewrap")
    assert await run_ok(sandboxed, request(bundle)) == [*NOBODY, 0]


def _reachable_by_nobody(path: str) -> bool:
    current = Path(path).resolve()
    return all(os.stat(p).st_mode & 0o001 for p in [current, *current.parents])


DOUBLE_FORK = """
import json, os, sys, time
token = json.load(sys.stdin)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time\\n"
                 "while True:\\n time.sleep(0.2)", token])
    os._exit(0)
time.sleep(0.5)
print("parent done")
"""

# The task itself (pid 1 of its namespace under bubblewrap) also carries the token.
CANCELLED_TREE = DOUBLE_FORK.replace(
    'time.sleep(0.5)\nprint("parent done")',
    'os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", token])',
)


def processes_with(token: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline.split(b"\0") and not _is_zombie(name):
                found.append(int(name))
    return found


def _is_zombie(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


async def gone(token: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while processes_with(token):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@needs_bwrap
async def test_bubblewrap_kills_a_setsid_double_forked_grandchild(
    tmp_path: Path, sandboxed: ProcessExecutor
) -> None:
    token = f"issc-test-{uuid.uuid4().hex}"
    bundle = make_bundle(tmp_path, DOUBLE_FORK)
    assert await run_ok(sandboxed, request(bundle, token)) == "parent done"
    assert await gone(token)


@needs_bwrap
async def test_bubblewrap_kills_the_tree_of_a_cancelled_task(
    tmp_path: Path, sandboxed: ProcessExecutor
) -> None:
    token = f"issc-test-{uuid.uuid4().hex}"
    bundle = make_bundle(tmp_path, CANCELLED_TREE)
    running = asyncio.create_task(sandboxed.run(request(bundle, token)))
    deadline = time.monotonic() + 10
    while len(processes_with(token)) < 2:
        assert time.monotonic() < deadline, "the task and its grandchild never started"
        await asyncio.sleep(0.05)
    assert await sandboxed.cancel(1)
    outcome: RunOutcome = await running
    assert outcome.error == "cancelled"
    assert await gone(token)


REAPER_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from issc.manifest import Limits
from node.executor import ProcessExecutor, RunRequest
from node.sandbox import Sandbox, enable_orphan_reaping

async def main() -> None:
    assert enable_orphan_reaping()
    executor = ProcessExecutor(Path(sys.argv[1]), Sandbox())
    request = RunRequest(lease=1, task_id="t", input=sys.argv[3], bundle_dir=Path(sys.argv[2]),
                         entrypoint=("python3", "main.py"), limits=Limits(wall_seconds=20))
    outcome = await executor.run(request)
    await executor.close()
    print(json.dumps([outcome.ok, outcome.result, outcome.error]))

asyncio.run(main())
"""


async def test_without_bubblewrap_the_node_kills_orphans_of_a_run(tmp_path: Path) -> None:
    """The node (a subreaper) kills what a run's setsid'd, double-forked child left."""
    token = f"issc-test-{uuid.uuid4().hex}"
    bundle = make_bundle(tmp_path, DOUBLE_FORK)
    script = tmp_path / "reaping_node.py"
    script.write_text(REAPER_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "scratch"), str(bundle), token],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[true, "parent done", null]'
    assert await gone(token)


async def test_without_reaping_a_setsid_grandchild_would_survive(tmp_path: Path) -> None:
    """The control for the test above: the group kill alone does not catch it."""
    token = f"issc-test-{uuid.uuid4().hex}"
    bundle = make_bundle(tmp_path, DOUBLE_FORK)
    executor = ProcessExecutor(tmp_path / "scratch", Sandbox())
    try:
        assert await run_ok(executor, request(bundle, token)) == "parent done"
        assert processes_with(token)
    finally:
        await executor.close()
        for pid in processes_with(token):
            os.kill(pid, 9)


# ---------------------------------------------------------------- limits, both ways

SANDBOXES = [
    pytest.param(Sandbox(), id="plain"),
    pytest.param(SANDBOX, id="node-default", marks=needs_bwrap),
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
async def test_a_gigabyte_on_stdout_fails_naming_the_cap(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import sys
        block = "x" * (1024 * 1024)
        for _ in range(1024):
            sys.stdout.write(block)
        """,
    )
    executor = ProcessExecutor(tmp_path / "scratch", sandbox)
    try:
        outcome = await executor.run(request(bundle))
    finally:
        await executor.close()
    assert not outcome.ok
    assert outcome.error is not None
    assert outcome.error.startswith("stdout reached the output_mb limit of 1 MiB"), outcome.error
    assert outcome.wall_seconds < 15


async def test_stdout_cut_at_the_cap_is_no_result_even_with_exit_status_0(
    tmp_path: Path,
) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import os
        try:
            while True:
                os.write(1, b"x" * 65536)
        except OSError:
            pass  # File too large: ignored, and the program says it succeeded
        """,
    )
    executor = ProcessExecutor(tmp_path / "scratch", Sandbox())
    try:
        outcome = await executor.run(request(bundle))
    finally:
        await executor.close()
    assert not outcome.ok
    assert outcome.error == "stdout reached the output_mb limit of 1 MiB"


@pytest.mark.parametrize("sandbox", SANDBOXES)
async def test_a_4_gib_allocation_is_refused(tmp_path: Path, sandbox: Sandbox) -> None:
    bundle = make_bundle(tmp_path, "block = bytearray(4 * 1024 ** 3)\nprint(len(block))\n")
    executor = ProcessExecutor(tmp_path / "scratch", sandbox)
    try:
        outcome = await executor.run(request(bundle))
    finally:
        await executor.close()
    assert not outcome.ok
    assert outcome.error is not None and "MemoryError" in outcome.error


@pytest.mark.parametrize("sandbox", SANDBOXES)
async def test_a_10_gib_file_is_refused(tmp_path: Path, sandbox: Sandbox) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        with open("tmp/big", "wb") as f:
            f.seek(10 * 1024 ** 3)
            f.write(b"x")
        """,
    )
    executor = ProcessExecutor(tmp_path / "scratch", sandbox)
    try:
        outcome = await executor.run(request(bundle))
    finally:
        await executor.close()
    assert not outcome.ok
    assert outcome.error is not None and "File too large" in outcome.error


@needs_root
async def test_a_fork_bomb_is_bounded_by_the_process_limit(
    tmp_path: Path, sandboxed: ProcessExecutor
) -> None:
    if SANDBOX.bwrap is None and not _reachable_by_nobody(sys.base_prefix):
        pytest.skip("the interpreter is not reachable by nobody without bubblewrap")
    bundle = make_bundle(
        tmp_path,
        """
        import os, time
        made = 0
        try:
            while made < 5000:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                made += 1
        except OSError as exc:
            print(made, exc.errno)
        """,
    )
    result = await run_ok(sandboxed, request(bundle))
    made, _errno = (int(word) for word in str(result).split())
    assert made < MAX_PROCESSES


@needs_bwrap
async def test_persistent_workers_run_in_bubblewrap(data_dir: Path, tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path,
        """
        import json, os, sys
        for line in sys.stdin:
            task = json.loads(line)
            answer = {"pid": os.getpid(), "key": os.path.exists(task["input"])}
            print(json.dumps({"id": task["id"], "result": answer}), flush=True)
        """,
    )
    executor = PersistentExecutor(data_dir / "scratch", max_processes=1, sandbox=SANDBOX)
    try:
        outcome = await executor.run(request(bundle, str(data_dir / "node.key")))
    finally:
        await executor.close()
    assert outcome.ok, outcome.error
    assert outcome.result == {"pid": 1, "key": False}


# ------------------------------------------------------------------- choosing a sandbox


def test_without_bwrap_the_node_warns_loudly_and_keeps_the_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import node.sandbox as sandbox_module

    real_which = sandbox_module.shutil.which
    monkeypatch.setattr(
        sandbox_module.shutil, "which", lambda name: None if name == "bwrap" else real_which(name)
    )
    with caplog.at_level("WARNING", logger="node.sandbox"):
        sandbox = sandbox_module.default_sandbox.__wrapped__()
    assert sandbox.bwrap is None
    assert sandbox.run_as == (NOBODY if os.geteuid() == 0 else None)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert sandbox_module.REDUCED_ISOLATION_WARNING in warnings[0].getMessage()
    assert "bubblewrap (bwrap) not found" in warnings[0].getMessage()


def test_the_sandbox_setting_chooses_the_sandbox() -> None:
    from issc.errors import ExecutionError
    from node.sandbox import interpreter_unreachable, sandbox_for, task_owner

    assert sandbox_for("none") == Sandbox()
    owner = task_owner(SANDBOX)
    if SANDBOX.bwrap is None and owner is not None and interpreter_unreachable(owner):
        with pytest.raises(ExecutionError, match="install bubblewrap"):
            sandbox_for("auto")
    else:
        assert sandbox_for("auto") == SANDBOX
    if SANDBOX.bwrap is None:
        with pytest.raises(ExecutionError, match="bwrap is not installed"):
            sandbox_for("bubblewrap")
    else:
        assert sandbox_for("bubblewrap") == SANDBOX
    with pytest.raises(ExecutionError, match="unknown sandbox setting"):
        sandbox_for("chroot")


BUSY = """
import json, sys, time
def spin():
    started = time.process_time()
    while time.process_time() - started < 0.4:
        pass
if "--persistent" in sys.argv:
    for line in sys.stdin:
        spin()
        print(json.dumps({"id": json.loads(line)["id"], "result": 1}), flush=True)
else:
    spin()
    print(1)
"""


@needs_bwrap
async def test_cpu_seconds_are_measured_inside_bubblewrap(data_dir: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, BUSY)
    process = ProcessExecutor(data_dir / "scratch", SANDBOX)
    persistent = PersistentExecutor(data_dir / "scratch", max_processes=1, sandbox=SANDBOX)
    try:
        one = await process.run(request(bundle))
        worker_request = RunRequest(
            lease=2,
            task_id="t-2",
            input=None,
            bundle_dir=bundle,
            entrypoint=("python3", "main.py", "--persistent"),
            limits=LIMITS,
        )
        two = await persistent.run(worker_request)
    finally:
        await process.close()
        await persistent.close()
    assert one.ok and two.ok, (one.error, two.error)
    assert 0.3 < one.cpu_seconds < 5
    assert 0.3 < two.cpu_seconds < 5


KILLED_NODE_SCRIPT = """
import asyncio, sys
from pathlib import Path
from issc.manifest import Limits
from node.executor import ProcessExecutor, RunRequest
from node.sandbox import default_sandbox

async def main() -> None:
    executor = ProcessExecutor(Path(sys.argv[1]), default_sandbox())
    request = RunRequest(lease=1, task_id="t", input=sys.argv[3], bundle_dir=Path(sys.argv[2]),
                         entrypoint=("python3", "main.py"), limits=Limits(wall_seconds=120))
    await executor.run(request)

asyncio.run(main())
"""


@needs_bwrap
async def test_a_node_killed_mid_run_ends_the_left_sandbox_when_it_starts_again(
    tmp_path: Path,
) -> None:
    from node.sandbox import NAMESPACE_RECORD, kill_recorded_namespaces

    token = f"issc-test-{uuid.uuid4().hex}"
    bundle = make_bundle(tmp_path, CANCELLED_TREE)
    script = tmp_path / "killed_node.py"
    script.write_text(KILLED_NODE_SCRIPT)
    scratch = tmp_path / "scratch"
    node = subprocess.Popen(
        [sys.executable, str(script), str(scratch), str(bundle), token],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 20
        while len(processes_with(token)) < 2 or not list(scratch.glob(f"{NAMESPACE_RECORD}*")):
            assert node.poll() is None and time.monotonic() < deadline, "the run never started"
            await asyncio.sleep(0.05)
    finally:
        node.kill()  # SIGKILL: the node cannot clean up
        node.wait()
    await asyncio.sleep(0.3)
    if os.geteuid() == 0:  # as nobody, PID 1 outlives bwrap (node.sandbox.kill_group)
        assert processes_with(token), "the sandbox died with the node after all"
    assert kill_recorded_namespaces(scratch) <= 1  # what a node does when it starts
    assert await gone(token)
    assert not list(scratch.glob(f"{NAMESPACE_RECORD}*"))
