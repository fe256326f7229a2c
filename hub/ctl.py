"""``issc-ctl``: ask a running hub, through its control socket, how things stand.

``issc-ctl [--socket PATH | --config HUBFILE] [--json] COMMAND``. The socket is
``--socket``, else the ``control_socket`` of the hub config given with ``--config``, else
``./issc-data/control.sock`` (where a hub started without a config puts it).

The wire is the control server's (hub/control.py): one JSON request line
``{"command": NAME, "args": {...}}``, one reply line ``{"ok": true, "data": ...}`` or
``{"ok": false, "error": "..."}``. ``--json`` prints the reply's data as one JSON
document and nothing else; without it the data is shown as aligned tables.

Wire names: ``status``, ``nodes``, ``projects``, ``tasks`` {project, state?}, ``task``
{project, id}, ``volunteers``, ``volunteer_add`` / ``volunteer_export`` {volunteer},
``project_pause`` / ``project_resume`` / ``project_cancel`` {project}, and ``watch`` (one
snapshot; ``issc-ctl watch`` asks for one about once a second and redraws, and
``issc-ctl --json watch`` prints a single snapshot and exits). A hub that answers
``unknown command`` gets "not available in this version of the hub" and exit status 2.

Exit status: 0 success; 1 the hub answered with an error (an unknown project, say);
2 a usage or config error, or a command this hub does not offer; 3 the hub could not be
reached or sent a reply that is not understood (no socket, permission denied, timeout).
``watch`` ends with status 0 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from issc.config import load_hub_config
from issc.errors import ConfigError, IsscError

PROG = "issc-ctl"
TIMEOUT = 5.0
# Changes wait for the hub's commit (cancelling a big project writes every task), and an
# export may be long: these get more time before issc-ctl gives up on the reply.
LONG_TIMEOUT = 120.0
WATCH_INTERVAL = 1.0
BAR_WIDTH = 24
DEFAULT_SOCKET = Path("issc-data") / "control.sock"
STATES = ("NA", "TA", "A", "C", "F", "X")
# A reply is one line; the bound only guards against a runaway peer (a task list of
# a million rows is well under it).
MAX_REPLY = 512 * 1024 * 1024

EXIT_HUB_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CtlError(IsscError):
    """Talking to the hub's control socket failed; ``exit_status`` is what issc-ctl returns."""

    exit_status = EXIT_UNREACHABLE


class HubUnreachable(CtlError):
    """No answer: no socket, permission denied, refused, timed out, or a garbled reply."""


class HubErrorReply(CtlError):
    """The hub answered ``{"ok": false, "error": ...}``; the message is the hub's."""

    exit_status = EXIT_HUB_ERROR


class UnknownCommandReply(HubErrorReply):
    """The hub does not know the command: it is older than this issc-ctl."""

    exit_status = EXIT_USAGE


# ---- the client ------------------------------------------------------------------------


def request(
    socket_path: str | os.PathLike[str],
    command: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = TIMEOUT,
) -> Any:
    """Send one command to the hub's control socket and return the reply's ``data``.

    ``timeout`` bounds the connect and every wait for reply bytes (not the whole
    transfer, so a long task list still arrives from a busy hub).

    Raises:
        HubUnreachable: the socket is missing, not a socket, not ours to open, refuses
            connections, the hub stays silent for ``timeout`` seconds, or the reply is not
            a well-formed reply line.
        UnknownCommandReply: the hub answered that it does not know ``command``.
        HubErrorReply: the hub answered with any other error.
    """
    path = os.fspath(socket_path)
    line = json.dumps({"command": command, "args": dict(args or {})}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, path, timeout)
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # A hub that refuses us may answer and close before reading it all: read on.
                sock.sendall(line)
            with sock.makefile("rb") as stream:
                raw = stream.readline(MAX_REPLY + 1)
        except TimeoutError:
            raise HubUnreachable(
                f"the hub at {path} did not answer {command!r} within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise HubUnreachable(f"lost the connection to the hub at {path}: {_why(exc)}") from None
    return _parse_reply(raw, path, command)


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """Connect ``sock`` to ``path``, translating every failure into HubUnreachable."""
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise HubUnreachable(f"no hub control socket at {path}: is issc-hub running?") from None
    except PermissionError:
        raise HubUnreachable(
            f"permission denied on the hub control socket {path}: "
            "run issc-ctl as the user that runs issc-hub"
        ) from None
    except ConnectionRefusedError:
        if not _is_socket(path):
            raise HubUnreachable(f"{path} is not a hub control socket (not a socket)") from None
        raise HubUnreachable(
            f"the hub control socket {path} refuses connections: is issc-hub running? "
            "(the file may be left over from a hub that died)"
        ) from None
    except TimeoutError:
        raise HubUnreachable(
            f"the hub control socket {path} did not accept a connection within {timeout:g} s"
        ) from None
    except OSError as exc:  # path too long for AF_UNIX, a file where a directory should be, ...
        raise HubUnreachable(
            f"cannot connect to the hub control socket {path}: {_why(exc)}"
        ) from None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _parse_reply(raw: bytes, path: str, command: str) -> Any:
    if not raw:
        raise HubUnreachable(f"the hub at {path} closed the connection without answering")
    if not raw.endswith(b"\n"):
        if len(raw) > MAX_REPLY:
            raise HubUnreachable(f"the hub at {path} sent a reply over {MAX_REPLY} bytes")
        raise HubUnreachable(f"the hub at {path} closed the connection in mid-reply")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise HubUnreachable(f"the hub at {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise HubUnreachable(f'the hub at {path} sent a reply without "ok"')
    if reply["ok"]:
        return reply.get("data")
    error = str(reply.get("error") or "the hub gave no reason")
    if error.startswith("unknown command"):
        raise UnknownCommandReply(error)
    if error.startswith("permission denied"):
        raise HubUnreachable(
            f"the hub at {path} refused the connection: {error}; "
            "run issc-ctl as the user that runs issc-hub (or as root)"
        )
    raise HubErrorReply(error)


# ---- human output ----------------------------------------------------------------------


def _cell(value: Any) -> str:
    """One table cell; names come from volunteers and owners, so never echo control chars."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int]) -> str:
    """Aligned columns, two spaces apart; the columns in ``right`` (numbers) align right."""
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            text.rjust(widths[i]) if i in right else text.ljust(widths[i])
            for i, text in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _state_keys(counts: Mapping[str, Any]) -> list[str]:
    """The task states in lifecycle order, then any the hub knows and we do not."""
    return [*STATES, *(k for k in counts if k not in STATES)]


def _duration(seconds: float) -> str:
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def show_status(data: Any, ns: argparse.Namespace) -> str:
    counts: Mapping[str, Any] = data["tasks"]
    hub = "issc"
    if "version" in data:
        hub += f" {_cell(data['version'])}"
    if "listen" in data:
        hub += f", nodes connect to {_cell(data['listen'])}"
    rows = [("hub", hub)]
    if data.get("degraded"):
        # First, and loud: the hub takes no new work until it recovers by itself.
        rows.append(("DEGRADED", f"{_cell(data['degraded'])} (recovering by itself)"))
    if "uptime_seconds" in data:
        rows.append(("uptime", _duration(float(data["uptime_seconds"]))))
    rows.append(("projects", _cell(data["projects"])))
    rows.append(("nodes", f"{_cell(data['nodes']['connected'])} connected"))
    tally = "  ".join(f"{k} {_cell(counts.get(k, 0))}" for k in _state_keys(counts))
    total = sum(int(counts.get(k, 0)) for k in _state_keys(counts))
    rows.append(("tasks", f"{total} total: {tally}"))
    transfers: Mapping[str, Any] | None = data.get("transfers")
    if transfers:
        rows.append(
            (
                "sent",
                f"{_cell(transfers.get('bundles_sent', 0))} bundles "
                f"({_size(transfers.get('bundle_bytes_sent', 0))}), "
                f"input files {_size(transfers.get('file_bytes_sent', 0))}; "
                f"received outputs {_size(transfers.get('upload_bytes_received', 0))}",
            )
        )
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {text}" for label, text in rows)


def _size(value: Any) -> str:
    """``"1.5 MiB"``: a byte count for people."""
    if not isinstance(value, int | float):
        return _cell(value)
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def show_nodes(data: Any, ns: argparse.Namespace) -> str:
    if not data:
        return "no nodes connected"
    rows = []
    for n in data:
        seen = n.get("last_seen_seconds_ago")
        rows.append(
            (
                n["node"],
                n["volunteer"],
                n["slots"],
                n["leases"],
                n["address"],
                n["via"] if n.get("via") is not None else "direct",
                f"{seen:g}s ago" if isinstance(seen, int | float) else None,
            )
        )
    headers = ("NODE", "VOLUNTEER", "SLOTS", "LEASES", "ADDRESS", "VIA", "LAST SEEN")
    return table(headers, rows, right={2, 3})


def show_projects(data: Any, ns: argparse.Namespace) -> str:
    if not data:
        return "no projects"
    keys = _state_keys({k: 0 for p in data for k in p["tasks"]})
    rows = []
    for p in data:
        counts = p["tasks"]
        total = sum(int(counts.get(k, 0)) for k in keys)
        done = sum(int(counts.get(k, 0)) for k in ("C", "F", "X"))
        rows.append(
            (
                p["name"],
                p["version"],
                "paused" if p["paused"] else "active",
                *(counts.get(k, 0) for k in keys),
                f"{100 * done // total}%" if total else None,
            )
        )
    headers = ("PROJECT", "VERSION", "STATE", *keys, "DONE")
    return table(headers, rows, right={1, *range(3, len(headers))})


def show_tasks(data: Any, ns: argparse.Namespace) -> str:
    if not data:
        where = f" in state {ns.state}" if ns.state else ""
        return f"no tasks{where} in project {_cell(ns.project)}"
    rows = [(t["id"], t["state"], t["node"], t["attempts"]) for t in data]
    return table(("ID", "STATE", "NODE", "ATTEMPTS"), rows, right={3})


def show_task(data: Any, ns: argparse.Namespace) -> str:
    lines = [
        f"task {_cell(data['id'])}: {data['state']}, {data['attempts']} attempt(s), "
        f"node {_cell(data['node'])}"
    ]
    if data.get("error"):
        lines.append(f"error: {_cell(data['error'])}")
    # VERDICT: for results that had to agree (quorum, trust, spot checks) only.
    verdicts = any("verdict" in h for h in data["history"])
    rows = [
        (
            h["lease"],
            h["node"],
            _when(h["offered_at"]),
            _when(h["accepted_at"]),
            _when(h["ended_at"]),
            h["outcome"] or "live",
            *([h.get("verdict") or ""] if verdicts else []),
            h["detail"] or "",
        )
        for h in data["history"]
    ]
    headers = (
        "LEASE",
        "NODE",
        "OFFERED",
        "ACCEPTED",
        "ENDED",
        "OUTCOME",
        *(["VERDICT"] if verdicts else []),
        "DETAIL",
    )
    lines.append(table(headers, rows, right={0}) if rows else "no leases yet")
    return "\n".join(lines)


def _when(stamp: Any) -> str:
    """The time of day of an ISO 8601 stamp ("2026-11-28T07:00:00Z" -> "07:00:00")."""
    return stamp[11:19] if isinstance(stamp, str) else "-"


def show_volunteers(data: Any, ns: argparse.Namespace) -> str:
    if not data:
        return "no volunteers"
    headers = ["VOLUNTEER", "CREDIT", "TASKS COMPLETED"]
    extras = [
        (key, title)
        for key, title in (
            ("trusted", "TRUST"),
            ("nodes", "NODES"),
            ("connected", "CONNECTED"),
            ("projects", "PROJECTS"),
        )
        if any(key in v for v in data)
    ]
    headers += [title for _, title in extras]
    rows = []
    for v in data:
        row = [
            v["volunteer"],
            f"{v['credit']:.2f}" if isinstance(v["credit"], int | float) else v["credit"],
            v["tasks_completed"],
        ]
        for key, _ in extras:
            value = v.get(key)
            if key == "trusted":
                row.append(_trust(v))
                continue
            row.append(",".join(map(str, value)) or None if isinstance(value, list) else value)
        rows.append(row)
    left = {"projects", "trusted"}
    right = {1, 2, *(i + 3 for i, (key, _) in enumerate(extras) if key not in left)}
    return table(headers, rows, right=right)


def _trust(volunteer: Mapping[str, Any]) -> str:
    """``yes`` or ``NO``, and how its compared results went: ``NO (3 ok, 2 bad)``."""
    trusted = volunteer.get("trusted")
    if not isinstance(trusted, bool):
        return "-"
    text = "yes" if trusted else "NO"
    agreed, disagreed = volunteer.get("agreed"), volunteer.get("disagreed")
    if isinstance(agreed, int) and isinstance(disagreed, int) and (agreed or disagreed):
        text += f" ({agreed} ok, {disagreed} bad)"
    return text


def show_token(data: Any, ns: argparse.Namespace) -> str:
    """Just the token, so that ``TOKEN=$(issc-ctl volunteer add bob)`` works."""
    if isinstance(data, dict) and isinstance(data.get("token"), str):
        return _cell(data["token"])
    return show_json(data, ns)


def show_json(data: Any, ns: argparse.Namespace) -> str:
    return json.dumps(data, indent=2)


def show_project_action(data: Any, ns: argparse.Namespace) -> str:
    done = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}[ns.action]
    text = f"project {_cell(ns.name)} {done}"
    if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
        counts = data["tasks"]
        text += ": " + "  ".join(f"{k} {_cell(counts.get(k, 0))}" for k in _state_keys(counts))
    return text


# ---- watch -----------------------------------------------------------------------------


def _bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = width * done // total if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def watch_frame(data: Any) -> list[str]:
    """The lines of one ``watch`` screen: a header, then a progress bar per project."""
    rate = data.get("tasks_per_second")
    header = f"{_cell(data['nodes']['connected'])} nodes connected"
    if isinstance(rate, int | float):
        header += f", {rate:.1f} tasks/s"
    if isinstance(data.get("at"), str):
        header += f"  (hub time {_when(data['at'])}, Ctrl-C to stop)"
    projects = data["projects"]
    if not projects:
        return [header, "no projects"]
    rows = []
    for p in projects:
        counts = p["tasks"]
        total = sum(int(counts.get(k, 0)) for k in _state_keys(counts))
        c, f, x = (int(counts.get(k, 0)) for k in ("C", "F", "X"))
        done = c + f + x
        rows.append(
            (
                p["name"],
                _bar(done, total),
                f"{100 * done // total}%" if total else "-",
                f"{done}/{total}",
                c,
                f,
                x,
                "paused" if p.get("paused") else "",
            )
        )
    headers = ("PROJECT", "PROGRESS", "", "DONE", "C", "F", "X", "")
    return [header, *table(headers, rows, right={2, 3, 4, 5, 6}).splitlines()]


def watch_line(data: Any) -> str:
    """One line per poll, for a log or a pipe: time, nodes, rate and each project."""
    parts = [
        _when(data.get("at")),
        f"nodes {_cell(data['nodes']['connected'])}",
    ]
    rate = data.get("tasks_per_second")
    if isinstance(rate, int | float):
        parts.append(f"{rate:.1f} tasks/s")
    for p in data["projects"]:
        counts = p["tasks"]
        total = sum(int(counts.get(k, 0)) for k in _state_keys(counts))
        c, f, x = (int(counts.get(k, 0)) for k in ("C", "F", "X"))
        paused = " paused" if p.get("paused") else ""
        parts.append(f"{_cell(p['name'])} {c + f + x}/{total} (C {c} F {f} X {x}){paused}")
    return "  ".join(parts)


def watch(
    path: Path,
    out: TextIO,
    *,
    tty: bool,
    polls: int | None = None,
    interval: float = WATCH_INTERVAL,
) -> None:
    """Ask the hub for a ``watch`` snapshot about every ``interval`` seconds and show it.

    On a terminal the screen is redrawn in place (ANSI cursor-up); elsewhere one line is
    printed per poll. Runs until interrupted, or for ``polls`` rounds.

    Raises:
        CtlError: as ``request``, on the first poll that fails.
    """
    drawn = 0
    if tty:
        out.write("\x1b[?25l")  # hide the cursor while redrawing
    try:
        count = 0
        while polls is None or count < polls:
            started = time.monotonic()
            data = request(path, "watch", timeout=TIMEOUT)
            if tty:
                width = max(20, shutil.get_terminal_size().columns - 1)
                lines = [line[:width] for line in watch_frame(data)]
                # Back to the top of the last frame, clear to the end, draw the new one.
                out.write((f"\x1b[{drawn}F" if drawn else "") + "\x1b[J" + "\n".join(lines) + "\n")
                drawn = len(lines)
            else:
                out.write(watch_line(data) + "\n")
            out.flush()
            count += 1
            if polls is None or count < polls:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    finally:
        if tty:
            out.write("\x1b[?25h")
            out.flush()


# ---- the command line ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One control request and how to show its reply to a person."""

    label: str  # the command as typed, for messages: "volunteer add"
    wire: str  # the control server's command name
    show: Callable[[Any, argparse.Namespace], str]
    args: dict[str, Any] = field(default_factory=dict)
    long: bool = False  # a change or an export: wait LONG_TIMEOUT, not TIMEOUT, for the reply


def call_of(ns: argparse.Namespace) -> Call:
    """Map parsed arguments to the control request they stand for."""
    command: str = ns.command
    if command == "tasks":
        args = {"project": ns.project}
        if ns.state is not None:
            args["state"] = ns.state
        return Call("tasks", "tasks", show_tasks, args)
    if command == "task":
        return Call("task", "task", show_task, {"project": ns.project, "id": ns.id})
    if command == "volunteer":
        show = show_token if ns.action == "add" else show_json
        return Call(
            f"volunteer {ns.action}",
            f"volunteer_{ns.action}",
            show,
            {"volunteer": ns.name},
            long=True,
        )
    if command == "project":
        return Call(
            f"project {ns.action}",
            f"project_{ns.action}",
            show_project_action,
            {"project": ns.name},
            long=True,
        )
    shows: dict[str, Callable[[Any, argparse.Namespace], str]] = {
        "status": show_status,
        "nodes": show_nodes,
        "projects": show_projects,
        "volunteers": show_volunteers,
        "watch": show_json,
    }
    return Call(command, command, shows[command])


def _state(value: str) -> str:
    state = value.upper()
    if state not in STATES:
        raise argparse.ArgumentTypeError(f"unknown state {value!r}: one of {', '.join(STATES)}")
    return state


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; command names and options are part of the user contract."""

    def common(defaults: bool) -> argparse.ArgumentParser:
        # The same options after the command (``issc-ctl status --json``) as before it.
        # Below the command the defaults are SUPPRESS, so they never undo the top level's.
        p = argparse.ArgumentParser(add_help=False)
        d: Any = {} if defaults else {"default": argparse.SUPPRESS}
        p.add_argument("--socket", metavar="PATH", help="the hub's control socket", **d)
        p.add_argument(
            "--config",
            metavar="HUBFILE",
            help="use the control socket of this hub config",
            **d,
        )
        p.add_argument(
            "--json",
            action="store_true",
            help="print one JSON document and nothing else",
            **({"default": False} if defaults else d),
        )
        return p

    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [--socket PATH | --config HUBFILE] [--json] COMMAND ...",
        description="Ask a running issc hub through its control socket (--socket, else the "
        f"one of --config, else ./{DEFAULT_SOCKET}).",
        epilog="exit status: 0 success, 1 the hub answered with an error, 2 usage or config "
        "error or a command this hub does not offer, 3 the hub cannot be reached",
        parents=[common(defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog=PROG)
    opts = [common(defaults=False)]

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=opts)

    add("status", "hub summary")
    add("nodes", "connected nodes")
    add("projects", "projects with task counts per state")
    tasks = add("tasks", "tasks of one project")
    tasks.add_argument("project", metavar="PROJECT")
    tasks.add_argument(
        "--state", type=_state, metavar="STATE", help=f"only tasks in STATE ({', '.join(STATES)})"
    )
    task = add("task", "one task and its history of leases")
    task.add_argument("project", metavar="PROJECT")
    task.add_argument("id", metavar="ID")
    add("volunteers", "volunteers with credit")
    volunteer = add("volunteer", "create or export a volunteer")
    vsub = volunteer.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in (
        ("add", "create a volunteer, print its enrollment token"),
        ("export", "everything the hub holds about one volunteer, as JSON"),
    ):
        vsub.add_parser(action, help=help_text, parents=opts).add_argument("name", metavar="NAME")
    project = add("project", "pause, resume or cancel a project")
    psub = project.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in ("pause", "resume", "cancel"):
        psub.add_parser(action, help=f"{action} a project", parents=opts).add_argument(
            "name", metavar="NAME"
        )
    add(
        "watch",
        "live progress until interrupted (with --json: one snapshot, then exit)",
    )
    return parser


def socket_path_of(ns: argparse.Namespace) -> Path:
    """``--socket``, else the control socket of ``--config``, else the default.

    Raises:
        ConfigError: the ``--config`` file cannot be read or is invalid (names key and file).
    """
    if ns.socket is not None:
        return Path(ns.socket)
    if ns.config is not None:
        return load_hub_config(Path(ns.config)).control_socket_path
    return DEFAULT_SOCKET


def main(argv: list[str] | None = None) -> int:
    """Run ``issc-ctl``; return the exit status (argparse exits 2 on usage errors)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.socket is not None and ns.config is not None:
        parser.error("give --socket or --config, not both")
    call = call_of(ns)
    try:
        path = socket_path_of(ns)
        if call.wire == "watch" and not ns.json:
            try:
                watch(path, sys.stdout, tty=sys.stdout.isatty())
            except KeyboardInterrupt:
                return 0  # Ctrl-C is how a watch ends
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise HubUnreachable(
                    f"the hub at {path} sent a reply of an unexpected shape ({exc!r})"
                ) from None
            return 0
        data = request(path, call.wire, call.args, timeout=LONG_TIMEOUT if call.long else TIMEOUT)
        try:
            text = json.dumps(data, indent=2) if ns.json else call.show(data, ns)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HubUnreachable(
                f"the hub at {path} sent a reply of an unexpected shape ({exc!r})"
            ) from None
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_USAGE)
    except UnknownCommandReply:
        return _fail(f"{call.label}: not available in this version of the hub", EXIT_USAGE)
    except CtlError as exc:
        return _fail(f"{call.label}: {exc}", exc.exit_status)
    except KeyboardInterrupt:
        return 130
    return _print(text)


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


def _print(text: str) -> int:
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # ``issc-ctl tasks p | head``: the reader left; say nothing, and keep Python's
        # exit-time flush from raising again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
