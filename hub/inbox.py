"""The inbox: project owners drop signed bundles and task files into ``<data_dir>/inbox/``.

Each file, once read, moves to ``inbox/accepted/`` or to ``inbox/rejected/`` beside
``NAME.error.txt``. Names starting with ``.`` or ending in ``.part`` are still being
written and are left alone. Content already ingested (by SHA-256) adds nothing.
Reading, verifying and inserting happen on the store's thread; only the results
reach the event loop.

A file written in place under its final name (not by ``issc-project submit``) may be
caught half-written: ``scan`` reads a file only once two scans in a row saw it with the
same size and modification time, so a writer that is still going (within a scan
interval) is waited for; a file that inotify saw renamed in or closed by its writer
(hub/dirwatch.py) is complete and read at the next scan, which it wakes. A file that
cannot be read whole because the disk is full or the database failed stays in the inbox
and is read again later (``trouble`` says why the scan stopped); it is never rejected
for the hub's own trouble.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from hub.blobs import ContentStore
from hub.events import (
    ProjectInfo,
)
from hub.inputs import InputResolver
from hub.retry import is_disk_full
from hub.store import Store
from hub.taskfile import parse_task_file
from issc.bundle import read_manifest_bytes, verify_self_signed
from issc.errors import BundleError, IsscError
from issc.manifest import Manifest
from issc.rotation import check_rotation

log = logging.getLogger(__name__)

MAX_INBOX_FILE = 512 * 1024 * 1024
TASK_SUFFIXES = (".yaml", ".yml", ".jsonl")
BUNDLE_SUFFIX = ".issc"
STRAY_GRACE = 600.0  # seconds an unused input file may wait for its task file
# Seconds a used input file stays after its last submit: `issc-project submit` leaves an
# identical file in place (refreshing its mtime) and sends its task file right after.
RETIRE_GRACE = 60.0


@dataclass(frozen=True, slots=True)
class Ingested:
    """What one inbox file added: a project version, or tasks of a project."""

    project: ProjectInfo | None = None
    project_id: int | None = None
    task_pks: tuple[int, ...] = ()
    expected: tuple[tuple[int, str], ...] = ()  # (task key, known answer): spot checks


def waiting_files(inbox: Path) -> list[Path]:
    """Files ready to be read, oldest first."""
    return [inbox / name for name in _waiting(inbox)]


def _waiting(inbox: Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, mtime in ns) of the bundles and task files waiting, oldest first."""
    ready = []
    for entry in os.scandir(inbox):
        name = entry.name
        if name.startswith(".") or not name.endswith((BUNDLE_SUFFIX, *TASK_SUFFIXES)):
            continue  # hidden or .part (still being written), or an input file
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            info = entry.stat()
        except FileNotFoundError:
            continue  # taken away while we looked
        ready.append((info.st_mtime_ns, name, info.st_size))
    return {name: (size, mtime) for mtime, name, size in sorted(ready)}


class Inbox:
    """Ingests inbox files; the caller hands what they added to the scheduler."""

    def __init__(self, inbox: Path, store: Store, files: ContentStore, settle: bool = True) -> None:
        """``settle``: read a file only once two scans saw it unchanged (see above);
        False reads every waiting file at the first scan (for tests that drive scans)."""
        self.inbox = inbox
        self.settle = settle
        self._last_seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime ns)
        # Why the last scan stopped early (a full disk, a database error), or None.
        self.trouble: Exception | None = None
        self.accepted = inbox / "accepted"
        self.rejected = inbox / "rejected"
        self.store = store
        self.files = files
        self._consumed: set[str] = set()  # input files (relative paths) of accepted task files
        for directory in (self.inbox, self.accepted, self.rejected):
            directory.mkdir(parents=True, exist_ok=True)

    def scan(self, completed: Collection[str] = ()) -> list[Ingested]:
        """Read every waiting file whose size and mtime have settled, or that is named in
        ``completed`` (renamed in or closed by its writer: hub/dirwatch.py), blocking; run
        on the store's thread. Sets ``trouble`` if it had to stop early."""
        ingested = []
        self.trouble = None
        seen, self._last_seen = self._last_seen, _waiting(self.inbox)
        for name, stamp in self._last_seen.items():
            if self.settle and name not in completed and seen.get(name) != stamp:
                continue  # new, or changed since the last scan: perhaps still being written
            path = self.inbox / name
            try:
                item = self.ingest(path)
            except OSError as exc:
                if is_disk_full(exc):
                    self.trouble = exc  # no room to move or note anything: stop here
                    break
                log.error("inbox: %s: %s", path.name, exc)  # moved away meanwhile, EIO...
                continue
            except SQLAlchemyError as exc:
                # The database is in trouble: stop here, so what was ingested is handed on;
                # this file stays in the inbox and is read again on a later scan.
                log.debug("inbox: %s: database error, will retry: %s", path.name, exc)
                self.trouble = exc
                break
            if item is not None:
                ingested.append(item)
        self._retire_inputs()
        self._reject_strays(time.time())
        return ingested

    def _retire_inputs(self) -> None:
        """Move the input files of accepted task files to accepted/, at the same place.

        A file that a task file still waiting in the inbox mentions stays for that one.
        """
        if not self._consumed:
            return
        waiting = [p.read_text("utf-8", "replace") for p in waiting_files(self.inbox)
                   if p.name.endswith(TASK_SUFFIXES)]  # fmt: skip
        keep: set[str] = set()
        now = time.time()
        for rel in sorted(self._consumed):
            source = self.inbox / rel
            try:
                young = now - source.stat().st_mtime < RETIRE_GRACE
            except FileNotFoundError:
                continue
            if young or any(rel in text for text in waiting):
                keep.add(rel)  # another submit may be counting on it: look again later
                continue
            if source.is_file() and not source.is_symlink():
                target = self._free_name(self.accepted / Path(rel).parent, Path(rel).name)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                _remove_empty_parents(source.parent, self.inbox)
        self._consumed = keep

    def _reject_strays(self, now: float) -> None:
        """Reject files no task file used within STRAY_GRACE seconds of their arrival."""
        for path in _data_files(self.inbox):
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < STRAY_GRACE:
                continue
            rel = path.relative_to(self.inbox)
            reason = (
                f"not a bundle ({BUNDLE_SUFFIX}) or task file ({', '.join(TASK_SUFFIXES)}), "
                f"and no task file used it within {STRAY_GRACE // 60:.0f} minutes"
            )
            target_dir = self.rejected / rel.parent
            target_dir.mkdir(parents=True, exist_ok=True)
            self._reject(path, reason, target_dir)
            _remove_empty_parents(path.parent, self.inbox)

    def ingest(self, path: Path) -> Ingested | None:
        """Ingest one file and move it aside; a bad file is rejected, never raised.

        Raises:
            OSError: the hub's own trouble (a full disk): the file stays, for later.
            SQLAlchemyError: the database failed: the file stays, for later.
        """
        try:
            if not _utf8(path.name):
                raise IsscError("the file name is not valid UTF-8; rename the file")
            data = self._read(path)
            digest = hashlib.sha256(data).hexdigest()
            seen = self.store.inbox_file(digest)
            if seen is not None and seen[0] != path.name:
                raise IsscError(f"same content as {seen[0]}, already ingested; nothing added")
            result = Ingested() if seen else self._ingest_new(path, data, digest)
        except IsscError as exc:
            self._reject(path, str(exc))
            return None
        self._move(path, self.accepted)
        return result

    def _read(self, path: Path) -> bytes:
        size = path.stat().st_size
        if size > MAX_INBOX_FILE:
            raise IsscError(f"file is {size} bytes, over the {MAX_INBOX_FILE}-byte limit")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IsscError(f"cannot read: {exc.strerror}") from None
        if not data:
            raise IsscError("the file is empty (0 bytes)")
        return data

    def _ingest_new(self, path: Path, data: bytes, digest: str) -> Ingested:
        name = path.name
        now = time.time()
        if name.endswith(BUNDLE_SUFFIX):
            manifest = verify_self_signed(path)
            rotated_from = self._key_rotation(manifest)
            project, changed = self.store.register_bundle(
                manifest, digest, data, now, rotated_from=rotated_from
            )
            self.store.record_inbox_file(
                digest, name, "accepted", f"{project.name} v{project.version}"
            )
            log.info(
                "inbox: %s: project %s version %d%s",
                name,
                project.name,
                project.version,
                "" if changed else " (already registered)",
            )
            return Ingested(project=project)
        task_file = parse_task_file(name, data)
        inputs = InputResolver(self.inbox, self.files)
        entries = [inputs.resolve(entry) for entry in task_file.entries]
        project_id, pks = self.store.add_tasks(task_file.project, entries, digest, name, now)
        log.info("inbox: %s: %d tasks for %s, %d input files", name, len(pks),
                 task_file.project, len(inputs.used))  # fmt: skip
        self._consumed.update(inputs.used)
        expected = tuple(
            (pk, e.expect_json)
            for e, pk in zip(entries, pks, strict=True)
            if e.expect_json is not None
        )
        return Ingested(project_id=project_id, task_pks=tuple(pks), expected=expected)

    def _key_rotation(self, manifest: Manifest) -> str | None:
        """The pinned owner key a newer bundle rotates away from, or None if it keeps it.

        The hub pins the first key it saw for a project and moves the pin only as a node
        does (issc.rotation): along an endorsement chain from the pinned key. A bundle must
        also carry the whole chain of the registered one (the chain only grows), so that
        nodes pinning any earlier key can still walk it, and so that no key the project
        left can come back (a chain never repeats a key).

        Raises:
            BundleError: naming the cause, for the rejection note.
        """
        current = self.store.current_bundle(manifest.name)
        if current is None:
            return None
        pinned, content = current
        previous = read_manifest_bytes(content)
        # The keys the registered chain walked past: never trusted again.
        superseded = {link.old_key for link in previous.endorsements}
        try:
            check_rotation(manifest, pinned, superseded)
        except BundleError as exc:
            raise BundleError(
                f"project {manifest.name!r} is registered with owner key {pinned}: {exc}"
            ) from None
        kept = manifest.endorsements[: len(previous.endorsements)]
        if kept != previous.endorsements:
            raise BundleError(
                f"project {manifest.name!r}: the bundle does not carry the key rotation chain "
                f"of the registered version {previous.version} ({len(previous.endorsements)} "
                "rotations); pack it with --endorsements CHAINFILE"
            )
        return pinned if manifest.owner_key != pinned else None

    def _reject(self, path: Path, reason: str, directory: Path | None = None) -> None:
        log.warning("inbox: rejected %s: %s", path.name, reason)
        directory = directory or self.rejected
        target = self._free_name(directory, path.name)
        note = directory / f"{target.name}.error.txt"
        tmp = directory / f".{note.name}.tmp"
        # surrogateescape: a name that is not UTF-8 is written as the bytes it is.
        tmp.write_text(f"{path.name}: {reason}\n", encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, note)
        os.replace(path, target)

    def _move(self, path: Path, directory: Path) -> None:
        os.replace(path, self._free_name(directory, path.name))

    @staticmethod
    def _free_name(directory: Path, name: str) -> Path:
        """``name`` in ``directory``, or ``name.1``, ``name.2``... if it is taken."""
        candidate = directory / name
        counter = 0
        while candidate.exists():
            counter += 1
            candidate = directory / f"{name}.{counter}"
        return candidate


def _data_files(inbox: Path) -> list[Path]:
    """Files in the inbox that are not bundles or task files at its top level."""
    found = []
    for root, dirs, names in os.walk(inbox):
        here = Path(root)
        if here == inbox:
            dirs[:] = [d for d in dirs if d not in ("accepted", "rejected")]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            top_level_work = here == inbox and name.endswith((BUNDLE_SUFFIX, *TASK_SUFFIXES))
            # Hidden and .part files are still being written: never strays.
            if not name.startswith(".") and not name.endswith(".part") and not top_level_work:
                found.append(here / name)
    return found


def _remove_empty_parents(directory: Path, stop: Path) -> None:
    """Remove ``directory`` and its parents while they are empty, up to ``stop``."""
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _utf8(name: str) -> bool:
    """False for a file name that is not valid UTF-8 (os gives it with surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
