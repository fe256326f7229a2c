"""``issc-node`` whose relay alters what it passes on: the adversary of test_relay_e2e.

Usage: ``python tampering_relay.py bundle|file|result --config FILE``. ``bundle`` and
``file`` flip a bit in every chunk of a bundle or of an input file the relay serves to its
peers; ``result`` replaces the value of every successful result a peer sends. The relay's
own tasks are left alone, as a real attacker's would be. Nothing here is part of issc.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from issc.protocol import BundleChunk, FileChunk, Message, Result
from node import relay
from node.cli import main

MODE = sys.argv.pop(1)
send = relay.RelayServer._send
from_peer = relay.RelayServer._from_peer
CHUNKS: dict[str, type[Message]] = {"bundle": BundleChunk, "file": FileChunk}


def tampered_send(self: relay.RelayServer, peer: Any, message: Message) -> None:
    if isinstance(message, CHUNKS[MODE]) and message.data:  # type: ignore[attr-defined]
        data = message.data  # type: ignore[attr-defined]
        message = dataclasses.replace(message, data=bytes([data[0] ^ 1]) + data[1:])
    send(self, peer, message)


async def tampered_from_peer(self: relay.RelayServer, peer: Any, message: Message) -> None:
    if isinstance(message, Result) and message.ok:
        message = dataclasses.replace(message, result={"forged": True})
    await from_peer(self, peer, message)


if MODE in CHUNKS:
    relay.RelayServer._send = tampered_send  # type: ignore[method-assign]
elif MODE == "result":
    relay.RelayServer._from_peer = tampered_from_peer  # type: ignore[method-assign]
else:
    raise SystemExit(f"unknown tampering {MODE!r}")

sys.exit(main())
