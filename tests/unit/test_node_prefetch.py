"""Prefetch: while tasks are short the node holds accepted leases queued beyond its slots
(node/client.py, ``_capacity``), so a slot that frees starts the next task at once
instead of idling for an offer round trip.

The hub is scripted by the test on a real socket; the executor is a fake whose runs end
when the test says, so that what runs when (and what never runs) is seen exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from scripted_hub import HubSide, listen, node_config, signed_bundle

from issc.config import load_node_config
from issc.protocol import (
    Accept,
    BundleChunk,
    Cancel,
    Decline,
    FetchBundle,
    Message,
    Offer,
    Ready,
    Result,
    ResultAck,
    TaskOffer,
)
from node.client import (
    MAX_QUEUED_PER_SLOT,
    PREFETCH_BELOW_SECONDS,
    QUEUED_WORK_SECONDS,
    NodeClient,
    queued_per_slot,
)
from node.executor import RunOutcome, RunRequest
from node.runs import CANCELLED, failure

pytestmark = pytest.mark.timeout(30)

M = TypeVar("M", bound=Message)
SHORT = 0.01  # wall seconds the fake reports for a short task
LONG = 5 * PREFETCH_BELOW_SECONDS


class GatedExecutor:
    """A fake executor: each run waits until the test opens its gate."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.wall = SHORT
        self._gates: dict[int, asyncio.Event] = {}

    def gate(self, lease: int) -> asyncio.Event:
        return self._gates.setdefault(lease, asyncio.Event())

    async def run(self, request: RunRequest) -> RunOutcome:
        self.started.append(request.lease)
        await self.gate(request.lease).wait()
        if request.lease in self.cancelled:
            return failure(CANCELLED)
        return RunOutcome(True, request.lease, None, 0.0, self.wall)

    async def cancel(self, lease: int) -> bool:
        self.cancelled.append(lease)
        self.gate(lease).set()
        return True

    async def close(self) -> None:
        for gate in self._gates.values():
            gate.set()


@dataclass
class Setup:
    hub: HubSide
    client: NodeClient
    executor: GatedExecutor
    bundle: bytes
    digest: str
    stop: asyncio.Event

    def offer(self, lease: int) -> TaskOffer:
        return TaskOffer(
            lease=lease,
            project="sums",
            task=f"t-{lease}",
            version=1,
            digest=self.digest,
            size=len(self.bundle),
            input=lease,
            files=[],
        )


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    bundle = signed_bundle(tmp_path, "sums", "persistent", "print('never run: a fake runs')\n")
    listening = await listen()
    client = NodeClient(load_node_config(node_config(tmp_path, listening.port, "sums", bundle)))
    executor = GatedExecutor()
    client.executors["persistent"] = executor
    stop = asyncio.Event()
    running = asyncio.create_task(client.run(stop))
    hub = await asyncio.wait_for(listening.connections.get(), 10)
    await hub.handshake(resumed=[])
    try:
        yield Setup(hub, client, executor, bundle.content, bundle.digest, stop)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 15)
        listening.server.close()


async def until(condition: object, what: str) -> None:
    """Wait (up to 5 s) until ``condition()`` holds."""
    assert callable(condition)
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def finish(setup: Setup, lease: int) -> None:
    """Let the run of ``lease`` end; its result is acknowledged."""
    setup.executor.gate(lease).set()
    result = await setup.hub.expect(Result)
    assert (result.lease, result.ok) == (lease, True)
    setup.hub.send(ResultAck(lease=lease, accepted=True, reason=None))


async def first_task(setup: Setup, wall: float) -> int:
    """Run lease 1 to its end, reporting ``wall`` seconds; the ready.free that follows."""
    hub = setup.hub
    assert (await hub.expect(Ready)).free == 1  # nothing has run yet: no telling, no prefetch
    hub.send(Offer(tasks=[setup.offer(1)]))
    ask = await hub.expect(FetchBundle)
    hub.send(BundleChunk(digest=ask.digest, offset=0, total=len(setup.bundle), data=setup.bundle))
    assert (await hub.expect(Accept)).leases == [1]
    setup.executor.wall = wall
    await finish(setup, 1)
    return (await hub.expect(Ready)).free


async def two_accepted(setup: Setup) -> None:
    """After a short task: two leases offered to the one slot, both accepted, the
    second queued."""
    assert await first_task(setup, SHORT) == 1 + queued_per_slot(SHORT)  # one slot + queue
    setup.hub.send(Offer(tasks=[setup.offer(2), setup.offer(3)]))
    assert (await setup.hub.expect(Accept)).leases == [2, 3]
    await until(lambda: setup.executor.started == [1, 2], "lease 2 started")
    await asyncio.sleep(0.1)
    assert setup.executor.started == [1, 2]  # 3 waits for the slot
    assert sorted(setup.client.running) == [2, 3]


async def test_a_queued_lease_runs_when_the_slot_frees_in_order(setup: Setup) -> None:
    await two_accepted(setup)
    heartbeat_leases = sorted(setup.client.running)  # what a heartbeat would list
    assert heartbeat_leases == [2, 3]  # the queued lease is held like a running one
    await finish(setup, 2)
    await until(lambda: setup.executor.started == [1, 2, 3], "lease 3 started")
    await finish(setup, 3)
    await until(lambda: not setup.client.running, "all leases ended")


async def test_a_cancel_removes_a_queued_lease_without_running_it(setup: Setup) -> None:
    await two_accepted(setup)
    setup.hub.send(Cancel(leases=[3], reason="task completed elsewhere"))
    await until(lambda: 3 not in setup.client.running, "lease 3 dropped")
    assert 2 in setup.client.running  # the running one is untouched
    await finish(setup, 2)
    await until(lambda: not setup.client.running, "all leases ended")
    await asyncio.sleep(0.1)
    assert setup.executor.started == [1, 2]  # 3 never ran
    assert 3 not in setup.client.spool.leases()


async def test_a_clean_stop_declines_queued_leases(setup: Setup) -> None:
    await two_accepted(setup)
    setup.stop.set()
    declined = await setup.hub.expect(Decline)
    assert declined.leases == [2, 3]
    assert declined.reason == "node stopping"
    assert setup.executor.started == [1, 2]  # the queued lease never ran


@pytest.mark.parametrize(
    ("median_wall", "queued"),
    [
        (None, 0),  # nothing ran yet: no telling
        (PREFETCH_BELOW_SECONDS, 0),
        (5.0, 0),
        (0.99, 1),  # a task just under a second: one queued
        (QUEUED_WORK_SECONDS, 1),
        (QUEUED_WORK_SECONDS / 4, 4),  # about QUEUED_WORK_SECONDS of work queued
        (QUEUED_WORK_SECONDS / MAX_QUEUED_PER_SLOT, MAX_QUEUED_PER_SLOT),
        (0.0001, MAX_QUEUED_PER_SLOT),  # bounded however short
        (0.0, MAX_QUEUED_PER_SLOT),
    ],
)
def test_the_queue_holds_about_a_tenth_of_a_second_of_work_per_slot(
    median_wall: float | None, queued: int
) -> None:
    assert queued_per_slot(median_wall) == queued


async def test_no_prefetch_after_long_tasks(setup: Setup) -> None:
    assert await first_task(setup, LONG) == 1  # slots only: nothing held beyond them
    setup.hub.send(Offer(tasks=[setup.offer(2), setup.offer(3)]))
    declined = await setup.hub.expect(Decline)  # sent before the bundle check and accept
    assert declined.leases == [3]
    assert (await setup.hub.expect(Accept)).leases == [2]
