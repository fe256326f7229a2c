"""issc-ctl against a fake hub: a tiny asyncio Unix-socket server with canned replies.

The fake runs its event loop in a thread, because issc-ctl's client is blocking. It
answers like hub/control.py: one reply line per request, ``unknown command`` for any
command it has no canned reply for.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub import ctl
from hub.ctl import HubErrorReply, HubUnreachable, UnknownCommandReply, main, request

pytestmark = pytest.mark.timeout(30)

SILENT = object()  # a canned reply: accept the request and never answer

STATUS = {
    "tasks": {"NA": 12, "TA": 1, "A": 3, "C": 40, "F": 2, "X": 0},
    "nodes": {"connected": 2},
    "projects": 2,
    "version": "0.1.0",
    "listen": "127.0.0.1:7411",
    "uptime_seconds": 3725.4,
    "commit_batches": 17,
}
NODES = [
    {
        "node": "n-3f2a",
        "volunteer": "alice",
        "slots": 2,
        "leases": 1,
        "address": "10.0.0.5:50122",
        "via": None,
        "last_seen_seconds_ago": 1.2,
    },
    {
        "node": "n-77bc0e",
        "volunteer": "bob@example.org",
        "slots": 16,
        "leases": 12,
        "address": "10.0.0.6:41000",
        "via": "n-3f2a",
        "last_seen_seconds_ago": 0.4,
    },
]
PROJECTS = [
    {
        "name": "mandelbrot",
        "version": 3,
        "paused": True,
        "tasks": {"NA": 10, "TA": 0, "A": 0, "C": 30, "F": 0, "X": 0},
    },
    {
        "name": "primes",
        "version": 12,
        "paused": False,
        "tasks": {"NA": 2, "TA": 1, "A": 3, "C": 10, "F": 2, "X": 0},
    },
]
TASKS = [
    {"id": "r-1", "state": "C", "node": "n-3f2a", "attempts": 1},
    {"id": "r-17", "state": "A", "node": "n-77bc0e", "attempts": 2},
    {"id": "r-100", "state": "NA", "node": None, "attempts": 0},
]
CANNED: dict[str, Any] = {
    "status": STATUS,
    "nodes": NODES,
    "projects": PROJECTS,
    "tasks": TASKS,
}


class FakeHub:
    """A control socket with canned replies per command; records every request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replies: dict[str, Any] = {}
        self.requests: list[Any] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.AbstractServer | None = None
        self.release: asyncio.Event | None = None
        self.writers: list[asyncio.StreamWriter] = []

    def answer(self, command: str, data: Any) -> None:
        self.replies[command] = {"ok": True, "data": data}

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)

    async def _start(self) -> None:
        self.release = asyncio.Event()
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        request = json.loads(await reader.readline())
        self.requests.append(request)
        command = request["command"]
        reply = self.replies.get(command, {"ok": False, "error": f"unknown command {command!r}"})
        if reply is SILENT:
            assert self.release is not None
            await self.release.wait()
        elif isinstance(reply, bytes):
            writer.write(reply)
        else:
            writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
        writer.close()

    def stop(self) -> None:
        async def stop() -> None:
            assert self.server is not None and self.release is not None
            self.release.set()
            for writer in self.writers:
                writer.close()
            self.server.close()
            await self.server.wait_closed()
            await asyncio.sleep(0)  # let released handlers finish

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ctl", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def hub(short_dir: Path) -> Iterator[FakeHub]:
    fake = FakeHub(short_dir / "control.sock")
    for command, data in CANNED.items():
        fake.answer(command, data)
    fake.start()
    yield fake
    fake.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# ---- request() --------------------------------------------------------------------------


def test_request_sends_one_json_line_and_returns_the_data(hub: FakeHub) -> None:
    assert request(hub.path, "tasks", {"project": "primes"}) == TASKS
    assert hub.requests == [{"command": "tasks", "args": {"project": "primes"}}]


def test_request_without_args_sends_an_empty_object(hub: FakeHub) -> None:
    assert request(str(hub.path), "status") == STATUS
    assert hub.requests == [{"command": "status", "args": {}}]


def test_request_raises_the_hubs_error(hub: FakeHub) -> None:
    hub.replies["tasks"] = {"ok": False, "error": "no project named 'nosuch'"}
    with pytest.raises(HubErrorReply, match="no project named 'nosuch'") as info:
        request(hub.path, "tasks", {"project": "nosuch"})
    assert not isinstance(info.value, UnknownCommandReply)


def test_request_tells_an_unknown_command_apart(hub: FakeHub) -> None:
    with pytest.raises(UnknownCommandReply, match="unknown command 'volunteers'"):
        request(hub.path, "volunteers")


def test_request_missing_socket_names_the_path(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    with pytest.raises(HubUnreachable) as info:
        request(path, "status")
    assert str(info.value) == f"no hub control socket at {path}: is issc-hub running?"


def test_request_to_a_file_that_is_not_a_socket(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    path.write_text("not a socket")
    with pytest.raises(HubUnreachable, match="not a socket"):
        request(path, "status")


def test_request_to_a_stale_socket_file(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed hub leaves behind
    with pytest.raises(HubUnreachable, match="refuses connections: is issc-hub running"):
        request(path, "status")


def test_request_permission_denied_says_whose_socket(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class DeniedSocket(socket.socket):
        def connect(self, address: Any) -> None:
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket, "socket", DeniedSocket)  # the module hub.ctl uses
    with pytest.raises(HubUnreachable) as info:
        request(short_dir / "control.sock", "status")
    assert "permission denied" in str(info.value)
    assert str(short_dir / "control.sock") in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may open any socket")
def test_request_permission_denied_on_a_real_0600_socket_of_no_access(hub: FakeHub) -> None:
    hub.path.chmod(0o000)
    try:
        with pytest.raises(HubUnreachable, match="permission denied"):
            request(hub.path, "status")
    finally:
        hub.path.chmod(0o600)


def test_request_times_out_when_the_hub_stays_silent(hub: FakeHub) -> None:
    hub.replies["status"] = SILENT
    with pytest.raises(HubUnreachable, match=r"did not answer 'status' within 0.2 s"):
        request(hub.path, "status", timeout=0.2)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "closed the connection without answering"),
        (b'{"ok": true, "data": [1, 2', "closed the connection in mid-reply"),
        (b"<html>\n", "not JSON"),
        (b'["ok"]\n', 'without "ok"'),
        (b'{"data": 1}\n', 'without "ok"'),
    ],
)
def test_request_rejects_a_garbled_reply(hub: FakeHub, raw: bytes, why: str) -> None:
    hub.replies["status"] = raw
    with pytest.raises(HubUnreachable, match=why):
        request(hub.path, "status")


# ---- --json -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "data"),
    [
        (["status"], STATUS),
        (["nodes"], NODES),
        (["projects"], PROJECTS),
        (["tasks", "primes"], TASKS),
    ],
)
def test_json_prints_exactly_one_document_and_nothing_else(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], argv: list[str], data: Any
) -> None:
    status, out, err = run(capsys, "--socket", str(hub.path), "--json", *argv)
    assert status == 0
    assert err == ""
    assert json.loads(out) == data  # fails on any extra line before or after


def test_json_prints_empty_lists_as_json(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    hub.answer("nodes", [])
    status, out, err = run(capsys, "--socket", str(hub.path), "--json", "nodes")
    assert (status, json.loads(out), err) == (0, [], "")


def test_options_may_follow_the_command(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "status", "--json", "--socket", str(hub.path))
    assert status == 0
    assert json.loads(out) == STATUS


def test_json_error_prints_nothing_on_stdout(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.replies["tasks"] = {"ok": False, "error": "no project named 'nosuch'"}
    status, out, err = run(capsys, "--socket", str(hub.path), "--json", "tasks", "nosuch")
    assert status == 1
    assert out == ""
    assert err == "issc-ctl: tasks: no project named 'nosuch'\n"


# ---- what goes over the wire ------------------------------------------------------------


def test_tasks_sends_project_and_state(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "--socket", str(hub.path), "tasks", "primes")
    run(capsys, "--socket", str(hub.path), "tasks", "primes", "--state", "c")  # any case
    assert hub.requests == [
        {"command": "tasks", "args": {"project": "primes"}},
        {"command": "tasks", "args": {"project": "primes", "state": "C"}},
    ]


def test_tasks_with_an_unknown_state_is_a_usage_error(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--socket", str(hub.path), "tasks", "primes", "--state", "DONE"])
    assert info.value.code == 2
    assert "unknown state 'DONE'" in capsys.readouterr().err
    assert hub.requests == []


# ---- human output -----------------------------------------------------------------------


def test_status_human_summary(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "--socket", str(hub.path), "status")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines == [
        "hub       issc 0.1.0, nodes connect to 127.0.0.1:7411",
        "uptime    1h 02m 05s",
        "projects  2",
        "nodes     2 connected",
        "tasks     58 total: NA 12  TA 1  A 3  C 40  F 2  X 0",
    ]


def test_status_human_summary_of_a_minimal_reply(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.answer("status", {"tasks": {"NA": 0}, "nodes": {"connected": 0}, "projects": 0})
    status, out, _ = run(capsys, "--socket", str(hub.path), "status")
    assert status == 0
    assert "tasks     0 total: NA 0  TA 0  A 0  C 0  F 0  X 0" in out


def test_status_human_summary_says_when_the_hub_is_degraded(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    reply = {"tasks": {"NA": 0}, "nodes": {"connected": 0}, "projects": 0}
    hub.answer("status", {**reply, "degraded": "database: disk full"})
    status, out, _ = run(capsys, "--socket", str(hub.path), "status")
    assert status == 0
    assert "DEGRADED  database: disk full (recovering by itself)" in out, out
    hub.answer("status", {**reply, "degraded": None})
    _, out, _ = run(capsys, "--socket", str(hub.path), "status")
    assert "DEGRADED" not in out


def test_status_human_summary_shows_what_the_hub_sent(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    transfers = {
        "bundles_sent": 3,
        "bundle_bytes_sent": 3 * 1024 * 1024,
        "file_bytes_sent": 512,
        "upload_bytes_received": 2048,
    }
    reply = {"tasks": {"NA": 0}, "nodes": {"connected": 0}, "projects": 0, "transfers": transfers}
    hub.answer("status", reply)
    status, out, _ = run(capsys, "--socket", str(hub.path), "status")
    assert status == 0
    assert "sent      3 bundles (3.0 MiB), input files 512 B; received outputs 2.0 KiB" in out, out


def test_nodes_human_table(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--socket", str(hub.path), "nodes")
    assert status == 0
    assert out.splitlines() == [
        "NODE      VOLUNTEER        SLOTS  LEASES  ADDRESS         VIA     LAST SEEN",
        "n-3f2a    alice                2       1  10.0.0.5:50122  direct  1.2s ago",
        "n-77bc0e  bob@example.org     16      12  10.0.0.6:41000  n-3f2a  0.4s ago",
    ]


def test_projects_human_table(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--socket", str(hub.path), "projects")
    assert status == 0
    assert out.splitlines() == [
        "PROJECT     VERSION  STATE   NA  TA  A   C  F  X  DONE",
        "mandelbrot        3  paused  10   0  0  30  0  0   75%",
        "primes           12  active   2   1  3  10  2  0   66%",
    ]


def test_tasks_human_table(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--socket", str(hub.path), "tasks", "primes")
    assert status == 0
    assert out.splitlines() == [
        "ID     STATE  NODE      ATTEMPTS",
        "r-1    C      n-3f2a           1",
        "r-17   A      n-77bc0e         2",
        "r-100  NA     -                0",
    ]


@pytest.mark.parametrize(
    ("argv", "command", "message"),
    [
        (["nodes"], "nodes", "no nodes connected"),
        (["projects"], "projects", "no projects"),
        (["tasks", "primes"], "tasks", "no tasks in project primes"),
        (["tasks", "primes", "--state", "F"], "tasks", "no tasks in state F in project primes"),
    ],
)
def test_empty_lists_say_so(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], argv: list[str], command: str, message: str
) -> None:
    hub.answer(command, [])
    status, out, err = run(capsys, "--socket", str(hub.path), *argv)
    assert (status, out, err) == (0, message + "\n", "")


def test_human_output_escapes_control_characters(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.answer("tasks", [{"id": "evil\x1b[2J", "state": "NA", "node": None, "attempts": 0}])
    status, out, _ = run(capsys, "--socket", str(hub.path), "tasks", "primes")
    assert status == 0
    assert "\x1b" not in out
    assert "evil\\x1b[2J" in out


def test_reply_of_an_unexpected_shape_is_an_error_not_a_traceback(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.answer("nodes", [{"node": "n-1"}])
    status, out, err = run(capsys, "--socket", str(hub.path), "nodes")
    assert status == 3
    assert out == ""
    assert "unexpected shape" in err


# ---- errors and exit statuses -----------------------------------------------------------


def test_missing_socket_exits_3_naming_the_path(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = short_dir / "control.sock"
    status, out, err = run(capsys, "--socket", str(path), "--json", "status")
    assert status == 3
    assert out == ""
    assert err == f"issc-ctl: status: no hub control socket at {path}: is issc-hub running?\n"


def test_timeout_exits_3(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ctl, "TIMEOUT", 0.2)
    hub.replies["projects"] = SILENT
    status, out, err = run(capsys, "--socket", str(hub.path), "projects")
    assert status == 3
    assert out == ""
    assert "did not answer 'projects' within 0.2 s" in err


def test_hub_error_exits_1_with_the_hubs_message(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.replies["tasks"] = {"ok": False, "error": "no project named 'nosuch'"}
    status, out, err = run(capsys, "--socket", str(hub.path), "tasks", "nosuch")
    assert (status, out) == (1, "")
    assert err == "issc-ctl: tasks: no project named 'nosuch'\n"


@pytest.mark.parametrize(
    ("argv", "label", "wire"),
    [
        (["volunteers"], "volunteers", {"command": "volunteers", "args": {}}),
        (
            ["volunteer", "add", "bob"],
            "volunteer add",
            {"command": "volunteer_add", "args": {"volunteer": "bob"}},
        ),
        (
            ["volunteer", "export", "bob"],
            "volunteer export",
            {"command": "volunteer_export", "args": {"volunteer": "bob"}},
        ),
        (
            ["project", "pause", "primes"],
            "project pause",
            {"command": "project_pause", "args": {"project": "primes"}},
        ),
        (
            ["project", "resume", "primes"],
            "project resume",
            {"command": "project_resume", "args": {"project": "primes"}},
        ),
        (
            ["project", "cancel", "primes"],
            "project cancel",
            {"command": "project_cancel", "args": {"project": "primes"}},
        ),
        (["watch"], "watch", {"command": "watch", "args": {}}),
    ],
)
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_commands_this_hub_lacks_exit_2_with_a_clear_message(
    hub: FakeHub,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    label: str,
    wire: dict[str, Any],
    json_flag: list[str],
) -> None:
    status, out, err = run(capsys, "--socket", str(hub.path), *json_flag, *argv)
    assert status == 2
    assert out == ""
    assert err == f"issc-ctl: {label}: not available in this version of the hub\n"
    assert hub.requests == [wire]


def test_an_older_hub_without_status_gets_the_same_message(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    del hub.replies["status"]
    status, _, err = run(capsys, "--socket", str(hub.path), "status")
    assert status == 2
    assert "status: not available in this version of the hub" in err


def test_volunteers_table_once_a_hub_offers_it(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.answer("volunteers", [{"volunteer": "alice", "credit": 12.5, "tasks_completed": 40}])
    status, out, _ = run(capsys, "--socket", str(hub.path), "volunteers")
    assert status == 0
    assert out.splitlines() == [
        "VOLUNTEER  CREDIT  TASKS COMPLETED",
        "alice       12.50               40",
    ]


def test_volunteer_add_prints_just_the_token_once_a_hub_offers_it(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.answer("volunteer_add", {"volunteer": "bob", "token": "tok-abc"})
    assert run(capsys, "--socket", str(hub.path), "volunteer", "add", "bob") == (0, "tok-abc\n", "")


@pytest.mark.parametrize("argv", [["volunteer"], ["volunteer", "add"], ["project", "stop", "p"]])
def test_incomplete_commands_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_socket_and_config_together_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--socket", "a.sock", "status", "--config", "hub.yaml"])
    assert info.value.code == 2
    assert "not both" in capsys.readouterr().err


# ---- where the socket is ----------------------------------------------------------------


def test_config_gives_the_control_socket(
    hub: FakeHub, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = short_dir / "hub.yaml"
    config.write_text(f"control_socket: {hub.path.name}\n")  # relative to the config file
    status, out, _ = run(capsys, "--config", str(config), "--json", "status")
    assert status == 0
    assert json.loads(out) == STATUS


def test_config_default_socket_is_in_its_data_dir(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (short_dir / "d").mkdir()
    fake = FakeHub(short_dir / "d" / "control.sock")
    fake.answer("nodes", [])
    fake.start()
    try:
        config = short_dir / "hub.yaml"
        config.write_text("data_dir: d\n")
        status, out, _ = run(capsys, "--config", str(config), "--json", "nodes")
    finally:
        fake.stop()
    assert (status, json.loads(out)) == (0, [])


def test_config_error_exits_2_naming_key_and_file(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = short_dir / "hub.yaml"
    config.write_text("control_sockett: x.sock\n")
    status, out, err = run(capsys, "--config", str(config), "status")
    assert (status, out) == (2, "")
    assert str(config) in err
    assert "control_sockett" in err


def test_missing_config_file_exits_2_naming_the_file(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(capsys, "--config", str(short_dir / "nope.yaml"), "status")
    assert status == 2
    assert f"{short_dir / 'nope.yaml'}: cannot read" in err


def test_default_socket_is_issc_data_in_the_current_directory(
    short_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(short_dir)
    status, _, err = run(capsys, "status")
    assert status == 3
    assert "no hub control socket at issc-data/control.sock" in err
    (short_dir / "issc-data").mkdir()
    fake = FakeHub(short_dir / "issc-data" / "control.sock")
    fake.answer("status", STATUS)
    fake.start()
    try:
        status, out, _ = run(capsys, "--json", "status")
    finally:
        fake.stop()
    assert (status, json.loads(out)) == (0, STATUS)


# ---- the admin commands of a hub that offers them ---------------------------------------

WATCH = {
    "at": "2026-11-28T07:00:05Z",
    "nodes": {"connected": 2},
    "tasks": {"NA": 12, "TA": 1, "A": 3, "C": 70, "F": 2, "X": 0},
    "tasks_per_second": 3.25,
    "projects": PROJECTS,
}


def test_task_human_form_shows_the_lease_history(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.answer(
        "task",
        {
            "id": "r-17",
            "state": "A",
            "node": "n-77bc0e",
            "attempts": 2,
            "error": None,
            "history": [
                {
                    "lease": 3,
                    "node": "n-3f2a",
                    "offered_at": "2026-11-28T07:00:00Z",
                    "accepted_at": "2026-11-28T07:00:01Z",
                    "ended_at": "2026-11-28T07:00:09Z",
                    "outcome": "lost",
                    "detail": "no heartbeat for 1.6 s",
                },
                {
                    "lease": 9,
                    "node": "n-77bc0e",
                    "offered_at": "2026-11-28T07:00:10Z",
                    "accepted_at": "2026-11-28T07:00:10Z",
                    "ended_at": None,
                    "outcome": None,
                    "detail": None,
                },
            ],
        },
    )
    status, out, _ = run(capsys, "--socket", str(hub.path), "task", "primes", "r-17")
    assert status == 0
    assert out.splitlines() == [
        "task r-17: A, 2 attempt(s), node n-77bc0e",
        "LEASE  NODE      OFFERED   ACCEPTED  ENDED     OUTCOME  DETAIL",
        "    3  n-3f2a    07:00:00  07:00:01  07:00:09  lost     no heartbeat for 1.6 s",
        "    9  n-77bc0e  07:00:10  07:00:10  -         live",
    ]


def test_volunteers_table_shows_nodes_and_projects_where_the_hub_sends_them(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.answer(
        "volunteers",
        [
            {
                "volunteer": "alice",
                "credit": 12.5,
                "tasks_completed": 40,
                "nodes": 2,
                "connected": 1,
                "projects": ["mandelbrot", "primes"],
            },
            {
                "volunteer": "bob",
                "credit": 0.0,
                "tasks_completed": 0,
                "nodes": 0,
                "connected": 0,
                "projects": [],
            },
        ],
    )
    status, out, _ = run(capsys, "--socket", str(hub.path), "volunteers")
    assert status == 0
    assert out.splitlines() == [
        "VOLUNTEER  CREDIT  TASKS COMPLETED  NODES  CONNECTED  PROJECTS",
        "alice       12.50               40      2          1  mandelbrot,primes",
        "bob          0.00                0      0          0  -",
    ]


def test_volunteer_export_prints_one_json_document_either_way(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    document = {"volunteer": "bob", "credit": 1.5, "nodes": [], "tasks": [], "leases": []}
    hub.answer("volunteer_export", document)
    for flags in ([], ["--json"]):
        status, out, _ = run(
            capsys, "--socket", str(hub.path), *flags, "volunteer", "export", "bob"
        )
        assert status == 0
        assert json.loads(out) == document


@pytest.mark.parametrize(
    ("action", "word"), [("pause", "paused"), ("resume", "resumed"), ("cancel", "cancelled")]
)
def test_project_actions_say_what_happened_with_the_counts_after_it(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], action: str, word: str
) -> None:
    hub.answer(f"project_{action}", {**PROJECTS[1], "paused": action == "pause"})
    status, out, _ = run(capsys, "--socket", str(hub.path), "project", action, "primes")
    assert status == 0
    assert out == f"project primes {word}: NA 2  TA 1  A 3  C 10  F 2  X 0\n"
    assert hub.requests == [{"command": f"project_{action}", "args": {"project": "primes"}}]


def test_changes_wait_longer_for_the_hub_than_reads(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []

    def fake_request(path: Any, command: str, args: Any = None, *, timeout: float) -> Any:
        seen.append(timeout)
        return PROJECTS[1] if command.startswith("project_") else STATUS

    monkeypatch.setattr(ctl, "request", fake_request)
    run(capsys, "--socket", str(hub.path), "status")
    run(capsys, "--socket", str(hub.path), "project", "cancel", "primes")
    assert seen == [ctl.TIMEOUT, ctl.LONG_TIMEOUT]


def test_a_refusal_by_the_hub_exits_3_and_says_who_may_ask(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    refusal = "permission denied: uid 65534 may not use this hub's control socket (only root)"
    hub.replies["status"] = {"ok": False, "error": refusal}
    status, out, err = run(capsys, "--socket", str(hub.path), "status")
    assert (status, out) == (3, "")
    assert err == (
        f"issc-ctl: status: the hub at {hub.path} refused the connection: {refusal}; "
        "run issc-ctl as the user that runs issc-hub (or as root)\n"
    )


def test_watch_json_prints_one_snapshot_and_exits(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.answer("watch", WATCH)
    status, out, _ = run(capsys, "--socket", str(hub.path), "--json", "watch")
    assert status == 0
    assert json.loads(out) == WATCH
    assert hub.requests == [{"command": "watch", "args": {}}]


def test_watch_frame_has_a_bar_per_project() -> None:
    assert ctl.watch_frame(WATCH) == [
        "2 nodes connected, 3.2 tasks/s  (hub time 07:00:05, Ctrl-C to stop)",
        "PROJECT     PROGRESS                          DONE   C  F  X",
        "mandelbrot  [##################......]  75%  30/40  30  0  0  paused",
        "primes      [################........]  66%  12/18  10  2  0",
    ]
    empty = {**WATCH, "projects": []}
    assert ctl.watch_frame(empty)[1:] == ["no projects"]


def test_watch_line_for_a_pipe() -> None:
    assert ctl.watch_line(WATCH) == (
        "07:00:05  nodes 2  3.2 tasks/s  mandelbrot 30/40 (C 30 F 0 X 0) paused"
        "  primes 12/18 (C 10 F 2 X 0)"
    )


def test_watch_prints_a_line_per_poll_into_a_pipe(hub: FakeHub) -> None:
    hub.answer("watch", WATCH)
    out = io.StringIO()
    ctl.watch(hub.path, out, tty=False, polls=3, interval=0)
    assert out.getvalue() == (ctl.watch_line(WATCH) + "\n") * 3
    assert [r["command"] for r in hub.requests] == ["watch"] * 3


def test_watch_redraws_in_place_on_a_terminal(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.answer("watch", WATCH)
    monkeypatch.setattr(ctl.shutil, "get_terminal_size", lambda: os.terminal_size((60, 24)))
    out = io.StringIO()
    ctl.watch(hub.path, out, tty=True, polls=2, interval=0)
    frame = "\n".join(line[:59] for line in ctl.watch_frame(WATCH)) + "\n"
    # Cursor hidden; the first frame drawn; back up over its 4 lines for the second.
    assert out.getvalue() == "\x1b[?25l" + "\x1b[J" + frame + "\x1b[4F\x1b[J" + frame + "\x1b[?25h"


def test_watch_stops_on_the_first_failed_poll(short_dir: Path) -> None:
    with pytest.raises(HubUnreachable, match="no hub control socket"):
        ctl.watch(short_dir / "nothing.sock", io.StringIO(), tty=False, polls=2, interval=0)
