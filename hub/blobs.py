"""The hub's content store of input and output files, and the area for partial uploads.

Files are kept by SHA-256 under ``<data_dir>/files/<sha[:2]>/<sha>``: tasks that share an
input share one copy. Every file gets there by temp file, fsync and rename, so a
crash leaves either the whole file or none. Uploads grow in
``<data_dir>/uploads/<lease>/<name>.part`` (each chunk fsynced before it is
acknowledged) and move into the store only once their digest checks.

All methods block on disk I/O: call them off the event loop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from hub import faults
from issc.errors import IsscError
from issc.fsutil import fsync_dir, sha256_file, write_all
from issc.names import SHA256_RE

CHUNK = 1024 * 1024
MAX_INPUT_FILE = 1024 * 1024 * 1024


class FileStoreError(IsscError):
    """A file could not be read into, or found in, the content store."""


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def size(self, sha256: str) -> int | None:
        """The size of a stored file, or None if the store does not have it."""
        if not SHA256_RE.match(sha256):
            return None
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, sha256: str, offset: int, length: int = CHUNK) -> tuple[int, bytes] | None:
        """(total size, bytes from ``offset``), or None for an unknown file or offset."""
        total = self.size(sha256)
        if total is None or offset > total:
            return None
        with open(self.path(sha256), "rb") as f:
            f.seek(offset)
            return total, f.read(length)

    def add_file(self, source: Path, max_size: int = MAX_INPUT_FILE) -> tuple[str, int]:
        """Copy ``source`` into the store; returns (sha256, size).

        Raises:
            FileStoreError: ``source`` cannot be read or is larger than ``max_size`` (the
                file's fault).
            OSError: the store cannot be written (a full disk: the hub's own trouble).
        """
        digest = hashlib.sha256()
        size = 0
        try:
            src = open(source, "rb")  # noqa: SIM115 - closed below, read errors told apart
        except OSError as exc:
            raise FileStoreError(f"cannot read: {exc.strerror}") from None
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp)
        except BaseException:
            src.close()
            raise
        tmp = Path(tmp_name)
        try:
            with src, os.fdopen(fd, "wb") as out:
                while True:
                    try:
                        block = src.read(CHUNK)
                    except OSError as exc:
                        raise FileStoreError(f"cannot read: {exc.strerror}") from None
                    if not block:
                        break
                    size += len(block)
                    if size > max_size:
                        raise FileStoreError(f"larger than the {max_size}-byte limit")
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            self._install(tmp, sha)
            return sha, size
        finally:
            tmp.unlink(missing_ok=True)

    def adopt(self, verified: Path, sha256: str) -> None:
        """Move a file whose digest was checked into the store (a no-op if it is there)."""
        self._install(verified, sha256)
        verified.unlink(missing_ok=True)

    def _install(self, tmp: Path, sha256: str) -> None:
        target = self.path(sha256)
        if target.exists():
            return  # same content, already stored
        target.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o444)
        os.rename(tmp, target)
        fsync_dir(target.parent)


class UploadArea:
    """Partial output files, resumable across cuts and hub restarts."""

    def __init__(self, root: Path, store: ContentStore) -> None:
        self.root = root
        self.store = store
        root.mkdir(parents=True, exist_ok=True)

    def _part(self, lease: int, name: str) -> Path:
        return self.root / str(lease) / f"{name}.part"

    def received(self, lease: int, name: str, sha256: str, size: int) -> int:
        """How many bytes of this file the hub holds (``size`` once it is in the store).

        A whole part that is not in the store yet (moving it there failed: a full disk)
        counts one byte short, so the node sends its last byte again and ``write``
        finishes the move.
        """
        if self.store.size(sha256) == size:
            return size
        try:
            part = self._part(lease, name).stat().st_size
        except FileNotFoundError:
            return 0
        return min(part, size - 1) if size > 0 else 0

    def write(self, lease: int, name: str, sha256: str, size: int, offset: int, data: bytes) -> int:
        """Append a chunk; returns the bytes now held (0 after a digest mismatch).

        A chunk not at the end of what is held is ignored: the answer tells the node
        where to go on. Only bytes written whole and synced count: a chunk that fails
        (ENOSPC, EIO) is cut off the part again before the OSError is raised.
        """
        if self.store.size(sha256) == size:
            return size
        part = self._part(lease, name)
        try:
            held = min(part.stat().st_size, size)
        except FileNotFoundError:
            held = 0
        if held == size and size > 0:
            return self._finish(part, sha256, size)  # complete, but not moved in yet
        if offset != held or held + len(data) > size or not data:
            return min(held, size - 1) if size > 0 else held
        part.parent.mkdir(exist_ok=True)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.lseek(fd, held, os.SEEK_SET)
            write_all(fd, data)
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, held)  # frees what the failed chunk took
            except OSError:
                part.unlink(missing_ok=True)  # cannot tell what is good: start over
            raise
        finally:
            os.close(fd)
        faults.point("upload.after_fsync")  # durable; not counted, not acknowledged yet
        held += len(data)
        if held < size:
            return held
        return self._finish(part, sha256, size)

    def _finish(self, part: Path, sha256: str, size: int) -> int:
        """Check a whole part and move it into the store: ``size``, or 0 after a digest
        mismatch (the part is dropped). Raises OSError if it cannot be moved."""
        if sha256_file(part) != sha256:
            part.unlink()
            return 0
        self.store.adopt(part, sha256)
        return size

    def leases(self) -> list[int]:
        return [int(p.name) for p in self.root.iterdir() if p.name.isdigit()]

    def discard(self, lease: int) -> None:
        shutil.rmtree(self.root / str(lease), ignore_errors=True)
