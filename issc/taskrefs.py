"""Find the input files a task file refers to (``files: {NAME: PATH}`` in its tasks).

Only as much parsing as ``issc-project submit`` needs to carry the files along: the hub
validates everything else (ids, inputs, project) when it ingests the task file. A file
that is not YAML or JSON at all is an error here already, naming the line: the hub would
reject it anyway, and the owner learns it before anything is copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from issc.errors import IsscError

JSONL_SUFFIX = ".jsonl"
MAX_FILES_PER_TASK = 64  # docs/design.md, "Input and output files"
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class FileReference:
    """One ``NAME: PATH`` entry of one task; ``line`` is 1-based where known.

    ``name`` and ``path`` are whatever the file holds (not necessarily strings): checking
    them is the caller's job, so that every complaint names the task file and line alike.
    """

    task_file: Path
    line: int | None
    task_id: object
    name: object
    path: object

    def where(self) -> str:
        """``TASKFILE: line N`` (or just ``TASKFILE``), the prefix of every complaint."""
        return f"{self.task_file}: line {self.line}" if self.line else str(self.task_file)


def file_references(task_file: Path) -> list[FileReference]:
    """Every ``files`` entry of every task in a ``.yaml``/``.yml``/``.jsonl`` task file.

    Other files (bundles) refer to nothing. Entries that are not tasks (not a mapping) are
    skipped; the hub rejects them with its own reason.

    Raises:
        IsscError: the file cannot be read or parsed, or a task's ``files`` is not a
            mapping; the message names the file and the line where known.
    """
    name = task_file.name
    if not name.endswith((JSONL_SUFFIX, *YAML_SUFFIXES)):
        return []
    try:
        text = task_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IsscError(f"{task_file}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise IsscError(f"{task_file}: cannot read: {exc.strerror or exc}") from None
    if name.endswith(JSONL_SUFFIX):
        return _jsonl_references(task_file, text)
    return _yaml_references(task_file, text)


def _jsonl_references(task_file: Path, text: str) -> list[FileReference]:
    refs: list[FileReference] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            task = json.loads(raw)
        except ValueError as exc:
            raise IsscError(f"{task_file}: line {number}: not valid JSON: {exc}") from None
        except RecursionError:
            raise IsscError(
                f"{task_file}: line {number}: not valid JSON: nested too deeply"
            ) from None
        if isinstance(task, dict):
            refs += _task_references(task_file, number, task)
    return refs


def _yaml_references(task_file: Path, text: str) -> list[FileReference]:
    # One parse gives both the nodes (for line numbers) and the data, as yaml.safe_load would.
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{task_file}: line {mark.line + 1}" if mark is not None else str(task_file)
        raise IsscError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except ValueError as exc:  # a value PyYAML cannot construct, e.g. the date 2026-13-45
        raise IsscError(f"{task_file}: not valid YAML: bad value: {exc}") from None
    except RecursionError:
        raise IsscError(f"{task_file}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        return []
    tasks = data.get("tasks")
    tasks_node = next(
        (v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "tasks"), None
    )
    if not isinstance(tasks, list) or not isinstance(tasks_node, yaml.SequenceNode):
        return []
    refs: list[FileReference] = []
    for task, node in zip(tasks, tasks_node.value, strict=True):
        if isinstance(task, dict):
            refs += _task_references(task_file, node.start_mark.line + 1, task)
    return refs


def _task_references(task_file: Path, line: int, task: dict[Any, Any]) -> list[FileReference]:
    if "files" not in task:
        return []
    files = task["files"]
    task_id = task.get("id")
    if not isinstance(files, dict):
        raise IsscError(
            f"{task_file}: line {line}: task {task_id!r}: files must be a mapping "
            f"{{NAME: PATH}}, got {type(files).__name__}"
        )
    if len(files) > MAX_FILES_PER_TASK:
        raise IsscError(
            f"{task_file}: line {line}: task {task_id!r}: {len(files)} input files, "
            f"over the limit of {MAX_FILES_PER_TASK} a task"
        )
    return [FileReference(task_file, line, task_id, name, path) for name, path in files.items()]
