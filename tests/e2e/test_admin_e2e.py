"""The admin's issc-ctl against a real hub with real nodes: every command's ``--json`` shape,
project pause / resume / cancel with tasks running, volunteers and their export, ``watch``,
and the control socket refusing anyone but the hub's user and root.

The gate project (see GATE_PROGRAM) holds tasks "running" for as long as a test needs.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import (
    Cluster,
    GateProject,
    Hub,
    OwnerKey,
    holds_for,
    pid_alive,
    run_tool,
    tool,
    wait_until,
    write_tasks,
)

pytestmark = pytest.mark.e2e

STATES = ["NA", "TA", "A", "C", "F", "X"]
CANCELLED = "cancelled by admin"


def ctl(hub: Hub, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool("issc-ctl", "--socket", str(hub.control_socket), *argv, check=check)


def ctl_json(hub: Hub, *argv: str) -> Any:
    """``issc-ctl --json ARGV``: exactly one JSON document on stdout, nothing on stderr."""
    done = ctl(hub, "--json", *argv)
    assert done.stderr == ""
    return json.loads(done.stdout)


def counts(hub: Hub, project: str) -> dict[str, int]:
    (found,) = [p for p in hub.query("projects") if p["name"] == project]
    return dict(found["tasks"])


def start_gate(
    cluster: Cluster,
    gate: GateProject,
    owner_key: OwnerKey,
    tmp_path: Path,
    tasks: int,
    nodes: dict[str, str],
    slots: int = 1,
) -> tuple[Hub, dict[str, str]]:
    """A hub with the gate project and ``tasks`` tasks, and one node per (name, volunteer)
    in ``nodes``; returns the hub and the node ids by name."""
    hub = cluster.hub()
    hub.ingest(gate.bundle)
    ids = {}
    for name, volunteer in nodes.items():
        node = cluster.node(
            hub, name, trusted_keys={"gate": owner_key.public}, volunteer=volunteer, slots=slots
        )
        ids[name] = node.wait_joined(hub)
    task_file = tmp_path / "gate-tasks.jsonl"
    write_tasks(task_file, "gate", [(f"t-{i}", gate.task_input(i)) for i in range(1, tasks + 1)])
    hub.ingest(task_file)
    return hub, ids


# ---- every command's --json shape --------------------------------------------------------


def test_every_command_prints_its_contract_shape(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, ids = start_gate(
        cluster, gate_project, owner_key, tmp_path, 4, {"node1": "alice", "node2": "bob"}
    )
    wait_until(lambda: counts(hub, "gate")["A"] == 2, what="a task running on each node")

    status = ctl_json(hub, "status")
    assert list(status["tasks"]) == STATES
    assert status["tasks"] == {**dict.fromkeys(STATES, 0), "NA": 2, "A": 2}
    assert status["nodes"] == {"connected": 2}
    assert status["projects"] == 1
    assert isinstance(status["tasks_per_second"], float)

    nodes = ctl_json(hub, "nodes")
    assert {n["node"]: n["volunteer"] for n in nodes} == {
        ids["node1"]: "alice",
        ids["node2"]: "bob",
    }
    for n in nodes:
        assert {"node", "volunteer", "slots", "leases", "address", "via"} <= set(n)
        assert (n["slots"], n["leases"], n["via"]) == (1, 1, None)
        assert n["address"].startswith("127.0.0.1:")

    assert ctl_json(hub, "projects") == [
        {"name": "gate", "version": 1, "paused": False, "tasks": status["tasks"]}
    ]

    tasks = ctl_json(hub, "tasks", "gate")
    assert [set(t) for t in tasks] == [{"id", "state", "node", "attempts"}] * 4
    running = {t["id"]: t["node"] for t in tasks if t["state"] == "A"}
    assert sorted(running.values()) == sorted(ids.values())
    assert ctl_json(hub, "tasks", "gate", "--state", "A") == [t for t in tasks if t["state"] == "A"]

    first = next(iter(running))
    detail = ctl_json(hub, "task", "gate", first)
    assert (detail["id"], detail["state"], detail["node"]) == (first, "A", running[first])
    assert [h["outcome"] for h in detail["history"]] == [None]
    assert ctl(hub, "task", "gate", first).stdout.startswith(f"task {first}: A, 1 attempt(s)")

    volunteers = {v["volunteer"]: v for v in ctl_json(hub, "volunteers")}
    assert set(volunteers) == {"alice", "bob"}
    for name in ("alice", "bob"):
        v = volunteers[name]
        assert {"volunteer", "credit", "tasks_completed"} <= set(v)
        assert (v["credit"], v["tasks_completed"], v["nodes"], v["connected"]) == (0.0, 0, 1, 1)
        assert v["projects"] == ["gate"]

    watch = ctl_json(hub, "watch")
    assert set(watch) == {"at", "nodes", "tasks", "tasks_per_second", "projects"}
    assert watch["nodes"] == {"connected": 2}
    assert watch["tasks"] == status["tasks"]
    assert [p["name"] for p in watch["projects"]] == ["gate"]

    gate_project.open_gate()
    wait_until(lambda: counts(hub, "gate")["C"] == 4, what="every task to complete")
    volunteers = {v["volunteer"]: v for v in ctl_json(hub, "volunteers")}
    assert sum(v["tasks_completed"] for v in volunteers.values()) == 4
    assert all(v["credit"] > 0 for v in volunteers.values())

    human = ctl(hub, "volunteers").stdout.splitlines()
    assert human[0].split()[:4] == ["VOLUNTEER", "CREDIT", "TASKS", "COMPLETED"]
    assert [line.split()[0] for line in human[1:]] == ["alice", "bob"]


def test_volunteer_add_prints_a_token_and_export_holds_everything_about_one(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, ids = start_gate(cluster, gate_project, owner_key, tmp_path, 2, {"node1": "alice"})
    gate_project.open_gate()
    wait_until(lambda: counts(hub, "gate")["C"] == 2, what="alice's node to finish both tasks")

    # The human form is the token alone, for TOKEN=$(issc-ctl volunteer add carol).
    token = ctl(hub, "volunteer", "add", "carol").stdout
    assert token.startswith("issc-") and token.endswith("\n") and len(token.split()) == 1
    added = ctl_json(hub, "volunteer", "add", "carol")
    assert set(added) == {"volunteer", "token"} and added["volunteer"] == "carol"
    assert added["token"] != token.strip()  # another one-time token

    doc = ctl_json(hub, "volunteer", "export", "alice")
    assert {
        "volunteer",
        "created_at",
        "credit",
        "tasks_completed",
        "enrollment_tokens",
        "nodes",
        "tasks",
        "leases",
        "projects",
    } <= set(doc)
    assert (doc["volunteer"], doc["tasks_completed"], doc["projects"]) == ("alice", 2, ["gate"])
    (node,) = doc["nodes"]
    assert node["node"] == ids["node1"] and node["connected"] is True
    assert node["public_key"].startswith("ed25519:")
    assert {"first_seen", "last_seen", "address"} <= set(node)
    assert sorted((t["id"], t["state"]) for t in doc["tasks"]) == [("t-1", "C"), ("t-2", "C")]
    assert all(t["cpu_seconds"] >= 0 and t["finished_at"] for t in doc["tasks"])
    assert sorted(lease["task"] for lease in doc["leases"]) == ["t-1", "t-2"]
    assert "hash" not in json.dumps(doc)

    carol = ctl_json(hub, "volunteer", "export", "carol")
    assert len(carol["enrollment_tokens"]) == 2 and carol["nodes"] == []
    assert all(t["used_at"] is None for t in carol["enrollment_tokens"])

    missing = ctl(hub, "volunteer", "export", "nobody", check=False)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "issc-ctl: volunteer export: no volunteer named 'nobody'\n"


# ---- pause, resume, cancel with tasks running -------------------------------------------


def test_pause_resume_and_cancel_with_tasks_running(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, ids = start_gate(cluster, gate_project, owner_key, tmp_path, 6, {"node1": "alice"}, 2)
    wait_until(lambda: len(gate_project.started()) == 2, what="two tasks to start")

    paused = ctl_json(hub, "project", "pause", "gate")
    assert (paused["name"], paused["paused"]) == ("gate", True)
    assert ctl(hub, "projects").stdout.splitlines()[1].split()[2] == "paused"

    # Running leases finish; nothing new is offered while the project is paused.
    gate_project.open_gate()
    wait_until(lambda: counts(hub, "gate")["C"] == 2, what="the running tasks to finish")
    (gate_project.marks / "gate").unlink()
    holds_for(
        lambda: len(gate_project.started()) == 2 and counts(hub, "gate")["NA"] == 4,
        1.5,
        what="no offers for a paused project",
    )

    resumed = ctl(hub, "project", "resume", "gate").stdout
    # The offers to the idle node went out in the batch that holds the resume: one per
    # slot, or two per slot if the node queues short tasks (its tasks so far took under
    # a second: docs/design.md, "Prefetch").
    offered = 4 if "NA 0  TA 4" in resumed else 2
    assert resumed == f"project gate resumed: NA {4 - offered}  TA {offered}  A 0  C 2  F 0  X 0\n"
    wait_until(lambda: len(gate_project.started()) == 4, what="two more tasks to start")
    wait_until(lambda: counts(hub, "gate")["A"] == offered, what="their leases to be confirmed")
    running = [run for run in gate_project.started() if hub.task("gate", run.task)["state"] == "A"]
    assert len(running) == 2 and all(pid_alive(run.pid) for run in running)

    cancelled = ctl_json(hub, "project", "cancel", "gate")
    # The reply comes after the commit: every unfinished task is X already.
    assert cancelled["tasks"] == {**dict.fromkeys(STATES, 0), "C": 2, "X": 4}

    for run in running:
        wait_until(lambda run=run: not pid_alive(run.pid), what=f"{run.task} to be stopped")
    tasks = {t["id"]: t for t in ctl_json(hub, "tasks", "gate")}
    never_ran = {t for t in tasks} - {run.task for run in gate_project.started()}
    assert len(never_ran) == 2
    x_tasks = {i for i, t in tasks.items() if t["state"] == "X"}
    assert x_tasks == never_ran | {run.task for run in running}
    assert sum(t["state"] == "C" for t in tasks.values()) == 2
    history = ctl_json(hub, "task", "gate", running[0].task)["history"]
    assert history[-1]["outcome"] == "cancelled" and history[-1]["detail"] == CANCELLED

    lines = hub.wait_results("gate", 6)
    x_lines = [line for line in lines if line["state"] == "X"]
    assert len(x_lines) == 4
    assert {(line["error"], line["result"]) for line in x_lines} == {(CANCELLED, None)}
    by_id = {line["id"]: line for line in x_lines}
    for run in running:  # the ones that ran say where they were stopped
        assert (by_id[run.task]["node"], by_id[run.task]["volunteer"]) == (ids["node1"], "alice")

    # Nothing more is offered: the node sits idle with free slots.
    gate_project.open_gate()
    holds_for(
        lambda: (
            len(gate_project.started()) == 4
            and hub.query("nodes")[0]["leases"] == 0
            and counts(hub, "gate") == {**dict.fromkeys(STATES, 0), "C": 2, "X": 4}
        ),
        1.5,
        what="nothing offered after the cancel",
    )
    assert len(hub.results("gate")) == 6


def test_project_commands_name_an_unknown_project(cluster: Cluster) -> None:
    hub = cluster.hub()
    for action in ("pause", "resume", "cancel"):
        done = ctl(hub, "project", action, "nosuch", check=False)
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == f"issc-ctl: project {action}: no project named 'nosuch'\n"


# ---- watch ---------------------------------------------------------------------------------


def test_watch_prints_a_line_a_second_when_not_a_terminal_and_ends_on_ctrl_c(
    cluster: Cluster, owner_key: OwnerKey, gate_project: GateProject, tmp_path: Path
) -> None:
    hub, _ = start_gate(cluster, gate_project, owner_key, tmp_path, 3, {"node1": "alice"})
    watcher = subprocess.Popen(
        [tool("issc-ctl"), "--socket", str(hub.control_socket), "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        started = time.monotonic()
        gate_project.open_gate()
        second = watcher.stdout.readline()
        assert 0.5 < time.monotonic() - started < 3.0  # about one poll a second
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
        assert watcher.stderr is not None and watcher.stderr.read() == ""
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
    for line in (first, second):
        assert "nodes 1" in line and "tasks/s" in line and "gate " in line
        assert "\x1b" not in line  # no cursor movement into a pipe
    assert "(C 0 F 0 X 0)" in first


# ---- the control socket is for admins only ------------------------------------------------


@pytest.fixture
def open_socket_dir() -> Iterator[Path]:
    """A directory under /tmp that the user nobody can enter (the test's tmp_path is
    0700) and nobody but root can write: the hub accepts it for its control socket."""
    directory = Path(tempfile.mkdtemp(prefix="issc-ctl-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the user nobody, with no capabilities; skip where that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test runs issc-ctl as the user nobody")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("there is no user nobody on this system")
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        command = [
            setpriv,
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "--inh-caps=-all",
            *argv,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    else:
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=30,
                user=nobody.pw_uid,
                group=nobody.pw_gid,
                extra_groups=[],
            )
        except PermissionError as exc:
            pytest.skip(f"the user nobody cannot run this venv's issc-ctl: {exc}")
    if done.returncode in (126, 127) or "ModuleNotFoundError" in done.stderr:
        pytest.skip(f"the user nobody cannot run this venv's issc-ctl: {done.stderr.strip()}")
    if "can't open file" in done.stderr or "Permission denied: '" in done.stderr:
        # The checkout lies under a directory nobody may enter (a 0700 temp dir, /root).
        pytest.skip(f"the user nobody cannot reach this checkout: {done.stderr.strip()[:200]}")
    return done


def test_the_control_socket_refuses_another_uid(cluster: Cluster, open_socket_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test runs issc-ctl as the user nobody")
    socket_path = open_socket_dir / "ctl.sock"
    hub = cluster.hub(control_socket=str(socket_path))
    assert oct(socket_path.stat().st_mode & 0o777) == "0o600"
    argv = (tool("issc-ctl"), "--socket", str(socket_path), "status")

    # The socket's mode keeps nobody out before the hub hears of it.
    done = as_nobody(*argv)
    assert (done.returncode, done.stdout) == (3, "")
    assert "permission denied on the hub control socket" in done.stderr

    # Opened to everyone, the connection reaches the hub, which checks who is asking.
    socket_path.chmod(0o666)
    done = as_nobody(*argv)
    uid = pwd.getpwnam("nobody").pw_uid
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.startswith("issc-ctl: status: the hub at ")
    assert f"permission denied: uid {uid} may not use this hub's control socket" in done.stderr
    assert "Traceback" not in done.stderr
    wait_until(
        lambda: f"control: refused a connection from uid {uid}" in hub.log_text(),
        what="the hub to log the refusal",
    )
    assert hub.ctl("status")["nodes"] == {"connected": 0}  # root is still served
    assert hub.alive


@pytest.mark.parametrize(
    ("arrange", "complaint"),
    [
        ("world-writable", "is writable by group or others (mode 0777)"),
        ("symlink-dir", "is a symbolic link"),
        ("symlink-socket", "is a symbolic link; the hub will not use it"),
        ("regular-file", "exists and is not a socket; the hub will not replace it"),
    ],
)
def test_the_hub_refuses_a_control_socket_others_could_tamper_with(
    tmp_path: Path, arrange: str, complaint: str
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    socket_path = real / "ctl.sock"
    if arrange == "world-writable":
        real.chmod(0o777)
    elif arrange == "symlink-dir":
        (tmp_path / "link").symlink_to(real)
        socket_path = tmp_path / "link" / "ctl.sock"
    elif arrange == "symlink-socket":
        (real / "elsewhere").write_text("")
        socket_path.symlink_to(real / "elsewhere")
    else:
        socket_path.write_text("precious")
    config = tmp_path / "hub.yaml"
    config.write_text(
        f"listen: 127.0.0.1:0\ndata_dir: {tmp_path / 'data'}\ncontrol_socket: {socket_path}\n"
    )
    done = run_tool("issc-hub", "--config", str(config), check=False)
    assert done.returncode == 1
    assert "issc-hub: error: control_socket: " in done.stderr
    assert complaint in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "hub.addr").exists()
    if arrange == "regular-file":
        assert socket_path.read_text() == "precious"


def test_a_second_hub_on_the_same_control_socket_is_refused(cluster: Cluster) -> None:
    hub = cluster.hub()
    second = hub.root / "second.yaml"
    second.write_text(
        f"listen: 127.0.0.1:0\ndata_dir: {hub.root / 'other'}\n"
        f"control_socket: {hub.control_socket}\n"
    )
    done = run_tool("issc-hub", "--config", str(second), check=False)
    assert done.returncode == 1
    assert f"another process (a hub?) is listening on {hub.control_socket}" in done.stderr
    assert hub.ctl("status")["projects"] == 0  # the first hub's socket is untouched
