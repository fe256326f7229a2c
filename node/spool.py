"""Results kept on disk until the hub acknowledges them.

A result is written (and fsynced) before it is sent, and removed only when the hub's
``result_ack`` arrives, so a node that loses its hub, or is killed, delivers it after
reconnecting. One small JSON file per lease: crash-safe with a rename, easy to inspect.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ResultSpool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, lease: int) -> Path:
        return self.directory / f"{lease}.json"

    def put(self, lease: int, record: dict[str, Any]) -> None:
        """Store a result durably (write, fsync, rename, fsync the directory)."""
        path = self._path(lease)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, lease: int) -> None:
        self._path(lease).unlink(missing_ok=True)

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
        return data if isinstance(data, dict) else None
