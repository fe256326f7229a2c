"""Chunked downloads from the hub over the node's connection: what bundles and input files share.

A download asks for bytes from the length it already holds (``fetch_bundle`` or
``fetch_file`` with ``offset``), appends each answer to a ``.part`` file and asks for the
next offset, one chunk in flight at a time, until ``total`` bytes are there. What the
bytes are and what becomes of a complete file is the caller's business (``node.cache``,
``node.files``, ``node.fetch``). This module holds:

* ``append_part``: add one chunk to a ``.part`` file, refusing what does not fit.
* ``Transfer``: one download over one connection, with the stall rule: no chunk for
  ``stall_seconds`` means the request or its answer was lost, so the same offset is asked
  for again; after ``max_stalls`` such repeats without a byte the download fails.
* ``Fetcher``: the downloads of one kind over whichever connection is current. Answers
  are routed to their download by key; a download is shared by everyone waiting for that
  key, and cancelled when the last of them stops waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from issc.errors import FileTransferError, IsscError
from issc.protocol import Message

log = logging.getLogger(__name__)

STALL_SECONDS = 30.0
MAX_STALLS = 3

Send = Callable[[Message], None]
Append = Callable[[int, int, bytes], bool]  # (offset, total, data) -> complete?


def append_part(part: Path, offset: int, total: int, data: bytes, limit: int) -> bool:
    """Append ``data`` at ``offset`` to ``part`` (created if missing); True once it holds
    all ``total`` bytes.

    Raises:
        ValueError: ``total`` is over ``limit``, the chunk does not start where the part
            ends, it runs past ``total``, or it is empty before the end (an empty chunk
            that is not the last would have the download ask for the same offset forever).
            The part is left as it was.
    """
    if total > limit:
        raise ValueError(f"{total} bytes exceed the limit of {limit} bytes")
    size = part.stat().st_size if part.exists() else 0
    if offset != size:
        raise ValueError(f"chunk at offset {offset} does not follow the {size} bytes held")
    if size + len(data) > total:
        raise ValueError(f"chunk of {len(data)} bytes at offset {offset} runs past {total} bytes")
    if not data and offset != total:
        raise ValueError(f"empty chunk at offset {offset} of {total} bytes")
    with open(part, "ab") as f:
        f.write(data)
    return size + len(data) == total


class Transfer:
    """One download over one connection; ``run`` drives it, ``feed`` hands it answers."""

    def __init__(
        self,
        key: str,
        ask: Callable[[int], None],
        append: Append,
        offset: int,
        *,
        stall_seconds: float = STALL_SECONDS,
        max_stalls: int = MAX_STALLS,
    ) -> None:
        self.key = key
        self._ask = ask
        self._append = append
        self._offset = offset  # asked for, not yet answered
        self._stall_seconds = stall_seconds
        self._max_stalls = max_stalls
        self._outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Ask from the starting offset and keep asking until the download is complete.

        Raises:
            ConnectionError: ``interrupt`` was called (the connection was lost).
            IsscError or OSError: ``append`` refused or could not store a chunk (whatever
                it raised), or FileTransferError: ``max_stalls`` asks went unanswered.
        """
        self._ask(self._offset)
        stalls = 0
        while not self._outcome.done():
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._stall_seconds)
                stalls = 0
            except TimeoutError:
                stalls += 1
                if stalls > self._max_stalls:
                    waited = self._stall_seconds * stalls
                    raise FileTransferError(
                        f"no data from the hub for {waited:g} s (at byte {self._offset})"
                    ) from None
                log.info(
                    "no chunk of %s for %g s; asking again from byte %d",
                    self.key[:12],
                    self._stall_seconds,
                    self._offset,
                )
                self._ask(self._offset)
        self._outcome.result()  # raises the failure, if it failed

    def feed(self, offset: int, total: int, data: bytes) -> None:
        """Take one answer. An answer to an earlier ask (repeated after a stall, so
        answered twice) does not start at the offset wanted now and is ignored."""
        if self._outcome.done() or offset != self._offset:
            return
        try:
            complete = self._append(offset, total, data)
        except (IsscError, OSError) as exc:  # OSError: the node's disk is full, say
            self._finish(exc)
            return
        self._offset = offset + len(data)
        if complete:
            self._finish(None)
            return
        self._ask(self._offset)
        self._wake.set()

    def interrupt(self, exc: BaseException) -> None:
        """End the download with ``exc`` (raised by ``run``)."""
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if not self._outcome.done():
            if exc is None:
                self._outcome.set_result(None)
            else:
                self._outcome.set_exception(exc)
        self._wake.set()


@dataclass(slots=True)
class _Flight:
    """A download in progress and how many are waiting for it."""

    task: asyncio.Task[Path]
    waiters: int = 0


class Fetcher:
    """Downloads of one kind (bundles or input files) over the current connection.

    The node client calls ``attach`` once a connection is open (after ``welcome``),
    ``detach`` when it is lost, and ``feed`` with every chunk that arrives.
    """

    def __init__(
        self, *, stall_seconds: float = STALL_SECONDS, max_stalls: int = MAX_STALLS
    ) -> None:
        self.stall_seconds = stall_seconds
        self.max_stalls = max_stalls
        self._send: Send | None = None
        self._linked = asyncio.Event()
        self._transfers: dict[str, Transfer] = {}
        self._flights: dict[str, _Flight] = {}

    def attach(self, send: Send) -> None:
        """Downloads go over ``send`` from now on; waiting ones start."""
        self._send = send
        self._linked.set()

    def detach(self) -> None:
        """The connection is gone: every transfer on it ends with ConnectionError."""
        self._send = None
        self._linked.clear()
        for transfer in list(self._transfers.values()):
            transfer.interrupt(ConnectionError("connection to the hub lost during a download"))

    def feed(self, key: str, offset: int, total: int, data: bytes) -> None:
        """Route a chunk to its transfer; a chunk nobody asked for is ignored."""
        transfer = self._transfers.get(key)
        if transfer is not None:
            transfer.feed(offset, total, data)

    async def close(self) -> None:
        """Cancel every download and wait for them to end."""
        tasks = [flight.task for flight in self._flights.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def connected(self) -> None:
        """Return once a connection is attached."""
        await self._linked.wait()

    async def shared(self, key: str, download: Callable[[], Awaitable[Path]]) -> Path:
        """The result of the download of ``key``, started with ``download`` unless one runs.

        Raises whatever the download raises. A waiter that is cancelled stops waiting;
        the download itself is cancelled only when nobody waits for it any more (so an
        abandoned download never asks the hub for a file no task needs).
        """
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(asyncio.ensure_future(download()))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda task: self._landed(key, task))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()

    def _landed(self, key: str, task: asyncio.Task[Path]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have left already

    async def transfer(
        self, key: str, offset: int, request: Callable[[int], Message], append: Append
    ) -> None:
        """Download ``key`` from ``offset`` over the current connection, asking with
        ``request(offset)`` and storing answers with ``append``.

        Raises:
            ConnectionError: no connection is attached, or it is lost meanwhile.
            IsscError or OSError: what ``append`` raised, or FileTransferError for a
                stalled hub.
        """
        send = self._send
        if send is None:
            raise ConnectionError("not connected to a hub")

        def ask(at: int) -> None:
            send(request(at))

        transfer = Transfer(
            key,
            ask,
            append,
            offset,
            stall_seconds=self.stall_seconds,
            max_stalls=self.max_stalls,
        )
        self._transfers[key] = transfer
        try:
            await transfer.run()
        finally:
            if self._transfers.get(key) is transfer:
                del self._transfers[key]
