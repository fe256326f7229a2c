"""Name rules shared by the hub, the node and the owner's tools.

A plain name becomes a file or directory name on someone's disk (``in/NAME``,
``out/NAME``, ``outbox/<project>/files/<task id>/``), so it never holds a separator, never
starts with ``.`` (no ``..``, no hidden files) or ``-`` (no option look-alikes).
"""

from __future__ import annotations

import re

PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# A volunteer's name: it appears in configs, logs and issc-ctl tables, never on disk.
VOLUNTEER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
VOLUNTEER_NAME_RULE = "1-64 letters, digits, or _.@- starting with a letter or digit"
