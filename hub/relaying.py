"""The peers a relay carries: one virtual session per peer connection.

A relay is an ordinary node whose connection also carries ``peer_opened``, ``relayed``
and ``peer_closed``. Each peer the relay announces gets its own ``NodeSession`` fed by
a ``RelayedTransport`` instead of a socket: the peer's hello, challenge-response, offers
and results go through every check a direct connection gets, the node id comes from
the peer's own key, and the scheduler sees the peer as a node of its own (its ``via``
names the relay). The relay only moves whole frames; it can delay or drop them, never
speak for a peer (it cannot sign as the peer).

Bounds: at most ``MAX_PEERS`` peers per relay, relays nested at most
``MAX_RELAY_DEPTH`` deep, and at most ``MAX_QUEUED_BYTES`` of a peer's frames waiting for
its session (beyond that the relay's connection waits: backpressure, never unbounded
memory). A frame handed to a peer's session counts against that session's message
rate, never the relay's; frames for peers whose session is over slow the relay down
beyond a rate, never end it (``NodeSession._count``). The idle and unread-data limits
watch the relay's connection, not the peers' sessions.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from issc.errors import RemoteProtocolError
from issc.protocol import (
    RELAY_ENVELOPE_OVERHEAD,
    Connection,
    Error,
    ErrorCode,
    PeerClosed,
    PeerOpened,
    Relayed,
    Role,
)

if TYPE_CHECKING:
    from hub.session import NodeSession

log = logging.getLogger(__name__)

MAX_PEERS = 1024  # as many as relay.max_peers allows
MAX_RELAY_DEPTH = 4
MAX_QUEUED_BYTES = 8 * 1024 * 1024
ENVELOPE_OVERHEAD = RELAY_ENVELOPE_OVERHEAD
MAX_ADDRESS = 100


class RelayedTransport:
    """A peer's side of the conversation, carried in envelopes over its relay's session."""

    def __init__(self, relay: NodeSession, peer: int, address: str) -> None:
        self.relay = relay
        self.peer = peer
        self.address = address
        self._frames: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._changed = asyncio.Event()
        self._ended = False  # the relay said the peer is gone, or the relay is gone
        self._closed = False  # we ended it

    async def read(self) -> bytes:
        while not self._frames:
            if self._ended or self._closed:
                return b""
            self._changed.clear()
            await self._changed.wait()
        frame = self._frames.popleft()
        self._queued -= len(frame)
        self._changed.set()
        return frame

    async def put(self, frame: bytes) -> bool:
        """Queue a frame from the relay; waits while too much is queued already. False if
        the peer's session is over (the frame is dropped)."""
        while self._queued > MAX_QUEUED_BYTES and not (self._ended or self._closed):
            self._changed.clear()
            await self._changed.wait()
        if self._ended or self._closed:
            return False
        self._frames.append(frame)
        self._queued += len(frame)
        self._changed.set()
        return True

    def end(self) -> None:
        """The peer's connection is over (said by the relay, or the relay is gone)."""
        self._ended = True
        self._changed.set()

    def write(self, data: bytes) -> None:
        if not self._closed:
            self.relay.send(Relayed(peer=self.peer, frame=data))

    def backlog(self) -> int:
        return self.relay.transport.backlog()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        if not self._ended:
            self.relay.send(PeerClosed(peer=self.peer, reason="closed by the hub"))

    def abort(self) -> None:
        """Nothing of a peer's is queued here (its frames wait in the relay's connection,
        which the relay's session watches): the same as ``close``."""
        self.close()


class RelayedPeers:
    """The virtual sessions of one relay's peers."""

    def __init__(
        self, relay: NodeSession, make_session: Callable[[RelayedTransport], NodeSession]
    ) -> None:
        self.relay = relay
        self._make_session = make_session
        self._peers: dict[int, RelayedTransport] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._highest = 0

    def __len__(self) -> int:
        return len(self._peers)

    def opened(self, message: PeerOpened) -> None:
        """Start a session for a new peer, or refuse it (``limit``) if the relay carries
        ``MAX_PEERS`` already or would nest relays deeper than ``MAX_RELAY_DEPTH``.

        Raises:
            RemoteProtocolError: the relay reuses a peer number.
        """
        if message.peer <= self._highest:
            raise RemoteProtocolError(
                f"peer_opened: peer number {message.peer} is not above {self._highest}"
            )
        self._highest = message.peer
        refusal = None
        if self.relay.depth + 1 > MAX_RELAY_DEPTH:
            refusal = f"relays may be nested at most {MAX_RELAY_DEPTH} deep"
        elif len(self._peers) >= MAX_PEERS:
            refusal = f"the relay carries {MAX_PEERS} peers already"
        if refusal is not None:
            # The peer is told why (``limit``: it tries its next address for a while);
            # the relay itself did nothing wrong and keeps its connection.
            log.warning(
                "relay %s: refusing a peer from %s: %s",
                self.relay.node_id,
                message.address[:MAX_ADDRESS],
                refusal,
            )
            error = Connection(Role.HUB).send(Error(code=ErrorCode.LIMIT, message=refusal))
            self.relay.send(Relayed(peer=message.peer, frame=error))
            self.relay.send(PeerClosed(peer=message.peer, reason=refusal))
            return
        transport = RelayedTransport(self.relay, message.peer, message.address[:MAX_ADDRESS])
        self._peers[message.peer] = transport
        task = asyncio.create_task(self._serve(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, transport: RelayedTransport) -> None:
        try:
            await self._make_session(transport).serve()
        finally:
            self._peers.pop(transport.peer, None)
            transport.close()

    async def relayed(self, message: Relayed) -> bool:
        """Hand a frame to its peer's session; False if that session is over (the frame
        is dropped).

        Raises:
            RemoteProtocolError: the peer number was never opened.
        """
        transport = self._peers.get(message.peer)
        if transport is None:
            if message.peer > self._highest:
                raise RemoteProtocolError(f"relayed: peer {message.peer} was never opened")
            return False  # its session ended meanwhile; the relay hears peer_closed
        return await transport.put(message.frame)

    def closed(self, message: PeerClosed) -> None:
        transport = self._peers.get(message.peer)
        if transport is not None:
            transport.end()

    def close_all(self) -> None:
        """The relay is gone: every peer's session ends (its leases wait one heartbeat
        window for the peer to come back by another way)."""
        for transport in list(self._peers.values()):
            transport.end()
