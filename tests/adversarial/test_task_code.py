"""The bad-input suite, task side: hostile task code run through the node's process-mode
executor (``node.executor.ProcessExecutor``) in the node's real sandbox
(``node.sandbox.default_sandbox()``: bubblewrap where it works, ``nobody`` under root).

Every case asserts the exact outcome (docs/security.md, "The bad-input suite"), then that
a good task on the same executor still succeeds and that nothing outside the run's scratch
directory changed: the node's data_dir (its key and a canary) and the directory around it
are exactly as before (``adv_tree``), and the scratch directory itself is gone.

Limits are small so that every case takes a few seconds at most. Cases that need
bubblewrap or a root node skip, saying why, where those are missing.

At the end: how the node chooses its sandbox when it runs as root without bubblewrap
(``sandbox: auto``), the fix for tasks that all failed with "Permission denied".
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from issc.errors import ExecutionError
from issc.manifest import Limits
from node.executor import ProcessExecutor, RunOutcome, RunRequest
from node.sandbox import (
    NOBODY,
    Sandbox,
    default_sandbox,
    interpreter_unreachable,
    task_owner,
    unreachable_interpreter_message,
)

pytestmark = pytest.mark.timeout(60)

SANDBOX = default_sandbox()
BWRAP = SANDBOX.bwrap is not None
ROOT = os.geteuid() == 0
LIMITS = Limits(wall_seconds=10, memory_mb=256, output_mb=1)
Tree = dict[str, tuple[str, int, int, int]]

needs_bwrap = pytest.mark.skipif(not BWRAP, reason="bubblewrap (bwrap) is not usable here")
needs_root = pytest.mark.skipif(
    not ROOT,
    reason="RLIMIT_NPROC applies to a root node's task uid only; a fork bomb here "
    "would hit the volunteer's own processes",
)
_owner = task_owner(SANDBOX)
_unreachable = interpreter_unreachable(_owner) if not BWRAP and _owner is not None else None
runs_tasks = pytest.mark.skipif(
    _unreachable is not None,
    reason=f"a root node without bubblewrap cannot run this Python as nobody: {_unreachable}",
)


@dataclass
class Bench:
    """A node data_dir with a key and a canary, an executor on its scratch dir, and the
    directory around it watched."""

    root: Path  # tmp_path: holds the data_dir, the bundles and a canary of its own
    data_dir: Path
    executor: ProcessExecutor
    tree: Callable[[Path], Tree]
    lease: int = 0

    def bundle(self, source: str) -> Path:
        self.lease += 1
        bundle = self.root / f"bundle-{self.lease}"
        bundle.mkdir()
        (bundle / "main.py").write_text(textwrap.dedent(source), encoding="utf-8")
        return bundle

    async def run(
        self,
        source: str,
        task_input: Any = None,
        *,
        limits: Limits = LIMITS,
        args: tuple[str, ...] = (),
    ) -> RunOutcome:
        """Run ``source`` as a task; afterwards nothing outside its scratch dir changed."""
        bundle = self.bundle(source)
        before = self.tree(self.root)
        request = RunRequest(
            lease=self.lease,
            task_id=f"t-{self.lease}",
            input=task_input,
            bundle_dir=bundle,
            entrypoint=("python3", "main.py", *args),
            limits=limits,
        )
        outcome = await self.executor.run(request)
        assert self.tree(self.root) == before
        assert not (self.data_dir / "scratch" / str(self.lease)).exists()
        return outcome

    async def still_works(self) -> None:
        """Other work goes on: a good task on the same executor succeeds."""
        outcome = await self.run("import json, sys\nprint(sum(json.load(sys.stdin)))\n", [1, 2])
        assert (outcome.ok, outcome.result, outcome.error) == (True, 3, None)


@pytest.fixture
async def adv_bench(tmp_path: Path, adv_tree: Callable[[Path], Tree]) -> AsyncIterator[Bench]:
    (tmp_path / "canary").write_text("outside the node")
    data = tmp_path / "node"
    data.mkdir()
    key = data / "node.key"
    key.write_text("-----BEGIN PRIVATE KEY----- secret")
    key.chmod(0o600)
    (data / "canary").write_text("inside the node's data_dir")
    (data / "scratch").mkdir()
    executor = ProcessExecutor(data / "scratch", SANDBOX)
    try:
        yield Bench(tmp_path, data, executor, adv_tree)
    finally:
        await executor.close()


def stderr_line(outcome: RunOutcome) -> str:
    """The last line of a failed run's error: the exception of a Python traceback."""
    assert outcome.error is not None
    return outcome.error.strip().splitlines()[-1]


# ---- limits ----------------------------------------------------------------------------------


@runs_tasks
async def test_a_task_that_loops_forever_fails_at_the_wall_limit(adv_bench: Bench) -> None:
    limits = Limits(wall_seconds=1.5, memory_mb=256, output_mb=1)
    started = time.monotonic()
    outcome = await adv_bench.run("while True:\n    pass\n", limits=limits)
    assert (outcome.ok, outcome.error) == (False, "wall time limit of 1.5 s exceeded")
    assert time.monotonic() - started < 6
    await adv_bench.still_works()


@runs_tasks
@needs_root
async def test_a_task_that_forks_without_end_is_bounded_and_fails(adv_bench: Bench) -> None:
    token = f"issc-adv-{uuid.uuid4().hex}"
    bomb = """
    import os, time
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
    """
    outcome = await adv_bench.run(bomb, args=(token,))
    assert not outcome.ok
    assert outcome.error is not None and outcome.error.startswith("exit status 1: Traceback")
    assert stderr_line(outcome) == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    assert await gone(token)  # every fork died with the run
    await adv_bench.still_works()


@runs_tasks
async def test_a_4_gib_allocation_is_refused(adv_bench: Bench) -> None:
    outcome = await adv_bench.run("block = bytearray(4 * 1024 ** 3)\nprint(len(block))\n")
    assert not outcome.ok
    assert outcome.error is not None and outcome.error.startswith("exit status 1: Traceback")
    assert stderr_line(outcome) == "MemoryError"
    await adv_bench.still_works()


@runs_tasks
async def test_a_10_gib_file_is_refused_by_the_file_size_limit(adv_bench: Bench) -> None:
    program = """
    with open("tmp/big", "wb") as f:
        f.seek(10 * 1024 ** 3)
        f.write(b"x")
    """
    outcome = await adv_bench.run(program)
    assert not outcome.ok
    assert outcome.error is not None and outcome.error.startswith("exit status 1: Traceback")
    assert stderr_line(outcome) == "OSError: [Errno 27] File too large"
    await adv_bench.still_works()


@runs_tasks
async def test_a_gigabyte_on_stdout_fails_naming_the_cap(adv_bench: Bench) -> None:
    program = """
    import sys
    block = "x" * (1024 * 1024)
    for _ in range(1024):
        sys.stdout.write(block)
    """
    started = time.monotonic()
    outcome = await adv_bench.run(program)
    assert not outcome.ok
    assert outcome.error is not None
    assert outcome.error.startswith(
        "stdout reached the output_mb limit of 1 MiB; exit status 1: Traceback"
    ), outcome.error
    assert stderr_line(outcome) == "OSError: [Errno 27] File too large"
    assert time.monotonic() - started < 10
    await adv_bench.still_works()


# ---- secrets and the network -----------------------------------------------------------------

READ = """
import json, sys
path = json.load(sys.stdin)
try:
    print(json.dumps(open(path).read()))
except OSError as exc:
    print(json.dumps(type(exc).__name__))
"""


@runs_tasks
async def test_task_code_cannot_read_the_nodes_key(adv_bench: Bench) -> None:
    if not BWRAP and not ROOT:
        pytest.skip(
            "without bubblewrap a non-root node's task code reads what the node reads "
            "(docs/security.md, 'Without bubblewrap')"
        )
    outcome = await adv_bench.run(READ, str(adv_bench.data_dir / "node.key"))
    # bubblewrap: the data_dir is not mounted at all; root without it: nobody may not read.
    expected = "FileNotFoundError" if BWRAP else "PermissionError"
    assert (outcome.ok, outcome.result) == (True, expected)
    await adv_bench.still_works()


@runs_tasks
async def test_task_code_cannot_read_etc_shadow(adv_bench: Bench) -> None:
    if not Path("/etc/shadow").exists():
        pytest.skip("this system has no /etc/shadow")
    outcome = await adv_bench.run(READ, "/etc/shadow")
    # bubblewrap binds /dev/null over it, on a nodev mount; otherwise the task uid (nobody
    # under a root node) may not read it. Either way: EACCES.
    assert (outcome.ok, outcome.result) == (True, "PermissionError")
    await adv_bench.still_works()


@runs_tasks
@needs_bwrap
async def test_task_code_cannot_connect_to_the_hubs_port(adv_bench: Bench) -> None:
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen()
    hub.setblocking(False)
    program = """
    import json, socket, sys
    try:
        socket.create_connection(("127.0.0.1", json.load(sys.stdin)), timeout=2)
        print(json.dumps("connected"))
    except OSError as exc:
        print(json.dumps(type(exc).__name__))
    """
    try:
        outcome = await adv_bench.run(program, hub.getsockname()[1])
        assert (outcome.ok, outcome.result) == (True, "ConnectionRefusedError")
        with pytest.raises(BlockingIOError):
            hub.accept()  # nothing ever reached the hub
    finally:
        hub.close()
    await adv_bench.still_works()


# ---- a process that escapes the run ------------------------------------------------------------


def processes_with(token: str) -> dict[int, list[bytes]]:
    """Live (not zombie) processes whose argv holds ``token``: pid -> argv."""
    found: dict[int, list[bytes]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")[:-1]
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        zombie = stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"
        if token.encode() in argv and not zombie:
            found[int(name)] = argv
    return found


async def gone(token: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while processes_with(token):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


SETSID_GRANDCHILD = """
import os, sys, time
token = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        code = "import time\\nwhile True: time.sleep(0.2)"
        os.execv(sys.executable, [sys.executable, "-c", code, token])
    os._exit(0)
time.sleep(float(sys.argv[2]))
print("parent done")
"""


@runs_tasks
async def test_a_setsid_grandchild_is_killed_at_the_end_of_the_run(adv_bench: Bench) -> None:
    token = f"issc-adv-{uuid.uuid4().hex}"
    seen: dict[int, list[bytes]] = {}

    async def watch() -> None:
        while True:
            seen.update(processes_with(token))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        outcome = await adv_bench.run(SETSID_GRANDCHILD, args=(token, "1.5"))
    finally:
        watcher.cancel()
    assert (outcome.ok, outcome.result, outcome.error) == (True, "parent done", None)
    # The token was in the argv of both: the task process and the grandchild it left
    # (bubblewrap's own argv holds the task's too; it is neither).
    mine = [argv for argv in seen.values() if not argv[0].endswith(b"/bwrap")]
    task = [a for a in mine if a[-3].endswith(b"/main.py") and a[-2:] == [token.encode(), b"1.5"]]
    grandchild = [a for a in mine if a[-3] == b"-c" and a[-1] == token.encode()]
    assert task and grandchild, seen
    assert await gone(token), processes_with(token)
    await adv_bench.still_works()


# ---- choosing the sandbox: a root node without bubblewrap -------------------------------------


@pytest.fixture
def adv_no_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's sandbox as detected on a root machine where bubblewrap is unusable."""
    import node.sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "default_sandbox", lambda: Sandbox(run_as=NOBODY))
    monkeypatch.setattr(sandbox_module.os, "geteuid", lambda: 0)


def test_sandbox_auto_refuses_when_nobody_cannot_run_the_interpreter(
    adv_no_bwrap: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.sandbox as sandbox_module

    why = "/root/.pyenv/versions/3.11.7/bin/python3.11: Permission denied"
    monkeypatch.setattr(sandbox_module, "interpreter_unreachable", lambda owner: why)
    with pytest.raises(ExecutionError) as refused:
        sandbox_module.sandbox_for("auto")
    message = str(refused.value)
    assert message == unreachable_interpreter_message(NOBODY, why)
    assert "\n" not in message
    assert message.startswith("sandbox: auto: bubblewrap is not usable and this node runs as root")
    assert why in message
    assert "install bubblewrap" in message and "'sandbox: none'" in message
    # The other settings are unchanged: none runs unconfined, bubblewrap is required.
    assert sandbox_module.sandbox_for("none") == Sandbox()
    with pytest.raises(ExecutionError, match="bwrap is not installed or not usable"):
        sandbox_module.sandbox_for("bubblewrap")


def test_sandbox_auto_runs_as_today_when_nobody_can_run_the_interpreter(
    adv_no_bwrap: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "interpreter_unreachable", lambda owner: None)
    assert sandbox_module.sandbox_for("auto") == Sandbox(run_as=NOBODY)


@pytest.mark.skipif(not ROOT, reason="only root can start a process as nobody")
def test_the_reachability_probe_runs_the_interpreter_as_nobody() -> None:
    """The real probe agrees with the file system: every directory on the way to the
    interpreter must let ``nobody`` through."""
    way = [Path(sys.executable), Path(os.path.realpath(sys.executable))]
    blocked = any(not os.stat(parent).st_mode & 0o001 for path in way for parent in path.parents)
    problem = interpreter_unreachable.__wrapped__(NOBODY)
    if blocked:
        assert problem is not None and problem.startswith(f"{sys.executable}: ")
    else:
        assert problem is None


def test_issc_node_refuses_to_start_with_one_line_naming_the_cause(
    adv_no_bwrap: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import node.cli
    import node.sandbox as sandbox_module

    why = "/root/.pyenv/versions/3.11.7/bin/python3.11: Permission denied"
    monkeypatch.setattr(sandbox_module, "interpreter_unreachable", lambda owner: why)
    started: list[object] = []
    monkeypatch.setattr(node.cli, "NodeClient", lambda config: started.append(config))
    config = tmp_path / "node.yaml"
    config.write_text(
        json.dumps(
            {
                "hub": "127.0.0.1:9",
                "volunteer": "alice",
                "data_dir": str(tmp_path / "node"),
                "projects": ["primes"],
                "trusted_keys": {"primes": "ed25519:" + "A" * 43 + "="},
            }
        ),
        encoding="utf-8",
    )
    assert node.cli.main(["--config", str(config), "--log-level", "ERROR"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"issc-node: error: {unreachable_interpreter_message(NOBODY, why)}"]
    assert started == []  # refused before the node started
