"""Where a node session's bytes come from and go to: a TCP connection or a relay.

``NodeSession`` reads and writes through this seam only, so a peer whose frames a relay
carries (``hub.relaying``) is served by exactly the same code, with every check, as a
node connected directly.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

READ_SIZE = 256 * 1024


class Transport(Protocol):
    address: str  # host:port of the node, for logs and `issc-ctl nodes`

    async def read(self) -> bytes:
        """The next bytes from the node; ``b""`` once its side is closed."""
        ...

    def write(self, data: bytes) -> None:
        """Queue bytes for the node; never blocks."""
        ...

    def backlog(self) -> int:
        """Bytes queued and not yet taken by the other side."""
        ...

    def close(self) -> None:
        """End the connection (queued bytes still go out)."""
        ...


class StreamTransport:
    """A node's own TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    async def read(self) -> bytes:
        return await self._reader.read(READ_SIZE)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def backlog(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    def close(self) -> None:
        self._writer.close()
