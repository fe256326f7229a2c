"""Parse and validate task files (YAML and JSONL) from the inbox.

A task file is all or nothing: the first problem rejects the whole file with a
TaskFileError naming the problem and its line, so an owner never has to guess which
half of a file made it in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from hub.store import TaskEntry
from issc.errors import TaskFileError
from issc.names import PLAIN_NAME_RE

MAX_TASKS_PER_FILE = 1_000_000
MAX_INPUT_BYTES = 1024 * 1024  # an input must fit in one frame with room to spare
# YAML aliases let a few bytes stand for gigabytes ("billion laughs"): a file may not
# expand to more than the biggest file the inbox takes (hub/inbox.py MAX_INBOX_FILE).
MAX_EXPANDED_BYTES = 512 * 1024 * 1024
TASK_ID_RE = PLAIN_NAME_RE  # task ids become directory names in the outbox
_TASK_KEYS = {"id", "input", "files", "expect"}
_JSONL_KEYS = {"project", "id", "input", "files", "expect"}
MAX_FILES_PER_TASK = 64
MAX_PATH_CHARS = 1024


@dataclass(frozen=True, slots=True)
class TaskFile:
    project: str
    entries: list[TaskEntry]


def parse_task_file(name: str, data: bytes) -> TaskFile:
    """Parse a ``.yaml``/``.yml`` or ``.jsonl`` file. Raises TaskFileError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"not UTF-8 text (byte {exc.start})") from None
    if name.endswith(".jsonl"):
        return _parse_jsonl(text)
    return _parse_yaml(text)


def _check_entry(entry: Any, line: int, keys: set[str], seen: set[str]) -> TaskEntry:
    if not isinstance(entry, dict):
        raise TaskFileError("a task must be a mapping with id and input", line)
    for key in entry:
        if key not in keys:
            raise TaskFileError(f"unknown key {key!r} in task", line)
    task_id = entry.get("id")
    if not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
        raise TaskFileError(
            f"task id {task_id!r} must be a string of 1-128 letters, digits, '_', '.', '-' "
            "not starting with '.' or '-'",
            line,
        )
    if task_id in seen:
        raise TaskFileError(f"duplicate task id {task_id!r} in this file", line)
    seen.add(task_id)
    if "input" not in entry:
        raise TaskFileError(f"task {task_id!r} has no input", line)
    payload = _json_value(entry["input"], "input", task_id, line)
    # A spot check: the known answer (any JSON value, null too), kept from the nodes.
    expect = _json_value(entry["expect"], "expect", task_id, line) if "expect" in entry else None
    file_paths = _check_files(entry.get("files"), task_id, line)
    return TaskEntry(task_id, payload, line, file_paths=file_paths, expect_json=expect)


def _json_value(value: Any, key: str, task_id: str, line: int) -> str:
    """``value`` as compact JSON text, at most MAX_INPUT_BYTES. Raises TaskFileError."""
    try:
        payload = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise TaskFileError(
            f"task {task_id!r}: {key} is not JSON-serialisable: {exc}", line
        ) from None
    if len(payload) > MAX_INPUT_BYTES:
        raise TaskFileError(
            f"task {task_id!r}: {key} is {len(payload)} bytes, over the {MAX_INPUT_BYTES} limit",
            line,
        )
    return payload


def _check_files(files: Any, task_id: str, line: int) -> tuple[tuple[str, str], ...]:
    """``files: {NAME: PATH}`` as (NAME, PATH) pairs; the paths are checked at ingestion."""
    if files is None:
        return ()
    if not isinstance(files, dict):
        raise TaskFileError(f"task {task_id!r}: files must be a mapping of NAME: PATH", line)
    if len(files) > MAX_FILES_PER_TASK:
        raise TaskFileError(f"task {task_id!r}: more than {MAX_FILES_PER_TASK} files", line)
    pairs = []
    for name, path in files.items():
        if not isinstance(name, str) or not PLAIN_NAME_RE.match(name):
            raise TaskFileError(
                f"task {task_id!r}: file name {name!r} must be a plain file name "
                "(letters, digits, '_', '.', '-'; not starting with '.' or '-')",
                line,
            )
        if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS:
            raise TaskFileError(f"task {task_id!r}: files.{name} must be a path", line)
        pairs.append((name, path))
    return tuple(pairs)


def _check_project(project: Any, line: int | None) -> str:
    if not isinstance(project, str) or not re.match(r"^[a-z0-9][a-z0-9_-]{0,63}$", project):
        raise TaskFileError(f"project must be a project name, got {project!r}", line)
    return project


def _parse_jsonl(text: str) -> TaskFile:
    project: str | None = None
    entries: list[TaskEntry] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw, parse_constant=_reject_constant)
        except ValueError as exc:
            raise TaskFileError(f"not valid JSON: {exc}", number) from None
        except RecursionError:
            raise TaskFileError("not valid JSON: nested too deeply", number) from None
        if not isinstance(obj, dict):
            raise TaskFileError("each line must be a JSON object", number)
        line_project = _check_project(obj.get("project"), number)
        if project is not None and line_project != project:
            raise TaskFileError(
                f"project {line_project!r} differs from {project!r} on earlier lines", number
            )
        project = line_project
        entries.append(_check_entry(obj, number, _JSONL_KEYS, seen))
        if len(entries) > MAX_TASKS_PER_FILE:
            raise TaskFileError(f"more than {MAX_TASKS_PER_FILE} tasks in one file", number)
    if project is None:
        raise TaskFileError("the file holds no tasks")
    return TaskFile(project, entries)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_yaml(text: str) -> TaskFile:
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise TaskFileError(
            f"not valid YAML: {getattr(exc, 'problem', exc)}", mark.line + 1 if mark else None
        ) from None
    except RecursionError:
        raise TaskFileError("not valid YAML: nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise TaskFileError("a task file must be a mapping with project and tasks", 1)
    lines = {key.value: value for key, value in root.value if isinstance(key, yaml.ScalarNode)}
    for key in data:
        if key not in ("project", "tasks"):
            raise TaskFileError(f"unknown top-level key {key!r}", _line(lines.get(key)))
    project = _check_project(data.get("project"), _line(lines.get("project")))
    tasks = data.get("tasks")
    tasks_node = lines.get("tasks")
    if not isinstance(tasks, list) or not isinstance(tasks_node, yaml.SequenceNode):
        raise TaskFileError("tasks must be a list", _line(tasks_node))
    if not tasks:
        raise TaskFileError("the file holds no tasks", _line(tasks_node))
    if len(tasks) > MAX_TASKS_PER_FILE:
        raise TaskFileError(f"more than {MAX_TASKS_PER_FILE} tasks in one file")
    seen: set[str] = set()
    expansion = _Expansion()
    entries = []
    for entry, node in zip(tasks, tasks_node.value, strict=True):
        line = _line(node) or 0
        expansion.check_task(node, line)
        entries.append(_check_entry(entry, line, _TASK_KEYS, seen))
    return TaskFile(project, entries)


class _Loader(yaml.SafeLoader):
    """SafeLoader whose value errors (a bad date, a 5000-digit integer, ``!!int abc``)
    are YAML errors with a position, not a ValueError from deep inside PyYAML."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"bad {node.tag.rsplit(':', 1)[-1]} value: {exc}", node.start_mark
            ) from None


class _Expansion:
    """Bounds what YAML aliases expand to, before anything is expanded.

    ``size`` is a lower bound of a node's JSON encoding (a string is at least its
    length, anything else at least one byte), computed once per node however often
    aliases repeat it.
    """

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.total = 0

    def check_task(self, task: yaml.Node, line: int) -> None:
        if not isinstance(task, yaml.MappingNode):
            return
        for key, value in task.value:
            if isinstance(key, yaml.ScalarNode) and key.value in ("input", "expect"):
                size = self.size(value, set())
                if size > MAX_INPUT_BYTES:
                    raise TaskFileError(
                        f"{key.value} expands to more than {MAX_INPUT_BYTES} bytes (YAML aliases?)",
                        line,
                    )
                self.total += size
                if self.total > MAX_EXPANDED_BYTES:
                    raise TaskFileError(
                        f"the tasks expand to more than {MAX_EXPANDED_BYTES} bytes of input "
                        "(YAML aliases?)",
                        line,
                    )

    def size(self, node: yaml.Node, open_nodes: set[int]) -> int:
        known = self.sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in open_nodes:
            raise TaskFileError("an input refers to itself (a recursive YAML alias)", _line(node))
        if isinstance(node, yaml.ScalarNode):
            is_str = node.tag == "tag:yaml.org,2002:str"
            size = len(node.value) + 2 if is_str else 1
        else:
            open_nodes.add(id(node))
            items: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                items = node.value
            elif isinstance(node, yaml.MappingNode):
                items = [part for pair in node.value for part in pair]
            # brackets, then each item and one separator (',' or ':') between items
            size = 1 + sum(self.size(item, open_nodes) + 1 for item in items) + (not items)
            open_nodes.discard(id(node))
        self.sizes[id(node)] = size
        return size


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None
