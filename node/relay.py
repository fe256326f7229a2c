"""Relay mode: serve peer nodes on the LAN over this node's own connection to the hub.

Peers speak the ordinary node protocol to the relay (``relay: {listen: host:port}``).
Each peer connection is announced to the hub with ``peer_opened`` and its frames travel
in ``relayed`` envelopes over the relay's uplink, where the hub serves it as a node of
its own: the peer proves its own identity, gets its own offers, and its results carry
its own MAC. The relay decodes every frame both ways (a peer cannot send the hub
anything a direct node could not) and answers two requests itself:

* ``fetch_bundle``: bundles are fetched from the hub once, checked against their
  SHA-256 digest, and served to every peer from ``<data_dir>/relay/bundles``;
* ``fetch_file``: input files come from the node's own input-file cache, shared with
  the relay's own tasks.

Only digests the hub offered to that peer (on this connection) are fetched into the
relay's caches; any other fetch is passed to the hub inside the peer's envelopes, where
the hub answers it or refuses that peer alone. Peers verify bundles against their own
``trusted_keys`` as always; the relay needs no key for the projects it carries.

The relay listens only while it can serve: its uplink is open and it has fewer than
``max_peers`` peers. A peer that could not be served tries its next address at once, a
probe for a full relay fails, and a relay can never be reached through itself, so relays
form a tree without loops. When the uplink drops, every peer is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from issc.config import RelayConfig
from issc.discovery import DiscoveryResponder
from issc.errors import FileTransferError, IsscError, LocalProtocolError, RemoteProtocolError
from issc.names import SHA256_RE
from issc.protocol import (
    BUNDLE_CHUNK_SIZE,
    CLOSED,
    NEED_DATA,
    RELAY_ENVELOPE_OVERHEAD,
    BundleChunk,
    Connection,
    Error,
    ErrorCode,
    FetchBundle,
    FetchFile,
    FileChunk,
    FrameDecoder,
    Message,
    Offer,
    PeerClosed,
    PeerOpened,
    Relayed,
    Role,
    decode_message,
    encode_frame,
    encode_message,
)
from node.fetch import BlobFetcher, InputFetcher
from node.files import FileCache

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
MAX_WRITE_BUFFER = 16 * 1024 * 1024  # a peer that reads slower than this is dropped
LISTEN_RETRY_SECONDS = 5.0
MAX_OFFERED = 4096  # digests remembered per peer (it holds at most a few leases)


@dataclass(slots=True)
class Uplink:
    """The relay's own open connection to the hub (or to the relay above it)."""

    send: Callable[[Message], None]
    drain: Callable[[], Awaitable[None]]
    max_frame_size: int


@dataclass(slots=True)
class _Peer:
    number: int
    address: str
    writer: asyncio.StreamWriter
    conn: Connection
    bundles: dict[str, int] = field(default_factory=dict)  # offered digest -> size
    files: dict[str, int] = field(default_factory=dict)  # offered sha256 -> size
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False


class RelayServer:
    def __init__(
        self,
        config: RelayConfig,
        node_id: str,
        data_dir: Path,
        inputs: InputFetcher,
        cache_bytes: int,
        cache_seconds: float,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.addr_file = data_dir / "relay.addr"
        bundle_cache = FileCache(data_dir / "relay" / "bundles", cache_bytes, cache_seconds)
        self.bundles = BlobFetcher(
            bundle_cache, lambda digest, at: FetchBundle(digest=digest, offset=at)
        )
        self.inputs = inputs
        self.port = config.listen.port  # the port chosen at the first bind, if it was 0
        self._uplink: Uplink | None = None
        self._server: asyncio.Server | None = None
        self._binding = False
        self._peers: dict[int, _Peer] = {}
        self._last_number = 0
        self._discovery: DiscoveryResponder | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._prefetching: set[str] = set()  # bundle digests being fetched ahead of a peer

    @property
    def serving(self) -> bool:
        return self._uplink is not None and self._server is not None

    async def start(self) -> None:
        """Start answering discovery, if configured (only while serving).

        Raises:
            IsscError: the discovery address cannot be bound.
        """
        if self.config.discovery is not None:
            self._discovery = DiscoveryResponder(
                self.config.discovery, self.port, self.node_id, lambda: self.serving
            )
            try:
                await self._discovery.start()
            except OSError as exc:
                raise IsscError(
                    f"relay.discovery: cannot listen on {self.config.discovery}: {exc.strerror}"
                ) from None

    async def close(self) -> None:
        self.uplink_down()
        if self._discovery is not None:
            self._discovery.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.bundles.close()

    # ---- the uplink ---------------------------------------------------------------------

    def uplink_up(self, uplink: Uplink) -> None:
        """The node's connection is open: fetch over it and accept peers."""
        self._uplink = uplink
        self.bundles.attach(uplink.send)
        self._update_listening()

    def uplink_down(self) -> None:
        """The node's connection is gone: drop every peer and stop listening."""
        if self._uplink is None:
            return
        self._uplink = None
        self.bundles.detach()
        for peer in list(self._peers.values()):
            self._end_peer(peer, None)
        self._update_listening()
        log.info("relay: uplink lost; no longer accepting peers")

    def _update_listening(self) -> None:
        """Listen exactly while there is an uplink and room for another peer."""
        wanted = self._uplink is not None and len(self._peers) < self.config.max_peers
        if wanted and self._server is None and not self._binding:
            self._binding = True
            self._spawn(self._listen())
        elif not wanted and self._server is not None:
            self._server.close()
            self._server = None
            if self._uplink is None:
                self.addr_file.unlink(missing_ok=True)

    async def _listen(self) -> None:
        listen = self.config.listen
        try:
            while True:
                try:
                    server = await asyncio.start_server(self._serve_peer, listen.host, self.port)
                    break
                except OSError as exc:  # the port is taken, say: try again while wanted
                    log.error("relay: cannot listen on %s:%d: %s", listen.host, self.port, exc)
                    await asyncio.sleep(LISTEN_RETRY_SECONDS)
                    if self._uplink is None:
                        return
        finally:
            self._binding = False
        self._server = server
        first = self.port == 0 or not self.addr_file.exists()
        self.port = server.sockets[0].getsockname()[1]
        self._update_listening()  # things changed while binding: maybe close at once
        if self._server is server and first:
            tmp = self.addr_file.with_name(".relay.addr.tmp")
            tmp.write_text(f"{listen.host}:{self.port}\n", encoding="utf-8")
            os.replace(tmp, self.addr_file)
            log.info("relay: accepting peers on %s:%d", listen.host, self.port)

    def on_bundle_chunk(self, chunk: BundleChunk) -> None:
        self.bundles.feed(chunk.digest, chunk.offset, chunk.total, chunk.data)

    def on_uplink_message(self, message: Relayed | PeerClosed) -> None:
        """A frame for a peer, or the hub ending a peer's connection."""
        peer = self._peers.get(message.peer)
        if peer is None:
            return  # gone meanwhile
        if isinstance(message, PeerClosed):
            log.info(
                "relay: hub closed peer %d (%s): %s", peer.number, peer.address, message.reason
            )
            self._end_peer(peer, None)
            return
        try:
            decoded = _decode_frame(message.frame, peer.conn.max_frame_size)
        except RemoteProtocolError as exc:
            log.warning("relay: unusable frame from the hub for peer %d: %s", peer.number, exc)
            self._end_peer(peer, "the relay got an unusable frame for it")
            return
        if isinstance(decoded, Offer):
            self._remember_offer(peer, decoded)
        self._send(peer, decoded)
        if isinstance(decoded, Error):
            self._end_peer(peer, None)

    def _remember_offer(self, peer: _Peer, offer: Offer) -> None:
        for task in offer.tasks:
            if len(peer.bundles) + len(peer.files) >= MAX_OFFERED:
                peer.bundles.clear()
                peer.files.clear()
            peer.bundles[task.digest] = task.size
            for ref in task.files:
                peer.files[ref.sha256] = ref.size
            digest = task.digest
            wanted = digest not in self._prefetching and SHA256_RE.match(digest)
            if wanted and self.bundles.cache.path(digest) is None:
                # Start now: by the time the peer asks, the bundle is (being) fetched.
                self._prefetching.add(digest)
                self._spawn(self._prefetch(digest, task.size))

    async def _prefetch(self, digest: str, size: int) -> None:
        try:
            await self.bundles.fetch_blob(digest, size)
        except (FileTransferError, OSError) as exc:
            log.warning("relay: cannot fetch bundle %s: %s", digest[:12], exc)
        finally:
            self._prefetching.discard(digest)

    # ---- peers --------------------------------------------------------------------------

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        address = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else "?"
        uplink = self._uplink
        if uplink is None or len(self._peers) >= self.config.max_peers:
            why = "the relay has no uplink" if uplink is None else "the relay is full"
            with contextlib.suppress(IsscError, OSError):
                writer.write(Connection(Role.HUB).send(Error(code=ErrorCode.LIMIT, message=why)))
            writer.close()
            return
        self._last_number += 1
        frame_limit = uplink.max_frame_size - RELAY_ENVELOPE_OVERHEAD
        peer = _Peer(self._last_number, address, writer, Connection(Role.HUB, frame_limit))
        self._peers[peer.number] = peer
        self._update_listening()
        uplink.send(PeerOpened(peer=peer.number, address=address))
        log.info("relay: peer %d connected from %s", peer.number, address)
        reason = "the peer disconnected"
        try:
            while not peer.closed:
                peer.conn.receive_data(await reader.read(READ_SIZE))
                while not peer.closed:
                    event = peer.conn.next_event()
                    if event is NEED_DATA:
                        break
                    if event is CLOSED:
                        peer.closed = True
                        break
                    assert isinstance(event, Message)
                    await self._from_peer(peer, event)
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("relay: peer %d (%s): %s", peer.number, address, reason)
            self._send(peer, Error(code=ErrorCode.PROTOCOL, message=str(exc)[:2000]))
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._end_peer(peer, reason)

    async def _from_peer(self, peer: _Peer, message: Message) -> None:
        """Answer a fetch from the caches; forward anything else to the hub."""
        if isinstance(message, FetchBundle) and message.digest in peer.bundles:
            size = peer.bundles[message.digest]
            self._spawn_for(peer, self._serve_bundle(peer, message, size))
            return
        if isinstance(message, FetchFile) and message.sha256 in peer.files:
            size = peer.files[message.sha256]
            self._spawn_for(peer, self._serve_file(peer, message, size))
            return
        # Anything else goes to the hub, including a fetch of something not offered on
        # this connection (the rest of a download begun before the peer reconnected):
        # the hub answers it, or ends this peer's session alone if it makes no sense.
        uplink = self._uplink
        if uplink is None:
            raise ConnectionError("the relay lost its uplink")
        frame = encode_frame(encode_message(message), peer.conn.max_frame_size)
        uplink.send(Relayed(peer=peer.number, frame=frame))
        await uplink.drain()  # a fast peer waits for a slow uplink: no unbounded buffer

    async def _serve_bundle(self, peer: _Peer, request: FetchBundle, size: int) -> None:
        try:
            path = await self.bundles.fetch_blob(request.digest, size)
            chunk = await asyncio.to_thread(_read_chunk, path, request.offset)
        except (FileTransferError, OSError) as exc:
            log.warning("relay: cannot serve bundle %s: %s", request.digest[:12], exc)
            self._end_peer(peer, f"the relay cannot fetch bundle {request.digest[:12]}")
            return
        total, data = chunk
        self._send(
            peer, BundleChunk(digest=request.digest, offset=request.offset, total=total, data=data)
        )

    async def _serve_file(self, peer: _Peer, request: FetchFile, size: int) -> None:
        try:
            path = await self.inputs.fetch_blob(request.sha256, size)
            chunk = await asyncio.to_thread(_read_chunk, path, request.offset)
        except (FileTransferError, OSError) as exc:
            log.warning("relay: cannot serve input file %s: %s", request.sha256[:12], exc)
            self._end_peer(peer, f"the relay cannot fetch input file {request.sha256[:12]}")
            return
        total, data = chunk
        self._send(
            peer, FileChunk(sha256=request.sha256, offset=request.offset, total=total, data=data)
        )

    def _send(self, peer: _Peer, message: Message) -> None:
        if peer.writer.is_closing():
            return
        try:
            peer.writer.write(peer.conn.send(message))
        except LocalProtocolError as exc:
            log.warning("relay: cannot pass %s to peer %d: %s", message.TAG, peer.number, exc)
            self._end_peer(peer, f"the relay could not pass on {message.TAG}")
            return
        if peer.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("relay: peer %d is not reading its data; disconnecting", peer.number)
            self._end_peer(peer, "the peer does not read its data")

    def _end_peer(self, peer: _Peer, reason: str | None) -> None:
        """Forget a peer and close its connection; tell the hub ``reason`` unless None
        (the hub ended it, or the uplink is gone)."""
        peer.closed = True
        if self._peers.pop(peer.number, None) is None:
            return
        if reason is not None and self._uplink is not None:
            self._uplink.send(PeerClosed(peer=peer.number, reason=reason[:500]))
        for task in peer.tasks:
            task.cancel()
        peer.writer.close()
        self._update_listening()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _spawn_for(self, peer: _Peer, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        peer.tasks.add(task)
        task.add_done_callback(peer.tasks.discard)


def _decode_frame(frame: bytes, max_frame_size: int) -> Message:
    """The one message in a whole frame. Raises RemoteProtocolError."""
    decoder = FrameDecoder(max_frame_size)
    decoder.feed(frame)
    body = decoder.next_frame()
    if body is None or decoder.buffered:
        raise RemoteProtocolError("a relayed frame must hold exactly one whole frame")
    return decode_message(body)


def _read_chunk(path: Path, offset: int) -> tuple[int, bytes]:
    """(total size, up to one chunk of bytes from ``offset``) of a cached file.

    Raises OSError, or FileTransferError when ``offset`` is past the end."""
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        if offset > total:
            raise FileTransferError(f"offset {offset} is past the end ({total} bytes)")
        f.seek(offset)
        return total, f.read(BUNDLE_CHUNK_SIZE)
