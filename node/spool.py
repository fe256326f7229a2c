"""Results kept on disk until the hub acknowledges them.

A result is written and fsynced before it is sent, and forgotten only when the hub's
``result_ack`` arrives, so a node that loses its hub, or is killed, delivers it after
reconnecting.

The spool is a journal: segment files ``results-<n>.log`` of JSON lines, each either
``{"put": LEASE, "record": {...}}`` or ``{"done": LEASE}``. Results that finish together
share one fsync (group commit): a busy node pays one fsync per batch, not two fsyncs
and a rename per result. A ``done`` line is not fsynced: if a crash loses it the result
is sent again, and the hub acknowledges a repeated result without counting it twice. A
segment grows to SEGMENT_BYTES, then a new one starts; a segment none of whose results
is still waiting is deleted. At start-up the segments are read in order; a torn last
line (a crash in the middle of a write, so never fsynced and never sent) is ignored.

A result's output files wait beside the journal in ``<lease>.out/NAME`` (the executor
moves them there before the record is written); the record's ``files`` lists them as
``{"name", "sha256", "size"}``. An ``.out`` directory without a record is the leftover
of a crash before the record was written, and is swept at start-up.

A record also keeps the SHA-256 of the result's transcript (``"transcript"``, hex) and
what the node was given under the lease (``"given"``), see node.upload.

Spools of earlier versions (one ``<lease>.json`` file per result) are taken into the
journal when the spool is opened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from issc.callthread import CallThread
from issc.fsutil import fsync_dir, write_all

log = logging.getLogger(__name__)

_OUT_SUFFIX = ".out"
_SEGMENT_PREFIX = "results-"
_SEGMENT_SUFFIX = ".log"
SEGMENT_BYTES = 4 * 1024 * 1024


class ResultSpool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._records: dict[int, dict[str, Any]] = {}
        self._segment_of: dict[int, int] = {}  # lease -> the segment holding its record
        self._live: Counter[int] = Counter()  # segment -> records in it still waiting
        self._segment = 0  # the one open for writing; none while the journal is read
        self._segment = self._replay() + 1
        self._fd = self._open_segment(self._segment)
        self._size = 0
        self._written = 0  # journal bytes handed to the kernel, ever (this process)
        self._synced = 0  # of which known to be on disk
        self._syncing: asyncio.Future[None] | None = None
        self._retired: list[int] = []  # old segments' descriptors, closed after the fsync
        self._syncer: CallThread | None = None  # started by the first fsync
        self._take_legacy_files()

    # ---- the API --------------------------------------------------------------------------

    def output_dir(self, lease: int) -> Path:
        """Where the output files of ``lease`` wait until its result is acknowledged."""
        return self.directory / f"{lease}{_OUT_SUFFIX}"

    async def put(self, lease: int, record: dict[str, Any]) -> None:
        """Store a result durably; returns once it is on disk. From here on it is listed
        by ``leases``. Raises OSError (the record is then not kept)."""
        self._append({"put": lease, "record": record})
        self._keep(lease, record, self._segment)
        await self._sync()

    def remove(self, lease: int) -> None:
        """Forget a result and its output files."""
        # The record goes first: a crash in between leaves an .out without a record
        # (swept at start-up), never a record whose files are gone.
        if lease in self._records:
            try:
                self._append_line(f'{{"done":{int(lease)}}}\n'.encode("ascii"))
            except OSError as exc:  # at worst the result is sent again after a restart
                log.warning("spool: cannot note lease %d as done: %s", lease, exc)
            self._forget(lease)
        self.discard_outputs(lease)

    def discard_outputs(self, lease: int) -> None:
        """Delete the output files of a run whose result will not be sent."""
        # Once per task, and most tasks have no output files: a string path and one
        # lstat, not a Path and rmtree's machinery, for the usual case of nothing there.
        path = os.path.join(self.directory, f"{lease}{_OUT_SUFFIX}")
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)

    def sweep(self) -> None:
        """Delete output directories whose result record is missing (call before runs start)."""
        for path in self.directory.glob(f"*{_OUT_SUFFIX}"):
            lease = path.name.removesuffix(_OUT_SUFFIX)
            if lease.isdigit() and int(lease) not in self._records:
                shutil.rmtree(path, ignore_errors=True)

    def leases(self) -> list[int]:
        return sorted(self._records)

    def load(self, lease: int) -> dict[str, Any] | None:
        """The stored record, or None."""
        return self._records.get(lease)

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.shutdown()
            self._syncer = None
        os.close(self._fd)

    # ---- the journal ----------------------------------------------------------------------

    def _append(self, entry: dict[str, Any]) -> None:
        self._append_line((json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8"))

    def _append_line(self, line: bytes) -> None:
        if self._size and self._size + len(line) > SEGMENT_BYTES:
            self._next_segment()
        write_all(self._fd, line)
        self._size += len(line)
        self._written += len(line)

    async def _sync(self) -> None:
        """Wait until every byte written so far is on disk: join the fsync in flight, then
        start one if our bytes came after it began. One fsync covers all puts before it."""
        target = self._written
        while self._synced < target:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._fsync())
            await asyncio.shield(self._syncing)

    async def _fsync(self) -> None:
        # The state is updated before the future is done, so every waiter sees it.
        upto, fd = self._written, self._fd
        try:
            await self._fsync_off_loop(fd)
            self._synced = max(self._synced, upto)
        finally:
            self._syncing = None
            for retired in self._retired:
                os.close(retired)
            self._retired.clear()

    async def _fsync_off_loop(self, fd: int) -> None:
        """fsync ``fd`` on the spool's own thread (one thread, started by the first call:
        cheaper per call than asyncio.to_thread's pool, and a busy node makes one a batch)."""
        if self._syncer is None:
            self._syncer = CallThread("issc-spool-sync")
        await self._syncer.run(asyncio.get_running_loop(), lambda: os.fsync(fd))

    def _next_segment(self) -> None:
        # The old segment's bytes must be on disk before the new one's: fsync it now (rare).
        os.fsync(self._fd)
        if self._syncing is None:
            os.close(self._fd)
        else:  # an fsync of it is in flight in a thread: close it when that is done
            self._retired.append(self._fd)
        self._synced = self._written
        old = self._segment
        self._segment += 1
        self._fd = self._open_segment(self._segment)
        self._size = 0
        self._drop_if_empty(old)

    def _open_segment(self, number: int) -> int:
        path = self._segment_path(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fsync_dir(self.directory)  # the new file's name is durable before anything in it counts
        return fd

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{_SEGMENT_PREFIX}{number:08d}{_SEGMENT_SUFFIX}"

    def _keep(self, lease: int, record: dict[str, Any], segment: int) -> None:
        self._forget(lease)
        self._records[lease] = record
        self._segment_of[lease] = segment
        self._live[segment] += 1

    def _forget(self, lease: int) -> None:
        self._records.pop(lease, None)
        segment = self._segment_of.pop(lease, None)
        if segment is not None:
            self._live[segment] -= 1
            self._drop_if_empty(segment)

    def _drop_if_empty(self, segment: int) -> None:
        if segment == self._segment or self._live[segment] > 0:
            return
        del self._live[segment]
        self._segment_path(segment).unlink(missing_ok=True)

    def _replay(self) -> int:
        """Take in what the segments hold, delete those with nothing waiting; the number
        of the last segment (0 if none)."""
        journal = read_journal(self.directory)
        for lease, record in journal.records.items():
            self._keep(lease, record, journal.segment_of[lease])
        for number in journal.segments:
            self._drop_if_empty(number)  # every result in it was acknowledged
        return journal.segments[-1] if journal.segments else 0

    def _take_legacy_files(self) -> None:
        """Move ``<lease>.json`` files of earlier versions into the journal."""
        legacy = [p for p in self.directory.glob("*.json") if p.stem.isdigit()]
        if not legacy:
            return
        for path in legacy:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.error("spool: dropping unreadable result %s: %s", path.stem, exc)
                continue
            if isinstance(record, dict) and _is_record(record):
                record.setdefault("files", [])
                self._append({"put": int(path.stem), "record": record})
                self._keep(int(path.stem), record, self._segment)
        os.fsync(self._fd)
        self._synced = self._written
        for path in legacy:
            path.unlink(missing_ok=True)


@dataclass
class Journal:
    """What a spool's segments hold: the results still waiting, and where."""

    segments: list[int] = field(default_factory=list)  # segment numbers, in order
    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # lease -> record
    segment_of: dict[int, int] = field(default_factory=dict)  # lease -> segment number


def read_journal(directory: Path) -> Journal:
    """Read a spool's segments in order, without changing anything (so also for tools
    and tests looking at a running node's spool)."""
    journal = Journal()
    found: list[tuple[int, Path]] = []
    for path in directory.glob(f"{_SEGMENT_PREFIX}*{_SEGMENT_SUFFIX}"):
        digits = path.name.removeprefix(_SEGMENT_PREFIX).removesuffix(_SEGMENT_SUFFIX)
        if digits.isdigit():
            found.append((int(digits), path))
    for number, path in sorted(found):
        journal.segments.append(number)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # acknowledged and deleted meanwhile
            continue
        lines = data.split(b"\n")
        for index, line in enumerate(lines):
            if line:
                _replay_line(journal, number, line, path.name, torn=index == len(lines) - 1)
    return journal


def _replay_line(journal: Journal, segment: int, line: bytes, name: str, torn: bool) -> None:
    """Apply one journal line; a line after which no newline came is a torn write."""
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        if "put" in entry:
            lease, record = entry["put"], entry["record"]
            if not _is_lease(lease) or not _is_record(record):
                raise ValueError("malformed record")
            record.setdefault("files", [])
            journal.records[lease] = record
            journal.segment_of[lease] = segment
        elif "done" in entry and _is_lease(entry["done"]):
            journal.records.pop(entry["done"], None)
            journal.segment_of.pop(entry["done"], None)
        else:
            raise ValueError("neither put nor done")
    except (ValueError, KeyError, TypeError) as exc:
        if torn:
            log.warning("spool: ignoring a torn last line in %s", name)
        else:
            log.error("spool: dropping an unreadable line of %s: %s", name, exc)


def _is_lease(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_record(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    files = record.get("files", [])
    return isinstance(files, list) and all(_is_file_entry(entry) for entry in files)


def _is_file_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == {"name", "sha256", "size"}
        and isinstance(entry["name"], str)
        and isinstance(entry["sha256"], str)
        and isinstance(entry["size"], int)
        and not isinstance(entry["size"], bool)
    )
