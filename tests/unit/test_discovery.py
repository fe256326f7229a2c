"""LAN relay discovery over UDP: real sockets, loopback only.

Every datagram here goes to 127.0.0.1 or to 127.255.255.255, the broadcast address of
the loopback network. On Linux a broadcast to 127.255.255.255 is delivered to the
sockets bound to 0.0.0.0 or to 127.255.255.255 on that port, not to one bound to
127.0.0.1; so the responders bind 0.0.0.0 with port 0 (the OS picks a free port) and the
tests broadcast to 127.255.255.255:<that port>. The answers go unicast to the request's
source, 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from issc.config import Address
from issc.discovery import (
    MAX_DATAGRAM,
    REQUEST,
    DiscoveryResponder,
    discover_relays,
    format_answer,
    is_request,
    parse_answer,
)

pytestmark = pytest.mark.timeout(30)

BROADCAST = "127.255.255.255"
ANY = Address("0.0.0.0", 0)
WAIT = 0.3  # seconds to collect answers; loopback answers arrive within milliseconds


class Collector(asyncio.DatagramProtocol):
    """A UDP endpoint that records what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))


@pytest.fixture
async def client() -> AsyncIterator[tuple[asyncio.DatagramTransport, Collector]]:
    """A plain UDP socket on 127.0.0.1 that sends requests and collects the answers."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        Collector, local_addr=("127.0.0.1", 0)
    )
    yield transport, protocol
    transport.close()


@pytest.fixture
async def start_responder() -> AsyncIterator[Callable[..., Any]]:
    started: list[DiscoveryResponder] = []

    async def start(
        relay_port: int = 7412,
        node_id: str = "n-0123abcd",
        enabled: Callable[[], bool] = lambda: True,
        bind: Address = ANY,
        **kwargs: Any,
    ) -> DiscoveryResponder:
        responder = DiscoveryResponder(bind, relay_port, node_id, enabled, **kwargs)
        await responder.start()
        started.append(responder)
        return responder

    yield start
    for responder in started:
        responder.close()


class FakeRelay(asyncio.DatagramProtocol):
    """Answers every datagram with the given answers, in order."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(DatagramTransport): Python 3.11's selector transport is not one.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        for answer in self.answers:
            self.transport.sendto(answer, addr)


async def fake_relay(answers: list[bytes]) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: FakeRelay(answers), local_addr=("127.0.0.1", 0)
    )
    return transport


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


# ---- the wire format --------------------------------------------------------------------


def test_request_is_exact() -> None:
    assert is_request(b"ISSC-DISCOVER 1")
    assert is_request(b"ISSC-DISCOVER 1\n")
    for data in [
        b"",
        b"ISSC-DISCOVER",
        b"ISSC-DISCOVER 2",
        b"ISSC-DISCOVER 1 ",
        b"ISSC-DISCOVER 1\n\n",
        b"ISSC-DISCOVER 1\r\n",
        b" ISSC-DISCOVER 1",
        b"issc-discover 1",
        b"ISSC-DISCOVER  1",
        b"ISSC-DISCOVER 1\x00",
    ]:
        assert not is_request(data), data


def test_answer_round_trip() -> None:
    assert format_answer(7412, "n-0123abcd") == b"ISSC-RELAY 1 7412 n-0123abcd"
    assert parse_answer(b"ISSC-RELAY 1 7412 n-0123abcd") == (7412, "n-0123abcd")
    assert parse_answer(b"ISSC-RELAY 1 1 A_z-9\n") == (1, "A_z-9")
    assert parse_answer(b"ISSC-RELAY 1 65535 " + b"x" * 64) == (65535, "x" * 64)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"ISSC-RELAY 1 0 n-1",
        b"ISSC-RELAY 1 65536 n-1",
        b"ISSC-RELAY 1 99999 n-1",
        b"ISSC-RELAY 1 07412 n-1",
        b"ISSC-RELAY 1 +7412 n-1",
        b"ISSC-RELAY 1 -1 n-1",
        b"ISSC-RELAY 1 7412",
        b"ISSC-RELAY 1 7412 ",
        b"ISSC-RELAY 1 7412 n-1 extra",
        b"ISSC-RELAY 1 7412 n.1",
        b"ISSC-RELAY 1 7412 n/1",
        b"ISSC-RELAY 1 7412 " + b"x" * 65,
        b"ISSC-RELAY 2 7412 n-1",
        b"ISSC-RELAY 1  7412 n-1",
        b"ISSC-RELAY 1 7412 n-1\n\n",
        b"ISSC-RELAY 1 7412 n-1\r\n",
        b"ISSC-RELAY 1 192.168.1.2:7412 n-1",
        b"ISSC-RELAY 1 \xd9\xa7 n-1",  # a non-ASCII digit
        b"ISSC-RELAY 1 7412 n-\xc3\xa9",
        b"issc-relay 1 7412 n-1",
        b"ISSC-DISCOVER 1",
    ],
)
def test_bad_answers_do_not_parse(data: bytes) -> None:
    assert parse_answer(data) is None


@pytest.mark.parametrize(
    ("port", "node_id"), [(0, "n-1"), (65536, "n-1"), (1, ""), (1, "a b"), (1, "x" * 65)]
)
def test_responder_refuses_an_answer_it_could_not_send(port: int, node_id: str) -> None:
    with pytest.raises(ValueError):
        DiscoveryResponder(ANY, port, node_id, lambda: True)


# ---- responder and discover_relays over loopback -----------------------------------------


async def test_broadcast_finds_the_relay(start_responder: Callable[..., Any]) -> None:
    responder = await start_responder(relay_port=7412)
    assert responder.port > 0
    found = await discover_relays(BROADCAST, responder.port, WAIT)
    assert found == [Address("127.0.0.1", 7412)]
    assert responder.answered == 1


async def test_unicast_request_is_answered_too(start_responder: Callable[..., Any]) -> None:
    responder = await start_responder(relay_port=9000)
    assert await discover_relays("127.0.0.1", responder.port, WAIT) == [Address("127.0.0.1", 9000)]


async def test_every_responder_sharing_the_port_answers_a_broadcast(
    start_responder: Callable[..., Any],
) -> None:
    # SO_REUSEADDR lets two relays on one machine share the discovery port; a broadcast
    # reaches both, and the answers differ by the TCP port in their payload.
    first = await start_responder(relay_port=7001)
    await start_responder(relay_port=7002, bind=Address("0.0.0.0", first.port))
    found = await discover_relays(BROADCAST, first.port, WAIT)
    assert sorted(found, key=lambda a: a.port) == [
        Address("127.0.0.1", 7001),
        Address("127.0.0.1", 7002),
    ]


async def test_disabled_responder_does_not_answer(start_responder: Callable[..., Any]) -> None:
    uplink_open = False
    responder = await start_responder(enabled=lambda: uplink_open)
    assert await discover_relays(BROADCAST, responder.port, WAIT) == []
    assert responder.answered == 0
    uplink_open = True  # enabled() is asked for each request
    assert await discover_relays(BROADCAST, responder.port, WAIT) == [Address("127.0.0.1", 7412)]


async def test_enabled_that_raises_means_no_answer(start_responder: Callable[..., Any]) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    responder = await start_responder(enabled=broken)
    assert await discover_relays(BROADCAST, responder.port, WAIT) == []


async def test_garbage_is_ignored_and_the_responder_keeps_answering(
    start_responder: Callable[..., Any],
    client: tuple[asyncio.DatagramTransport, Collector],
) -> None:
    responder = await start_responder(relay_port=7412, node_id="n-0123abcd")
    transport, collector = client
    target = ("127.0.0.1", responder.port)
    for data in [
        b"",
        b"\xff\xfe\x00",
        b"ISSC-DISCOVER 2",
        b"ISSC-DISCOVER 1 ",
        b"ISSC-DISCOVER 1\n\n",
        b"ISSC-RELAY 1 7412 n-1",
        REQUEST + b"\n" + b"x" * MAX_DATAGRAM,
        b"x" * 2000,
    ]:
        transport.sendto(data, target)
    await asyncio.sleep(WAIT)
    assert collector.received == []
    assert responder.answered == 0

    transport.sendto(REQUEST + b"\n", target)
    await asyncio.sleep(WAIT)
    assert collector.received == [(b"ISSC-RELAY 1 7412 n-0123abcd", ("127.0.0.1", responder.port))]
    assert await discover_relays(BROADCAST, responder.port, WAIT) == [Address("127.0.0.1", 7412)]


async def test_bad_answers_are_ignored_by_discover_relays() -> None:
    # A fake relay that answers each request with bad answers, a good one and a repeat.
    answers = [
        b"ISSC-RELAY 1 0 n-1",
        b"ISSC-RELAY 1 65536 n-1",
        b"ISSC-RELAY 1 7412 n-1 extra",
        b"ISSC-RELAY 1 7412",
        b"ISSC-RELAY 2 7412 n-1",
        b"ISSC-RELAY 1 7412 " + b"x" * MAX_DATAGRAM,
        b"hello",
        b"ISSC-RELAY 1 7413 n-good",
        b"ISSC-RELAY 1 7413 n-again",  # the same address again: returned once
        b"ISSC-RELAY 1 7414 n-other",
    ]

    transport = await fake_relay(answers)
    try:
        port = transport.get_extra_info("sockname")[1]
        found = await discover_relays("127.0.0.1", port, WAIT)
    finally:
        transport.close()
    assert found == [Address("127.0.0.1", 7413), Address("127.0.0.1", 7414)]


async def test_at_most_16_relays_are_returned() -> None:
    transport = await fake_relay([format_answer(port, f"n-{port}") for port in range(1, 31)])
    try:
        found = await discover_relays("127.0.0.1", transport.get_extra_info("sockname")[1], WAIT)
    finally:
        transport.close()
    assert found == [Address("127.0.0.1", port) for port in range(1, 17)]


async def test_nothing_listening_gives_an_empty_list_after_the_timeout() -> None:
    port = free_udp_port()
    for address in [BROADCAST, "127.0.0.1"]:
        started = time.monotonic()
        assert await discover_relays(address, port, WAIT) == []
        assert WAIT - 0.05 <= time.monotonic() - started < WAIT + 1.0


@pytest.mark.parametrize(("address", "port"), [("", 7412), ("127.0.0.1", 70000), ("a b", 1)])
async def test_bad_target_is_logged_not_raised(address: str, port: int) -> None:
    assert await discover_relays(address, port, 0.05) == []


async def test_rate_limit_drops_answers_beyond_its_bound(
    start_responder: Callable[..., Any],
    client: tuple[asyncio.DatagramTransport, Collector],
) -> None:
    responder = await start_responder()  # the default: 20 answers per second
    transport, collector = client
    for _ in range(30):
        transport.sendto(REQUEST, ("127.0.0.1", responder.port))
    await asyncio.sleep(WAIT)
    assert len(collector.received) == 20
    assert (responder.answered, responder.rate_limited) == (20, 10)
    # A broadcast within the same second is dropped too.
    assert await discover_relays(BROADCAST, responder.port, 0.1) == []
    assert responder.rate_limited == 11


async def test_rate_limit_recovers_after_a_second(
    start_responder: Callable[..., Any],
    client: tuple[asyncio.DatagramTransport, Collector],
) -> None:
    now = 1000.0
    responder = await start_responder(max_answers_per_second=3, clock=lambda: now)
    transport, collector = client
    for _ in range(5):
        transport.sendto(REQUEST, ("127.0.0.1", responder.port))
    await asyncio.sleep(WAIT)
    assert len(collector.received) == 3
    now = 1000.999  # the window is one second from the first answer
    assert await discover_relays(BROADCAST, responder.port, 0.1) == []
    now = 1001.0
    assert await discover_relays(BROADCAST, responder.port, 0.1) == [Address("127.0.0.1", 7412)]
    assert (responder.answered, responder.rate_limited) == (4, 3)


async def test_closed_responder_stops_answering(start_responder: Callable[..., Any]) -> None:
    responder = await start_responder()
    port = responder.port
    responder.close()
    responder.close()  # idempotent
    assert await discover_relays(BROADCAST, port, WAIT) == []
