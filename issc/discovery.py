"""LAN relay discovery over UDP broadcast.

A peer sends one datagram ``ISSC-DISCOVER 1`` (optionally followed by ``\\n``) to a
broadcast (or unicast) address; each relay that hears it, and whose own uplink to the hub
is open, answers unicast to the request's source with ``ISSC-RELAY 1 <port> <node_id>``:
``port`` is the relay's TCP listen port and ``node_id`` its node id. The peer takes the
relay's host from the answer's *source address*, never from the payload, so a relay
listening on 0.0.0.0 needs no idea of its own address.

Everything else is ignored silently: datagrams over 512 bytes, anything that does not
match the format exactly (ASCII only, single spaces, port 1..65535 in decimal without
a sign or leading zeros, node id 1..64 of ``[A-Za-z0-9_-]``). A relay answers at most
``max_answers_per_second`` requests (20 by default) in any one-second window in total, so
it cannot be used to reflect traffic at a third party faster than that.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from issc.config import Address

log = logging.getLogger(__name__)

REQUEST = b"ISSC-DISCOVER 1"
MAX_DATAGRAM = 512
MAX_RELAYS = 16
DEFAULT_MAX_ANSWERS_PER_SECOND = 20

_NODE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ANSWER_RE = re.compile(rb"ISSC-RELAY 1 ([1-9][0-9]{0,4}) ([A-Za-z0-9_-]{1,64})\n?")


def is_request(data: bytes) -> bool:
    """True if ``data`` is exactly a discovery request."""
    return data in (REQUEST, REQUEST + b"\n")


def format_answer(relay_port: int, node_id: str) -> bytes:
    """The answer a relay listening on TCP ``relay_port`` sends; ValueError if invalid."""
    if isinstance(relay_port, bool) or not 1 <= relay_port <= 65535:
        raise ValueError(f"relay port must be 1..65535, got {relay_port!r}")
    if not _NODE_ID_RE.fullmatch(node_id):
        raise ValueError(f"node id must be 1-64 of [A-Za-z0-9_-], got {node_id!r}")
    return f"ISSC-RELAY 1 {relay_port} {node_id}".encode("ascii")


def parse_answer(data: bytes) -> tuple[int, str] | None:
    """``(port, node_id)`` from a relay's answer, or None if it is not a valid answer."""
    if len(data) > MAX_DATAGRAM:
        return None
    match = _ANSWER_RE.fullmatch(data)
    if match is None:
        return None
    port = int(match.group(1))
    if port > 65535:
        return None
    return port, match.group(2).decode("ascii")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _ResponderProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: DiscoveryResponder) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._on_request(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("discovery responder: %s", exc)


class DiscoveryResponder:
    """The relay side: answers discovery requests while ``enabled()`` is True.

    ``bind`` is where to listen for requests (``0.0.0.0:7412`` hears broadcasts on every
    interface); with port 0 the OS picks one, readable as ``.port`` after ``start()``.
    The socket has SO_REUSEADDR, so several responders on one machine can share a port
    (each hears the broadcasts), and SO_BROADCAST.
    """

    def __init__(
        self,
        bind: Address,
        relay_port: int,
        node_id: str,
        enabled: Callable[[], bool],
        *,
        max_answers_per_second: int = DEFAULT_MAX_ANSWERS_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_answers_per_second < 1:
            raise ValueError("max_answers_per_second must be at least 1")
        self.bind = bind
        self._answer = format_answer(relay_port, node_id)  # validates port and node id
        self._enabled = enabled
        self._limit = max_answers_per_second
        self._clock = clock
        self._sent_at: collections.deque[float] = collections.deque()
        self._transport: asyncio.DatagramTransport | None = None
        self._port = 0
        self.answered = 0  # answers sent
        self.rate_limited = 0  # valid requests dropped by the rate limit

    @property
    def port(self) -> int:
        """The UDP port the responder is bound to (0 before ``start()``)."""
        return self._port

    async def start(self) -> None:
        """Bind the UDP socket and start answering. Raises OSError if it cannot bind."""
        if self._transport is not None:
            raise RuntimeError("discovery responder already started")
        sock = socket.socket(_family(self.bind.host), socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setblocking(False)
            sock.bind((self.bind.host, self.bind.port))
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _ResponderProtocol(self), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        self._transport = transport
        self._port = int(sock.getsockname()[1])
        log.debug("discovery responder listening on %s:%d", self.bind.host, self._port)

    def close(self) -> None:
        """Stop answering and close the socket; safe to call more than once."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _allow_answer(self) -> bool:
        """The rate limit: at most ``limit`` answers in any one-second window."""
        now = self._clock()
        while self._sent_at and now - self._sent_at[0] >= 1.0:
            self._sent_at.popleft()
        if len(self._sent_at) >= self._limit:
            return False
        self._sent_at.append(now)
        return True

    def _on_request(self, data: bytes, addr: Any) -> None:
        transport = self._transport
        if transport is None or len(data) > MAX_DATAGRAM or not is_request(data):
            return
        if not isinstance(addr, tuple) or len(addr) < 2 or addr[1] == 0:
            return
        try:
            enabled = self._enabled()
        except Exception:
            log.exception("discovery responder: enabled() failed; not answering")
            return
        if not enabled:
            return
        if not self._allow_answer():
            self.rate_limited += 1
            return
        self.answered += 1
        transport.sendto(self._answer, addr)


class _SeekerProtocol(asyncio.DatagramProtocol):
    def __init__(self, exclude: str | None) -> None:
        self.found: list[Address] = []
        self.exclude = exclude

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(self.found) >= MAX_RELAYS:
            return
        parsed = parse_answer(data)
        if parsed is None or not isinstance(addr, tuple) or not addr or parsed[1] == self.exclude:
            return
        relay = Address(str(addr[0]), parsed[0])
        if relay not in self.found:
            self.found.append(relay)

    def error_received(self, exc: Exception) -> None:
        log.debug("discovery: %s", exc)


async def discover_relays(
    address: str, port: int, timeout: float, *, exclude: str | None = None
) -> list[Address]:
    """Ask for relays at ``address:port`` (usually a broadcast address) for ``timeout`` s.

    A relay whose node id is ``exclude`` (the asking node itself) is left out.

    Returns the distinct relays that answered, as ``Address(answer's source host, TCP
    port from the answer)``, in the order their answers arrived, at most 16. Never raises
    on network errors: they are logged at debug level and whatever was found is returned.
    """
    loop = asyncio.get_running_loop()
    protocol = _SeekerProtocol(exclude)
    transport: asyncio.DatagramTransport | None = None
    try:
        infos = await loop.getaddrinfo(address, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
        target = infos[0][4]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setblocking(False)
            sock.bind(("0.0.0.0", 0))
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        transport.sendto(REQUEST, target)
        await asyncio.sleep(max(0.0, timeout))
    except (OSError, ValueError, IndexError, OverflowError) as exc:
        log.debug("discovery at %s:%s failed: %s", address, port, exc)
    finally:
        if transport is not None:
            transport.close()
    return list(protocol.found)
