"""Where a node session's bytes come from and go to: a TCP connection or a relay.

``NodeSession`` reads and writes through this seam only, so a peer whose frames a relay
carries (``hub.relaying``) is served by exactly the same code, with every check, as a
node connected directly.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

READ_SIZE = 256 * 1024
# A connection closed with data still unsent gets this long to take it, then it is cut
# off: a peer that stops reading cannot keep the hub holding its buffer.
CLOSE_LINGER = 10.0


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

    def abort(self) -> None:
        """End the connection at once, dropping whatever is queued."""
        ...


class StreamTransport:
    """A node's own TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.host = str(peer[0]) if isinstance(peer, tuple) else str(peer)  # per-address caps

    async def read(self) -> bytes:
        return await self._reader.read(READ_SIZE)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def backlog(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    def close(self) -> None:
        if self._writer.is_closing():
            return
        self._writer.close()
        if self.backlog() > 0:
            # close() waits for the buffer to drain; a peer that never reads would keep
            # it (and this connection) forever.
            asyncio.get_running_loop().call_later(CLOSE_LINGER, self.abort)

    def abort(self) -> None:
        self._writer.transport.abort()

    def send_and_close(self, data: bytes) -> None:
        """A last frame (a refusal), then the end, without reading anything."""
        self._writer.write(data)
        self.close()


class ConnectionGate:
    """Counts the node connections open now, in total and per remote address (IP)."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.per_address: collections.Counter[str] = collections.Counter()

    def admit(self, host: str) -> str | None:
        """Count a new connection from ``host``; or, over a cap, why not (not counted)."""
        if self.total >= self.max_total:
            return f"the hub serves {self.max_total} connections already (limits.max_connections)"
        if self.per_address[host] >= self.max_per_address:
            return (
                f"{self.max_per_address} connections from {host} already "
                "(limits.max_connections_per_address)"
            )
        self.total += 1
        self.per_address[host] += 1
        return None

    def release(self, host: str) -> None:
        """An admitted connection from ``host`` ended."""
        self.total -= 1
        self.per_address[host] -= 1
        if self.per_address[host] <= 0:
            del self.per_address[host]
