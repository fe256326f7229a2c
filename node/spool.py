"""Results kept on disk until the hub acknowledges them.

A result is written (and fsynced) before it is sent, and removed only when the hub's
``result_ack`` arrives, so a node that loses its hub, or is killed, delivers it after
reconnecting. One small JSON file per lease: crash-safe with a rename, easy to inspect.

A result's output files wait beside it in ``<lease>.out/NAME`` (the executor moves them
there before the record is written); the record's ``files`` lists them as
``{"name", "sha256", "size"}``. Records written before output files existed have no
``files`` and load as having none. An ``.out`` directory without a record is the
leftover of a crash before the record was written, and is swept at start-up.

A record also keeps the result's signature (``"signature"``, hex) and what the node was
given under the lease (``"given"``), see node.upload; records written before results
were signed have neither, and their result goes unsigned (the hub refuses it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from issc.fsutil import fsync_dir

log = logging.getLogger(__name__)

_OUT_SUFFIX = ".out"


class ResultSpool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, lease: int) -> Path:
        return self.directory / f"{lease}.json"

    def output_dir(self, lease: int) -> Path:
        """Where the output files of ``lease`` wait until its result is acknowledged."""
        return self.directory / f"{lease}{_OUT_SUFFIX}"

    def put(self, lease: int, record: dict[str, Any]) -> None:
        """Store a result durably (write, fsync, rename, fsync the directory)."""
        path = self._path(lease)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.directory)

    def remove(self, lease: int) -> None:
        """Forget a result and its output files."""
        # The record goes first: a crash in between leaves an .out without a record
        # (swept at start-up), never a record whose files are gone.
        self._path(lease).unlink(missing_ok=True)
        self.discard_outputs(lease)

    def discard_outputs(self, lease: int) -> None:
        """Delete the output files of a run whose result will not be sent."""
        shutil.rmtree(self.output_dir(lease), ignore_errors=True)

    def sweep(self) -> None:
        """Delete output directories whose result record is missing (call before runs start)."""
        for path in self.directory.glob(f"*{_OUT_SUFFIX}"):
            lease = path.name.removesuffix(_OUT_SUFFIX)
            if lease.isdigit() and not self._path(int(lease)).exists():
                shutil.rmtree(path, ignore_errors=True)

    def leases(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*.json") if p.stem.isdigit())

    def load(self, lease: int) -> dict[str, Any] | None:
        """The stored record, or None (an unreadable record is logged and dropped)."""
        try:
            data = json.loads(self._path(lease).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("spool: dropping unreadable result %s: %s", lease, exc)
            self.remove(lease)
            return None
        if not isinstance(data, dict):
            return None
        files = data.setdefault("files", [])  # records from before output files
        if not isinstance(files, list) or not all(_is_file_entry(entry) for entry in files):
            log.error("spool: dropping result %s with a malformed file list", lease)
            self.remove(lease)
            return None
        return data


def _is_file_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == {"name", "sha256", "size"}
        and isinstance(entry["name"], str)
        and isinstance(entry["sha256"], str)
        and isinstance(entry["size"], int)
        and not isinstance(entry["size"], bool)
    )
