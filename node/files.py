"""The node's input-file cache: ``<data_dir>/files/<sha256>``, shared by every task.

A file is downloaded to ``<sha256>.part`` (a cut download resumes from that length),
checked against its SHA-256 once complete, and renamed into place read-only; nothing is
used before it checks. Using a file touches its mtime, so the mtime is its last use:
files unused for ``max_age`` seconds are evicted, and beyond ``max_bytes`` the least
recently used go first. Files pinned by running tasks are never evicted, so the cache may
exceed its size while they run. Pins live in memory: after a restart nothing runs yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from issc.errors import FileTransferError
from issc.names import SHA256_RE
from node.transfer import append_part

log = logging.getLogger(__name__)

MAX_INPUT_FILE_SIZE = 1024 * 1024 * 1024  # docs/design.md: one input file at most 1 GiB

_PART = ".part"


class DigestMismatchError(FileTransferError):
    """A complete download does not have the SHA-256 it was asked for (it was deleted)."""


class FileCache:
    def __init__(self, directory: Path, max_bytes: int, max_age: float) -> None:
        """A cache in ``directory`` (created) of at most ``max_bytes`` of unpinned files,
        none unused for more than ``max_age`` seconds."""
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        directory.mkdir(parents=True, exist_ok=True)
        self._pins: Counter[str] = Counter()

    def _file(self, sha256: str) -> Path:
        # The digest comes from the hub and becomes a file name: never a path.
        if not SHA256_RE.match(sha256):
            raise FileTransferError(f"{sha256[:80]!r} is not a SHA-256 digest (64 hex digits)")
        return self.directory / sha256

    def _part(self, sha256: str) -> Path:
        return self._file(sha256).with_name(sha256 + _PART)

    # ---- lookup -------------------------------------------------------------------------

    def path(self, sha256: str) -> Path | None:
        """The checked file with this digest, if cached; touched, as it is about to be used.

        Raises FileTransferError if ``sha256`` is not a digest or the file cannot be touched.
        """
        path = self._file(sha256)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FileTransferError(f"cannot use the cached file: {exc.strerror}") from None
        return path

    def partial_size(self, sha256: str) -> int:
        """Bytes of an unfinished download held (0 if none). Raises FileTransferError for a
        bad digest."""
        try:
            return self._part(sha256).stat().st_size
        except FileNotFoundError:
            return 0

    # ---- downloading --------------------------------------------------------------------

    def append_chunk(self, sha256: str, offset: int, total: int, data: bytes, *, size: int) -> bool:
        """Add the chunk at ``offset`` of a file offered with ``size`` bytes; True once all
        ``total`` bytes are there.

        Raises:
            FileTransferError: ``total`` differs from the offered ``size`` or is over the
                1 GiB cap (the download is deleted: the hub contradicts itself), or the
                chunk is out of order, runs past the end, or is empty before it, or cannot
                be written (the bytes held so far are kept: they are still good).
        """
        if total != size or total > MAX_INPUT_FILE_SIZE:
            self.discard(sha256)
            if total != size:
                raise FileTransferError(f"the hub sends {total} bytes; the offer said {size}")
            raise FileTransferError(
                f"{total} bytes exceed the input file limit of {MAX_INPUT_FILE_SIZE} bytes"
            )
        try:
            return append_part(self._part(sha256), offset, total, data, MAX_INPUT_FILE_SIZE)
        except ValueError as exc:
            raise FileTransferError(str(exc)) from None
        except OSError as exc:  # the part is kept: what was written before is still good
            raise FileTransferError(f"cannot store the download: {exc.strerror}") from None

    def finish(self, sha256: str) -> Path:
        """Check a complete download against its digest and move it into the cache.

        Raises:
            DigestMismatchError: the content has another SHA-256 (the download is deleted).
            FileTransferError: there is no download to finish, or it cannot be read.
        """
        part = self._part(sha256)
        try:
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                while block := f.read(1024 * 1024):
                    digest.update(block)
                # Nothing re-checks a cached file, so it must be on disk before its name is.
                os.fsync(f.fileno())
            if digest.hexdigest() != sha256:
                part.unlink(missing_ok=True)
                raise DigestMismatchError(
                    f"downloaded data has SHA-256 {digest.hexdigest()[:16]}…, "
                    f"not {sha256[:16]}…; discarded"
                )
            part.chmod(0o444)  # a copy goes to each task; the cached file is never written
            final = self._file(sha256)
            os.replace(part, final)
            os.utime(final)
        except OSError as exc:
            raise FileTransferError(f"cannot finish the download: {exc.strerror}") from None
        return final

    def discard(self, sha256: str) -> None:
        """Delete an unfinished download."""
        self._part(sha256).unlink(missing_ok=True)

    # ---- pins and eviction --------------------------------------------------------------

    def pin(self, sha256: str) -> None:
        """Keep this file from eviction until as many ``unpin`` calls (one per task)."""
        self._pins[sha256] += 1

    def unpin(self, sha256: str) -> None:
        self._pins[sha256] -= 1
        if self._pins[sha256] <= 0:
            del self._pins[sha256]

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Pin ``digests`` for the duration of the block."""
        held = list(digests)
        for sha256 in held:
            self.pin(sha256)
        try:
            yield
        finally:
            for sha256 in held:
                self.unpin(sha256)

    def evict(self, now: float | None = None) -> list[str]:
        """Delete unpinned files unused for ``max_age`` seconds (and unfinished downloads
        untouched that long), then the least recently used beyond ``max_bytes``.

        Returns the names deleted. Never raises: a file that cannot be examined or
        deleted stays, and the next eviction tries again.
        """
        now = time.time() if now is None else now
        entries: list[tuple[float, int, Path]] = []  # (mtime, size, path) of complete files
        removed: list[str] = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.directory):
                sha256 = entry.name.removesuffix(_PART)
                if not SHA256_RE.match(sha256) or sha256 in self._pins:
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if now - info.st_mtime > self.max_age:
                    if _unlink(Path(entry.path)):
                        removed.append(entry.name)
                elif entry.name == sha256:
                    entries.append((info.st_mtime, info.st_size, Path(entry.path)))
        total = sum(size for _mtime, size, _path in entries) + self._pinned_bytes()
        for _mtime, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if _unlink(path):
                removed.append(path.name)
                total -= size
        if removed:
            log.info("file cache: evicted %d file(s)", len(removed))
        return removed

    def _pinned_bytes(self) -> int:
        total = 0
        for sha256 in self._pins:
            with contextlib.suppress(OSError, FileTransferError):
                total += self._file(sha256).stat().st_size
        return total


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:
        return False
    return True
