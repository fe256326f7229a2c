"""The outbox: ``<data_dir>/outbox/<project>/results.jsonl``, one line per finished task.

Exactly once, whatever crashes: lines are appended and fsynced first, then the store
records, in one transaction, that those tasks are exported and how long the file now
is. If the hub dies between the two, the next export finds the file longer than the
recorded size, cuts the unrecorded tail off, and writes those lines again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from hub import faults
from hub.blobs import ContentStore
from hub.store import FinishedTask, Store, iso_time
from issc.fsutil import fsync_dir, write_all

log = logging.getLogger(__name__)
BATCH = 5000


def result_line(task: FinishedTask) -> dict[str, Any]:
    """The results.jsonl record of one finished task (its shape is in CONTRACT.md)."""
    return {
        "id": task.task_id,
        "state": task.state,
        "result": json.loads(task.result_json) if task.result_json is not None else None,
        "error": task.error,
        "node": task.node_id,
        "volunteer": task.volunteer,
        "attempts": task.attempts,
        "cpu_seconds": round(task.cpu_seconds, 3),
        "finished_at": iso_time(task.finished_at),
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in task.files],
    }


class Outbox:
    """Writes finished tasks to the outbox. Runs on the store's thread (blocking I/O)."""

    def __init__(self, outbox_dir: Path, store: Store, files: ContentStore) -> None:
        self.outbox_dir = outbox_dir
        self.store = store
        self.files = files

    def export(self) -> int:
        """Write every finished, unexported task; return how many lines were written."""
        written = 0
        while batch := self.store.unexported(BATCH):
            by_project: dict[str, list[FinishedTask]] = defaultdict(list)
            for task in batch:
                by_project[task.project].append(task)
            sizes = self.store.outbox_sizes()
            for project, tasks in by_project.items():
                for task in tasks:
                    self._place_files(project, task)
                new_size = self._append(project, tasks, sizes.get(project, 0))
                self.store.mark_exported(project, [t.pk for t in tasks], new_size)
                written += len(tasks)
            if len(batch) < BATCH:
                break
        return written

    def _place_files(self, project: str, task: FinishedTask) -> None:
        """Copy a task's output files to ``files/<task id>/`` before its line is written.

        Copying again after a crash writes the same bytes, so each file lands once.
        """
        if not task.files:
            return
        directory = self.outbox_dir / project / "files" / task.task_id
        directory.mkdir(parents=True, exist_ok=True)
        for ref in task.files:
            target = directory / ref.name
            tmp = directory / f".{ref.name}.tmp"
            shutil.copyfile(self.files.path(ref.sha256), tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        fsync_dir(directory)

    def _append(self, project: str, tasks: list[FinishedTask], committed: int) -> int:
        directory = self.outbox_dir / project
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "results.jsonl"
        data = "".join(json.dumps(result_line(t), separators=(", ", ": ")) + "\n" for t in tasks)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size > committed:
                log.warning(
                    "%s: dropping %d unrecorded bytes from an interrupted export",
                    path,
                    size - committed,
                )
                os.ftruncate(fd, committed)
                size = committed
            elif size < committed:
                log.warning("%s: shorter than recorded (moved or truncated by someone?)", path)
            encoded = data.encode()
            os.lseek(fd, size, os.SEEK_SET)
            write_all(fd, encoded)
            os.fsync(fd)
            faults.point("outbox.after_fsync")  # durable; the store has not recorded it
            return size + len(encoded)
        finally:
            os.close(fd)
