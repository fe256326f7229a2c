"""Which files of a directory were just completed, told by Linux's inotify.

The inbox is polled (every INBOX_POLL seconds) and reads a file only once two polls saw
it unchanged, in case it is still being written. That costs a dropped task at least one
poll interval. inotify says the moment a file is complete: renamed into the directory
(IN_MOVED_TO, how ``issc-project submit`` drops files) or closed after writing
(IN_CLOSE_WRITE, how ``cp`` ends). Such a file is read at once. Polling stays as the
fallback for everything inotify does not see (files there before the hub started, a
filesystem without inotify, an overflowed event queue).

No third-party package: the three libc calls and the event layout are a few lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
MAX_NAMES = 10_000  # names remembered between scans; beyond, polling finds the rest


class DirWatch:
    """Names of files completed in one directory since the last ``take``, hidden ones
    (starting with ".", which the inbox never reads) left out.

    ``fileno`` is readable when events wait; call ``read_events`` then. On a system
    without inotify ``available`` is False and the caller polls alone.
    """

    def __init__(self, directory: Path) -> None:
        self._fd = -1
        self._completed: set[str] = set()
        self.overflowed = False
        libc_name = ctypes.util.find_library("c")
        if libc_name is None:
            return
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            return
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return  # out of inotify instances: polling still works
        watch = libc.inotify_add_watch(fd, os.fsencode(directory), IN_CLOSE_WRITE | IN_MOVED_TO)
        if watch < 0:
            os.close(fd)
            return
        self._fd = fd

    @property
    def available(self) -> bool:
        return self._fd >= 0

    def fileno(self) -> int:
        return self._fd

    def read_events(self) -> bool:
        """Drain the waiting events; True if a file not hidden (a name not starting with
        ".") was completed, or events were lost."""
        completed = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return completed
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + length].rstrip(b"\0")
                offset += length
                if mask & IN_Q_OVERFLOW or len(self._completed) >= MAX_NAMES:
                    self.overflowed = completed = True  # names lost: the poll finds them
                elif name and not name.startswith(b"."):  # hidden: never read, no news
                    self._completed.add(os.fsdecode(name))
                    completed = True

    def take(self) -> set[str]:
        """The names completed since the last call (and forget them)."""
        names, self._completed = self._completed, set()
        self.overflowed = False
        return names

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
