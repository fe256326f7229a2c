"""Wires the hub together: store, scheduler, runtime, node server, inbox, outbox, control."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

from hub.blobs import ContentStore
from hub.clock import AnchoredClock
from hub.control import ControlServer, check_socket_path
from hub.inbox import Inbox
from hub.outbox import Outbox
from hub.runtime import HubRuntime
from hub.scheduler import (
    Scheduler,
    Settings,
)
from hub.session import NodeSession
from hub.store import Store
from hub.transport import ConnectionGate, StreamTransport
from issc.config import Address, HubConfig
from issc.protocol import Connection, Error, ErrorCode, Role
from issc.tls import HANDSHAKE_TIMEOUT, ensure_self_signed, server_context

log = logging.getLogger(__name__)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_tls(config: HubConfig) -> ssl.SSLContext | None:
    """The TLS context of the node listener (None without ``tls``), making a self-signed
    certificate first if asked to; logs the certificate's fingerprint for volunteers to
    pin. Raises ConfigError naming the key and the file."""
    if config.tls is None:
        return None
    cert, key = config.tls.cert, config.tls.key
    if config.tls.self_signed and ensure_self_signed(cert, key, config.listen.host):
        log.info("made a self-signed TLS certificate %s (key %s)", cert, key)
    context, digest = server_context(cert, key)
    log.info("TLS certificate %s, fingerprint %s", cert, digest)
    return context


class _RefusalLog:
    """Logs connections refused for a cap: the first at once, then at most one line a
    second with the count (a flood of connections must not flood the log)."""

    def __init__(self) -> None:
        self.last = -1.0
        self.unlogged = 0

    def note(self, address: str, why: str) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            self.unlogged += 1
            return
        more = f" (and {self.unlogged} more refused since)" if self.unlogged else ""
        log.warning("refused a connection from %s: %s%s", address, why, more)
        self.last, self.unlogged = now, 0


@contextlib.asynccontextmanager
async def serving(config: HubConfig, timeout: float = 10) -> AsyncIterator[Hub]:
    """A hub serving in this event loop until the block ends (for embedding it, and for
    tests that want a real hub in their own process). Yields once it listens.

    Raises TimeoutError if it does not listen within ``timeout`` seconds, or the error it
    stopped with.
    """
    hub = Hub(config)
    stop = asyncio.Event()
    running = asyncio.create_task(hub.run(stop))
    deadline = time.monotonic() + timeout
    while hub.address is None or hub.runtime is None:
        if running.done():
            running.result()  # the reason it stopped
            raise RuntimeError("the hub stopped before it listened")
        if time.monotonic() > deadline:
            stop.set()
            await asyncio.wait_for(running, timeout)
            raise TimeoutError(f"the hub did not listen within {timeout:g} s")
        await asyncio.sleep(0.01)
    try:
        yield hub
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout)


class Hub:
    """One hub process. ``run`` returns when ``stop`` is set or a core loop fails."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.address: Address | None = None
        self.runtime: HubRuntime | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop``; raises the error of a core loop that failed."""
        config = self.config
        tls = prepare_tls(config)  # refuse a bad cert or key before anything starts
        # Not writable by group or others: the control socket may live here.
        config.data_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        check_socket_path(config.control_socket_path)  # refuse before anything starts
        store = Store(config.database_url)
        await asyncio.to_thread(store.create_schema)
        snapshot = await asyncio.to_thread(store.load_snapshot)
        settings = Settings(config.max_attempts, config.offer_timeout, config.lease_window)
        # Leases restored here live one heartbeat window (offers: one offer_timeout) from
        # now; the clock then runs on monotonic time (hub/clock.py).
        clock = AnchoredClock()
        scheduler = Scheduler(settings, snapshot, now=clock())
        log.info(
            "restored %d waiting tasks, %d live leases, %d projects",
            scheduler.waiting_count(),
            len(scheduler.leases),
            len(scheduler.projects),
        )
        files = ContentStore(config.data_dir / "files")
        inbox = Inbox(config.data_dir / "inbox", store, files)
        outbox = Outbox(config.data_dir / "outbox", store, files)
        runtime = self.runtime = HubRuntime(
            config, store, scheduler, inbox, outbox, files, clock=clock
        )

        limits = config.limits
        gate = ConnectionGate(limits.max_connections, limits.max_connections_per_address)
        refusals = _RefusalLog()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            transport = StreamTransport(reader, writer)
            refusal = gate.admit(transport.host)
            if refusal is not None:
                # One `limit` error, then the end; nothing of the connection is read.
                refusals.note(transport.address, refusal)
                error = Error(code=ErrorCode.LIMIT, message=refusal)
                transport.send_and_close(Connection(Role.HUB).send(error))
                return
            try:
                await NodeSession(runtime, transport, limits=limits).serve()
            finally:
                gate.release(transport.host)

        if tls is None:
            server = await asyncio.start_server(on_connect, config.listen.host, config.listen.port)
        else:
            server = await asyncio.start_server(
                on_connect,
                config.listen.host,
                config.listen.port,
                ssl=tls,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        host, port = server.sockets[0].getsockname()[:2]
        self.address = Address(host, port)
        control = ControlServer(runtime, config.control_socket_path, str(self.address))
        await control.start()
        addr_file = config.data_dir / "hub.addr"
        write_atomically(addr_file, f"{self.address}\n")
        log.info(
            "hub listening on %s%s; data in %s",
            self.address,
            " (TLS 1.3)" if tls is not None else "",
            config.data_dir,
        )
        loops = [
            asyncio.create_task(runtime.pump(), name="pump"),
            asyncio.create_task(runtime.export_loop(), name="outbox"),
            asyncio.create_task(runtime.inbox_loop(), name="inbox"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([*loops, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            log.info("hub stopping")
            server.close()
            for session in list(runtime.sessions.values()):
                session.close()
            for task in [*loops, stopper]:
                task.cancel()
            await asyncio.gather(*loops, stopper, return_exceptions=True)
            await control.stop()
            addr_file.unlink(missing_ok=True)
            runtime.astore.shutdown()
