"""The control socket's guards: where the socket may live, who may connect, and how big
and how slow a request may be. The server runs in-process; no hub behind it is needed
for these (the refused and malformed requests never reach a command)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub import control
from hub.control import ControlServer, check_socket_path
from issc.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ctl", dir="/tmp") as name:
        yield Path(name)


# ---- where the socket may live -------------------------------------------------------------


def test_a_missing_directory_is_made_for_the_hub_alone(short_dir: Path) -> None:
    path = short_dir / "run" / "issc" / "ctl.sock"
    check_socket_path(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_directory_writable_by_others_is_refused_naming_it(short_dir: Path) -> None:
    short_dir.chmod(0o770)
    with pytest.raises(ConfigError, match=r"control_socket: the directory .* is writable by group"):
        check_socket_path(short_dir / "ctl.sock")
    short_dir.chmod(0o755)
    check_socket_path(short_dir / "ctl.sock")  # readable by others is fine


def test_a_symlinked_directory_is_refused(short_dir: Path) -> None:
    (short_dir / "real").mkdir(mode=0o700)
    (short_dir / "link").symlink_to(short_dir / "real")
    with pytest.raises(ConfigError, match=r"/link is a symbolic link"):
        check_socket_path(short_dir / "link" / "ctl.sock")


def test_a_symlink_or_a_file_at_the_socket_path_is_refused_and_left_alone(
    short_dir: Path,
) -> None:
    (short_dir / "target").write_text("x")
    (short_dir / "ctl.sock").symlink_to(short_dir / "target")
    with pytest.raises(ConfigError, match=r"ctl.sock is a symbolic link; the hub will not use it"):
        check_socket_path(short_dir / "ctl.sock")
    (short_dir / "hub.db").write_text("precious")
    with pytest.raises(ConfigError, match=r"hub.db exists and is not a socket"):
        check_socket_path(short_dir / "hub.db")
    assert (short_dir / "hub.db").read_text() == "precious"


def test_a_directory_of_another_user_is_refused(short_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    other = short_dir / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(ConfigError, match=r"is owned by uid 65534, not by uid 0 that runs the hub"):
        check_socket_path(other / "ctl.sock")


def test_a_live_socket_is_refused_and_a_stale_one_is_fine(short_dir: Path) -> None:
    path = short_dir / "ctl.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    with pytest.raises(ConfigError, match=r"another process \(a hub\?\) is listening on"):
        check_socket_path(path)
    live.close()  # the file stays behind, as after a hub that died
    check_socket_path(path)


# ---- who may connect, and how much they may send -------------------------------------------


class Server:
    """A ControlServer on a socket in ``directory``, run on a fresh event loop per call."""

    def __init__(self, directory: Path, allowed: set[int] | None = None) -> None:
        self.path = directory / "ctl.sock"
        self.allowed = allowed

    def exchange(self, payload: bytes, *, close_write: bool = False) -> bytes:
        """Start the server, send ``payload``, return everything it answers, stop it."""

        async def run() -> bytes:
            server = ControlServer(None, self.path, "127.0.0.1:0")  # type: ignore[arg-type]
            if self.allowed is not None:
                server.allowed_uids = self.allowed
            await server.start()
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
                writer.write(payload)
                await writer.drain()
                if close_write:
                    writer.write_eof()
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                return answer
            finally:
                await server.stop()

        return asyncio.run(run())


def reply(raw: bytes) -> dict[str, Any]:
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    decoded: dict[str, Any] = json.loads(raw)
    return decoded


def test_the_socket_is_born_0600(short_dir: Path) -> None:
    async def run() -> int:
        server = ControlServer(None, short_dir / "ctl.sock", "x")  # type: ignore[arg-type]
        await server.start()
        try:
            return stat.S_IMODE(os.lstat(short_dir / "ctl.sock").st_mode)
        finally:
            await server.stop()

    assert asyncio.run(run()) == 0o600
    assert not (short_dir / "ctl.sock").exists()  # removed on stop


def test_a_peer_of_another_uid_is_refused_and_logged(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hub.control")
    me = os.geteuid()
    # Our own uid stands in for a stranger: the server is told to allow only uid 4242.
    answer = reply(Server(short_dir, allowed={4242}).exchange(b'{"command": "status"}\n'))
    assert answer["ok"] is False
    assert answer["error"].startswith(f"permission denied: uid {me} may not use this hub's")
    assert f"control: refused a connection from uid {me} (pid {os.getpid()})" in caplog.text


def test_unknown_commands_and_malformed_requests_get_an_error_line(short_dir: Path) -> None:
    server = Server(short_dir)
    assert reply(server.exchange(b'{"command": "reboot"}\n')) == {
        "ok": False,
        "error": "unknown command 'reboot'",
    }
    assert reply(server.exchange(b"not json\n"))["error"] == "request is not a JSON line"
    assert reply(server.exchange(b'["status"]\n'))["error"].startswith("request must be")
    assert reply(server.exchange(b'{"command": "status", "args": [1]}\n')) == {
        "ok": False,
        "error": "args must be an object",
    }


def test_an_oversized_request_is_refused(short_dir: Path) -> None:
    big = b'{"command": "status", "args": {"x": "' + b"a" * control.MAX_REQUEST + b'"}}\n'
    assert reply(Server(short_dir).exchange(big)) == {
        "ok": False,
        "error": f"request over {control.MAX_REQUEST} bytes",
    }


def test_a_silent_client_is_dropped_after_the_read_timeout(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.2)
    assert Server(short_dir).exchange(b'{"command": "sta') == b""  # closed, no answer
