"""Durable file-system steps shared by the hub, the node and the owner's tools."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


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


def rename_no_replace(source: Path, target: Path) -> bool:
    """Rename ``source`` to ``target`` in one step unless ``target`` exists (Linux's
    renameat2 with RENAME_NOREPLACE; os.rename would replace it). Returns False where
    the system or the filesystem cannot do that (the caller falls back).

    Raises:
        FileExistsError: ``target`` exists.
        OSError: anything else.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            return False  # an old kernel, or a filesystem without the flag
        raise OSError(code, os.strerror(code), str(target))  # EEXIST: a FileExistsError
    return True


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    return getattr(libc, "renameat2", None)
