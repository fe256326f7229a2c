"""Resolve a task file's ``files: {NAME: PATH}`` against the inbox into the content store.

PATH is relative to the task file, which lies at the top of the inbox. A path must stay
inside the inbox and may not pass through a symlink: the inbox is the owner's, but the
hub's own files (its database, its keys) must never be readable through it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path, PurePosixPath

from hub.blobs import ContentStore, FileStoreError
from hub.changes import FileInfo
from hub.store import TaskEntry
from issc.errors import TaskFileError


class InputResolver:
    """Resolves the input files of one task file; each distinct path is read once."""

    def __init__(self, inbox: Path, files: ContentStore) -> None:
        self.inbox = inbox
        self.files = files
        self.used: dict[str, tuple[str, int]] = {}  # relative path -> (sha256, size)

    def resolve(self, entry: TaskEntry) -> TaskEntry:
        """The entry with its files in the content store. Raises TaskFileError."""
        if not entry.file_paths:
            return entry
        infos = []
        for name, path in entry.file_paths:
            try:
                rel = self._checked(path)
                if rel not in self.used:
                    self.used[rel] = self.files.add_file(self.inbox / rel)
            except (TaskFileError, FileStoreError) as exc:
                raise TaskFileError(
                    f"task {entry.task_id!r}: input file {name} ({path}): {exc}", entry.line
                ) from None
            sha, size = self.used[rel]
            infos.append(FileInfo(name, sha, size))
        return replace(entry, files=tuple(infos))

    def _checked(self, path: str) -> str:
        """``path`` as a normalised relative path inside the inbox; raises TaskFileError."""
        pure = PurePosixPath(path)
        if pure.is_absolute() or "\\" in path or "\x00" in path:
            raise TaskFileError("must be a relative path")
        if any(part in ("..", "") for part in pure.parts) or not pure.parts:
            raise TaskFileError("must not leave the task file's directory ('..')")
        if pure.parts[0] in ("accepted", "rejected"):
            raise TaskFileError("must not point into the inbox's accepted/ or rejected/")
        current = self.inbox
        for part in pure.parts:
            current = current / part
            if current.is_symlink():
                raise TaskFileError(f"{part} is a symbolic link")
        if not current.exists():
            raise TaskFileError("does not exist (submit the input files before the task file)")
        if not current.is_file():
            raise TaskFileError("is not a regular file")
        return pure.as_posix()
