"""Fixtures of the bad-input suite (docs/security.md, "The bad-input suite").

Fixture names start with ``adv_``; each test file holds the helpers only it needs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

Tree = dict[str, tuple[str, int, int, int]]


def tree_of(root: Path) -> Tree:
    """Everything under ``root``: relative path -> (kind, mode, size, mtime_ns), symlinks
    not followed. Directories carry no size or mtime (creating and removing an entry in
    one changes its mtime without changing what it holds)."""
    found: Tree = {}
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(parent, name)
            info = path.lstat()
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISDIR(info.st_mode):
                found[str(path.relative_to(root))] = ("dir", mode, 0, 0)
            else:
                kind = "link" if stat.S_ISLNK(info.st_mode) else "file"
                found[str(path.relative_to(root))] = (kind, mode, info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture
def adv_tree() -> Callable[[Path], Tree]:
    """``adv_tree(root)``: a snapshot of a directory tree, to compare before and after."""
    return tree_of
