"""The control socket: a Unix stream socket (mode 0600) that answers issc-ctl.

One JSON request per line, ``{"command": NAME, "args": {...}}``; one JSON reply per
line, ``{"ok": true, "data": ...}`` or ``{"ok": false, "error": "..."}``. Only the
hub's own user can connect, so there is no authentication beyond file permissions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hub.runtime import HubRuntime
from issc import __version__
from issc.errors import IsscError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    def __init__(self, runtime: HubRuntime, path: Path, listen_address: str) -> None:
        self.runtime = runtime
        self.path = path
        self.listen_address = listen_address
        self.server: asyncio.AbstractServer | None = None
        self.commands: dict[str, Handler] = {
            "status": self.status,
            "nodes": self.nodes,
            "projects": self.projects,
            "tasks": self.tasks,
            "task": self.task,
        }

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
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
            line = await asyncio.wait_for(reader.readline(), 10)
            reply = await self._answer(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ValueError, TimeoutError, ConnectionError) as exc:
            log.info("control: bad request: %s", exc)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not a JSON line"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'request must be {"command": NAME, "args": {...}}'}
        handler = self.commands.get(request["command"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['command']!r}"}
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be an object"}
        try:
            return {"ok": True, "data": await handler(args)}
        except IsscError as exc:
            return {"ok": False, "error": str(exc)}

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
            "transfers": dict(rt.transfers),
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
            raise IsscError(f"unknown state {state!r}: one of NA, TA, A, C, F, X")
        return await self.runtime.astore.call(self.runtime.store.tasks_of, project, state)

    async def task(self, args: dict[str, Any]) -> dict[str, Any]:
        project, task_id = args.get("project"), args.get("id")
        if not isinstance(project, str) or not isinstance(task_id, str):
            raise IsscError("task needs a project name and a task id")
        return await self.runtime.astore.call(self.runtime.store.task_detail, project, task_id)
