"""issc-ctl against a real issc-hub process: the JSON shapes of CONTRACT.md, end to end.

Each hub runs as ``issc-hub --config hub.yaml`` listening on 127.0.0.1:0 with its own
data directory; issc-ctl runs as a subprocess, the way scripts run it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from issc.bundle import pack_bundle
from issc.keys import generate_key
from issc.project_cli import drop_into_inbox

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
if not (BIN / "issc-hub").exists():
    BIN = REPO / ".venv" / "bin"
STATES = ["NA", "TA", "A", "C", "F", "X"]


@dataclass
class HubProcess:
    dir: Path
    config: Path
    process: subprocess.Popen[bytes]
    address: str

    @property
    def control_socket(self) -> Path:
        return self.dir / "data" / "control.sock"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "issc-ctl"), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def ctl_json(self, *args: str) -> object:
        done = self.ctl("--json", *args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        return json.loads(done.stdout)  # one document, nothing else on stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_hub(directory: Path) -> HubProcess:
    """Start issc-hub on 127.0.0.1:0 with data in ``directory/data``; wait for hub.addr."""
    config = directory / "hub.yaml"
    config.write_text("listen: 127.0.0.1:0\ndata_dir: data\nheartbeat_interval: 1\n")
    log = (directory / "hub.log").open("wb")
    process = subprocess.Popen(
        [str(BIN / "issc-hub"), "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    addr_file = directory / "data" / "hub.addr"
    deadline = time.monotonic() + 30
    while not addr_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(5)
            pytest.fail(f"issc-hub did not start:\n{(directory / 'hub.log').read_text()}")
        time.sleep(0.05)
    return HubProcess(directory, config, process, addr_file.read_text().strip())


@contextmanager
def running_hub() -> Iterator[HubProcess]:
    # A short path: the control socket's path must fit AF_UNIX's ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="ctl-e2e", dir="/tmp") as name:
        process = start_hub(Path(name))
        try:
            yield process
        finally:
            process.stop()


@pytest.fixture(scope="module")
def empty_hub() -> Iterator[HubProcess]:
    """One hub for the tests that only read; none of them adds anything."""
    with running_hub() as process:
        yield process


@pytest.fixture
def hub() -> Iterator[HubProcess]:
    """A hub of the test's own, to change or stop."""
    with running_hub() as process:
        yield process


def add_project(hub: HubProcess, name: str, task_ids: list[str]) -> None:
    """Sign a tiny project, drop it and its tasks into the hub's inbox, wait until ingested."""
    src = hub.dir / "src" / name
    src.mkdir(parents=True)
    (src / "project.yaml").write_text(
        f"name: {name}\nversion: 3\nentrypoint: [python3, main.py]\nmode: process\n"
        "limits: {wall_seconds: 60, memory_mb: 256, output_mb: 1}\nquorum: 1\n"
    )
    (src / "main.py").write_text("import json, sys\nprint(json.load(sys.stdin) * 2)\n")
    key = hub.dir / f"{name}.key"
    generate_key(key)
    bundle = hub.dir / f"{name}.issc"
    pack_bundle(src, key, bundle)
    tasks = hub.dir / f"{name}-tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"project": name, "id": t, "input": i}) + "\n"
            for i, t in enumerate(task_ids)
        )
    )
    inbox = hub.dir / "data" / "inbox"
    drop_into_inbox(bundle, inbox)
    drop_into_inbox(tasks, inbox)
    deadline = time.monotonic() + 30
    while True:
        projects = hub.ctl_json("projects")
        assert isinstance(projects, list)
        mine = [p for p in projects if p["name"] == name]
        if mine and sum(mine[0]["tasks"].values()) == len(task_ids):
            return
        assert time.monotonic() < deadline, f"hub did not ingest {name}: {projects}"
        time.sleep(0.1)


# ---- an empty hub -----------------------------------------------------------------------


def test_status_json_of_an_empty_hub(empty_hub: HubProcess) -> None:
    status = empty_hub.ctl_json("status")
    assert isinstance(status, dict)
    assert status["tasks"] == dict.fromkeys(STATES, 0)
    assert list(status["tasks"]) == STATES
    assert status["nodes"] == {"connected": 0}
    assert status["projects"] == 0


def test_nodes_and_projects_json_of_an_empty_hub(empty_hub: HubProcess) -> None:
    assert empty_hub.ctl_json("nodes") == []
    assert empty_hub.ctl_json("projects") == []


def test_tasks_of_an_unknown_project_exits_nonzero_naming_it(empty_hub: HubProcess) -> None:
    done = empty_hub.ctl("--json", "tasks", "nosuch")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "nosuch" in done.stderr
    assert done.stderr.startswith("issc-ctl: tasks: ")


def test_human_forms_against_a_real_hub(empty_hub: HubProcess) -> None:
    status = empty_hub.ctl("status")
    assert status.returncode == 0, status.stderr
    assert f"nodes connect to {empty_hub.address}" in status.stdout
    assert "0 connected" in status.stdout
    assert "0 total: NA 0  TA 0  A 0  C 0  F 0  X 0" in status.stdout
    assert empty_hub.ctl("nodes").stdout == "no nodes connected\n"
    assert empty_hub.ctl("projects").stdout == "no projects\n"


def test_socket_option_reaches_the_same_hub(empty_hub: HubProcess) -> None:
    done = subprocess.run(
        [str(BIN / "issc-ctl"), "--socket", str(empty_hub.control_socket), "--json", "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["nodes"] == {"connected": 0}


def test_volunteers_and_watch_json_of_an_empty_hub(empty_hub: HubProcess) -> None:
    assert empty_hub.ctl_json("volunteers") == []
    assert empty_hub.ctl("volunteers").stdout == "no volunteers\n"
    watch = empty_hub.ctl_json("watch")  # --json: one snapshot, then exit
    assert isinstance(watch, dict)
    assert watch["projects"] == [] and watch["nodes"] == {"connected": 0}
    assert watch["tasks"] == dict.fromkeys(STATES, 0)


def test_unknown_volunteer_and_project_exit_1_naming_them(empty_hub: HubProcess) -> None:
    for argv, label, message in [
        (["volunteer", "export", "zed"], "volunteer export", "no volunteer named 'zed'"),
        (["project", "pause", "primes"], "project pause", "no project named 'primes'"),
    ]:
        done = empty_hub.ctl("--json", *argv)
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == f"issc-ctl: {label}: {message}\n"


def test_stopped_hub_leaves_no_socket_and_ctl_says_so(hub: HubProcess) -> None:
    hub.stop()
    assert hub.process.returncode == 0
    done = hub.ctl("status")
    assert done.returncode == 3
    assert done.stderr == (
        f"issc-ctl: status: no hub control socket at {hub.control_socket}: is issc-hub running?\n"
    )


# ---- a hub with a project ---------------------------------------------------------------


def test_projects_and_tasks_json_shapes(hub: HubProcess) -> None:
    add_project(hub, "demo", ["t-1", "t-2", "t-3"])

    projects = hub.ctl_json("projects")
    assert projects == [
        {
            "name": "demo",
            "version": 3,
            "paused": False,
            "tasks": {**dict.fromkeys(STATES, 0), "NA": 3},
        }
    ]

    tasks = hub.ctl_json("tasks", "demo")
    assert isinstance(tasks, list)
    assert [set(t) for t in tasks] == [{"id", "state", "node", "attempts"}] * 3
    assert tasks == [
        {"id": t, "state": "NA", "node": None, "attempts": 0} for t in ["t-1", "t-2", "t-3"]
    ]

    assert hub.ctl_json("tasks", "demo", "--state", "NA") == tasks
    assert hub.ctl_json("tasks", "demo", "--state", "C") == []

    status = hub.ctl_json("status")
    assert isinstance(status, dict)
    assert status["projects"] == 1
    assert status["tasks"] == {**dict.fromkeys(STATES, 0), "NA": 3}

    table = hub.ctl("tasks", "demo")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["ID", "STATE", "NODE", "ATTEMPTS"]
    assert len(table.stdout.splitlines()) == 4
