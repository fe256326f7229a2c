"""Durable file-system steps shared by the hub, the node and the owner's tools."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make renames and new entries in ``directory`` durable. Raises OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (os.write may write less). Raises OSError."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def sha256_file(path: Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB blocks. Raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()
