"""The control socket: a Unix stream socket that answers issc-ctl, for admins only.

One JSON request per line, ``{"command": NAME, "args": {...}}``; one JSON reply per
line, ``{"ok": true, "data": ...}`` or ``{"ok": false, "error": "..."}``.

Who may ask: the socket is born mode 0600 in a directory that only the hub's user can
write (``check_socket_path`` refuses anything else: a symlink, a directory of another
user or one that group or others can write), and every connection's peer credentials
(SO_PEERCRED) must be the hub's own uid or root. Requests are bounded in size
(``MAX_REQUEST``) and in time (``READ_TIMEOUT`` to send the request line,
``WRITE_TIMEOUT`` to take the reply).

Changes (pause, resume, cancel) go through the scheduler as events like everything
else; the reply comes only once the batch holding the change is committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hub import events as ev
from hub.db import iso_time
from hub.lifecycle import TaskState
from hub.runtime import HubRuntime
from issc import __version__
from issc.errors import ConfigError, IsscError
from issc.names import VOLUNTEER_NAME_RE, VOLUNTEER_NAME_RULE

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 10.0  # seconds a client has to send its request line
WRITE_TIMEOUT = 30.0  # seconds a client has to take the reply
CANCEL_REASON = "cancelled by admin"
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def check_socket_path(path: Path) -> None:
    """Make sure no other user can reach or replace the control socket at ``path``.

    Creates the socket's directory (mode 0700) if it does not exist.

    Raises:
        ConfigError: the directory or the path is a symlink, the directory is not the
            hub user's or is writable by group or others, or something that is not a
            socket sits at ``path``, or another process listens there. The message names
            the path.
    """
    directory = path.parent
    key = "control_socket"
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        directory.mkdir(mode=0o700, parents=True)
        info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(
            f"{key}: the directory {directory} is a symbolic link; "
            "give a real directory that the hub's user owns"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{key}: {directory} is not a directory")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise ConfigError(
            f"{key}: the directory {directory} is owned by uid {info.st_uid}, "
            f"not by uid {uid} that runs the hub"
        )
    if info.st_mode & 0o022:
        raise ConfigError(
            f"{key}: the directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); only the hub's user may write there"
        )
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{key}: {path} is a symbolic link; the hub will not use it")
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{key}: {path} exists and is not a socket; the hub will not replace it")
    if _socket_in_use(path):
        raise ConfigError(f"{key}: another process (a hub?) is listening on {path}")


def _socket_in_use(path: Path) -> bool:
    """True if a process accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end, or None where the OS cannot tell."""
    sock = writer.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


class ControlServer:
    def __init__(self, runtime: HubRuntime, path: Path, listen_address: str) -> None:
        self.runtime = runtime
        self.path = path
        self.listen_address = listen_address
        self.server: asyncio.AbstractServer | None = None
        self.allowed_uids = {os.geteuid(), 0}
        self.commands: dict[str, Handler] = {
            "status": self.status,
            "nodes": self.nodes,
            "projects": self.projects,
            "tasks": self.tasks,
            "task": self.task,
            "volunteers": self.volunteers,
            "volunteer_add": self.volunteer_add,
            "volunteer_export": self.volunteer_export,
            "project_pause": self.project_pause,
            "project_resume": self.project_resume,
            "project_cancel": self.project_cancel,
            "watch": self.watch,
        }

    async def start(self) -> None:
        """Listen on the socket. Raises ConfigError (see check_socket_path)."""
        check_socket_path(self.path)
        self.path.unlink(missing_ok=True)  # a socket left behind by a hub that died
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for other users
        try:
            self.server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            refusal = self._refusal(writer)
            reply: dict[str, Any]
            try:
                # Read the request even from a refused peer (bounded like any other), so the
                # refusal arrives as the answer to it rather than as a broken pipe.
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            except ValueError:  # the line is longer than the stream's limit
                reply = {"ok": False, "error": refusal or f"request over {MAX_REQUEST} bytes"}
            else:
                if refusal is not None:
                    reply = {"ok": False, "error": refusal}
                else:
                    reply = await self._answer(line)
            writer.write(_encode(reply))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            log.info("control: dropped a client: %s", exc or type(exc).__name__)
        finally:
            writer.close()

    def _refusal(self, writer: asyncio.StreamWriter) -> str | None:
        """Why this peer may not use the socket, or None; logs every refusal."""
        try:
            credentials = peer_credentials(writer)
        except OSError as exc:
            log.warning("control: refused a connection: cannot read its credentials: %s", exc)
            return "permission denied: the hub cannot tell who is asking"
        if credentials is None:
            return None  # no SO_PEERCRED here: the socket's mode 0600 is the guard
        pid, uid = credentials
        if uid in self.allowed_uids:
            return None
        allowed = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} and root"
        log.warning(
            "control: refused a connection from uid %d (pid %d): only %s may use the "
            "control socket",
            uid,
            pid,
            allowed,
        )
        return (
            f"permission denied: uid {uid} may not use this hub's control socket (only {allowed})"
        )

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not a JSON line"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'request must be {"command": NAME, "args": {...}}'}
        handler = self.commands.get(request["command"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['command'][:80]!r}"}
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be an object"}
        try:
            return {"ok": True, "data": await handler(args)}
        except IsscError as exc:
            degraded = self.runtime.degraded
            if degraded is not None and degraded not in str(exc):
                return {"ok": False, "error": f"{exc} (the hub is degraded: {degraded})"}
            return {"ok": False, "error": str(exc)}

    # ---- reading ------------------------------------------------------------------------

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        rt = self.runtime
        counts = await rt.astore.call(rt.store.state_counts)
        projects = await rt.astore.call(rt.store.projects_summary)
        return {
            "tasks": counts,
            "nodes": {"connected": len(rt.sessions)},
            "projects": len(projects),
            "version": __version__,
            "listen": self.listen_address,
            "uptime_seconds": round(rt.now() - rt.started_at, 1),
            "commit_batches": rt.batches,
            "tasks_per_second": rt.tasks_per_second(),
            "transfers": dict(rt.transfers),
            # Why the hub takes no new work now (a full disk, a database gone), or null.
            "degraded": rt.degraded,
            "outages": rt.outages,
        }

    async def nodes(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.runtime.nodes_view()

    async def projects(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.runtime.astore.call(self.runtime.store.projects_summary)

    async def tasks(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        project, state = args.get("project"), args.get("state")
        if not isinstance(project, str):
            raise IsscError("tasks needs a project name")
        if state is not None and state not in ("NA", "TA", "A", "C", "F", "X"):
            raise IsscError(f"unknown state {str(state)[:20]!r}: one of NA, TA, A, C, F, X")
        return await self.runtime.astore.call(self.runtime.store.tasks_of, project, state)

    async def task(self, args: dict[str, Any]) -> dict[str, Any]:
        project, task_id = args.get("project"), args.get("id")
        if not isinstance(project, str) or not isinstance(task_id, str):
            raise IsscError("task needs a project name and a task id")
        return await self.runtime.astore.call(self.runtime.store.task_detail, project, task_id)

    async def watch(self, args: dict[str, Any]) -> dict[str, Any]:
        """One snapshot for ``issc-ctl watch``, which asks again about once a second."""
        rt = self.runtime
        projects = await rt.astore.call(rt.store.projects_summary)
        totals = {str(s): 0 for s in TaskState}
        for project in projects:
            for state, n in project["tasks"].items():
                totals[state] = totals.get(state, 0) + n
        return {
            "at": iso_time(rt.now()),
            "nodes": {"connected": len(rt.sessions)},
            "tasks": totals,
            "tasks_per_second": rt.tasks_per_second(),
            "projects": projects,
        }

    # ---- volunteers ---------------------------------------------------------------------

    async def volunteers(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        rt = self.runtime
        rows = await rt.astore.call(rt.store.volunteers_summary)
        trust = await rt.astore.call(rt.store.volunteers_trust)
        live = rt.volunteers_live()
        for row in rows:
            # trusted, agreed, disagreed: see "Quorum, trust and spot checks" in design.md.
            row.update(trust.get(row["volunteer"], {}))
            now = live.get(row["volunteer"])
            row["connected"] = now["connected"] if now else 0
            row["projects"] = sorted(now["projects"]) if now else []
        return rows

    async def volunteer_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """A new one-time enrollment token; creates the volunteer if it is new."""
        name = _volunteer_name(args, "volunteer add")
        rt = self.runtime
        token = await rt.astore.call(rt.store.issue_token, name, rt.now())
        log.info("control: issued an enrollment token for volunteer %s", name)
        return {"volunteer": name, "token": token}

    async def volunteer_export(self, args: dict[str, Any]) -> dict[str, Any]:
        rt = self.runtime
        name = _volunteer_name(args, "volunteer export")
        document = await rt.astore.call(rt.store.volunteer_export, name)
        live = rt.volunteers_live().get(name)
        document["projects"] = sorted(live["projects"]) if live else []
        for node in document["nodes"]:
            node["connected"] = node["node"] in rt.sessions
        return document

    # ---- projects -----------------------------------------------------------------------

    async def project_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._project_change(args, "pause")

    async def project_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._project_change(args, "resume")

    async def project_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._project_change(args, "cancel")

    async def _project_change(self, args: dict[str, Any], action: str) -> dict[str, Any]:
        """Submit the change as a scheduler event, wait for its commit, show the project."""
        rt = self.runtime
        name = args.get("project")
        if not isinstance(name, str):
            raise IsscError(f"project {action} needs a project name")
        # Ask the store, not the scheduler's memory: a project registered a moment ago is
        # known to the scheduler by the time the event is handled (see submit_and_wait).
        await rt.astore.call(rt.store.project_summary, name)  # StoreError: no such project
        now = rt.now()
        event: ev.Event
        if action == "pause":
            event = ev.ProjectPaused(name, now)
        elif action == "resume":
            event = ev.ProjectResumed(name, now)
        else:
            event = ev.ProjectCancelled(name, CANCEL_REASON, now)
        await rt.submit_and_wait(event)
        summary = await rt.astore.call(rt.store.project_summary, name)
        done = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}[action]
        tally = " ".join(f"{state} {n}" for state, n in summary["tasks"].items())
        log.info("control: project %s %s by admin; its tasks now: %s", name, done, tally)
        return summary


def _volunteer_name(args: dict[str, Any], command: str) -> str:
    name = args.get("volunteer")
    if not isinstance(name, str):
        raise IsscError(f"{command} needs a volunteer name")
    if not VOLUNTEER_NAME_RE.match(name):
        raise IsscError(f"bad volunteer name {name[:80]!r}: {VOLUNTEER_NAME_RULE}")
    return name


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"
