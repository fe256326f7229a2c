"""``issc-node`` whose relay alters what it passes on: the adversary of test_relay_e2e.

Usage: ``python tampering_relay.py bundle|result --config FILE``. ``bundle`` flips a bit
in every chunk of a bundle or input file the relay serves to its peers; ``result``
replaces the value of every successful result a peer sends. The relay's own tasks are
left alone, as a real attacker's would be. Nothing here is part of issc.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from issc.protocol import Message, Result
from node import relay
from node.cli import main

MODE = sys.argv.pop(1)

if MODE == "bundle":
    read_chunk = relay._read_chunk

    def tampered_chunk(path: Path, offset: int) -> tuple[int, bytes]:
        total, data = read_chunk(path, offset)
        return total, bytes([data[0] ^ 1]) + data[1:] if data else data

    relay._read_chunk = tampered_chunk
elif MODE == "result":
    from_peer = relay.RelayServer._from_peer

    async def tampered_from_peer(self: relay.RelayServer, peer: Any, message: Message) -> None:
        if isinstance(message, Result) and message.ok:
            message = dataclasses.replace(message, result={"forged": True})
        await from_peer(self, peer, message)

    relay.RelayServer._from_peer = tampered_from_peer  # type: ignore[method-assign]
else:
    raise SystemExit(f"unknown tampering {MODE!r}")

sys.exit(main())
