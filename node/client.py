"""The node: one persistent connection to a hub, tasks run in the executor, results spooled.

``NodeClient.run`` connects (hubs tried in order, exponential backoff with full jitter
between rounds), says hello with the leases it still holds, proves who it is by signing
the hub's challenge with its own key (``node.identity``), and then serves the
connection: offers are checked (project chosen, key pinned, version not older than one
already run, bundle verified) before they are accepted; results are spooled on disk
before they are sent and dropped only when the hub acknowledges them. Tasks keep
running while the connection is down; their results wait in the spool. While tasks are
short the node holds a few accepted leases queued beyond its slots (``_capacity``), so
that a slot that frees does not idle for an offer round trip.

What moves in chunks lives in its own modules, wired here: bundles and input files are
fetched by ``node.fetch`` (into ``node.cache`` and ``node.files``), output files are
uploaded before their result by ``node.upload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import statistics
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from issc import __version__
from issc.config import Address, NodeConfig
from issc.discovery import discover_relays
from issc.errors import (
    BundleError,
    ExecutionError,
    FileTransferError,
    IsscError,
    LocalProtocolError,
    RemoteProtocolError,
)
from issc.manifest import Manifest
from issc.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Accept,
    BundleChunk,
    BundleRefused,
    Cancel,
    Challenge,
    Connection,
    Decline,
    Error,
    ErrorCode,
    FileChunk,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    Offer,
    PeerClosed,
    Proof,
    Ready,
    Relayed,
    ResultAck,
    Role,
    State,
    TaskOffer,
    UploadAck,
    Welcome,
    check_field_value,
)
from issc.tls import HANDSHAKE_TIMEOUT, PinMismatchError, client_context, open_connection
from node.cache import BundleCache
from node.executor import Executor, RunOutcome, RunRequest, make_executor
from node.fetch import BundleFetcher, InputFetcher
from node.files import FileCache
from node.identity import NodeIdentity
from node.relay import RelayServer, Uplink
from node.runs import failure
from node.sandbox import kill_recorded_namespaces, remove_tree, sandbox_for
from node.spool import ResultSpool
from node.transfer import Send
from node.upload import Uploader, given_record, seal_record

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
READ_SIZE = 256 * 1024
MAX_ERROR = 16 * 1024  # characters of an error message sent to the hub
STOP_GRACE = 5.0  # seconds to deliver spooled results and say goodbye on a clean stop
AVOID_SECONDS = 600.0  # an address whose relay altered traffic is skipped this long
LIMIT_AVOID_SECONDS = 30.0  # an address that refused us for a limit is skipped this long
PROBE_TIMEOUT = 2.0
# Prefetch (see "_capacity"): while the recent median task is shorter than this, a slot
# that frees would idle for an offer round trip (ready -> hub commit -> offer -> accept ->
# hub commit), a sizeable share of a task this short; the node then holds accepted leases
# queued beyond its slots: about QUEUED_WORK_SECONDS of work per slot, at least one lease
# and at most MAX_QUEUED_PER_SLOT. Longer tasks gain little from a queue, and a slow node
# must not hoard them while faster nodes wait: it never holds more than a tenth of a
# second of queued work per slot, or one task shorter than a second.
PREFETCH_BELOW_SECONDS = 1.0
QUEUED_WORK_SECONDS = 0.1
MAX_QUEUED_PER_SLOT = 8  # the hub accepts up to 9 leases per slot in hello.leases
WALL_HISTORY = 16  # recent tasks whose median wall time decides the queue
_M = TypeVar("_M", bound=Message)


class FatalNodeError(IsscError):
    """The hub refused this node for a reason retrying cannot fix (auth, version)."""


@dataclass(slots=True)
class Running:
    """An accepted lease, from its accept to its end: running, or queued for a slot."""

    offer: TaskOffer
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    fetching: bool = False  # waiting for input files: a cancel ends the wait
    queued: bool = False  # waiting for a free slot (prefetched): a cancel ends the wait


@dataclass(slots=True)
class _Link:
    """One live connection to the hub."""

    conn: Connection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: Address
    last_heard: float = 0.0
    rank: int = 0  # place of ``address`` among the addresses tried; 0 = the preferred one
    fallbacks: bool = False  # whether addresses after this one were there to try
    moving_to: Address | None = None  # closed on purpose to move to a preferred address
    welcomed: bool = False  # the hub accepted this connection
    result_key: bytes = b""  # from the handshake: authenticates results (issc.nodeauth)


class NodeClient:
    def __init__(self, config: NodeConfig) -> None:
        """Open (or make) the node's data_dir and its key.

        Raises:
            KeyFormatError: data_dir/node.key exists but is not a usable key.
        """
        self.config = config
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.identity = NodeIdentity.load_or_create(data)
        log.info(
            "node %s of volunteer %s, key %s",
            self.identity.node_id,
            config.volunteer,
            self.identity.public_key,
        )
        self.spool = ResultSpool(data / "spool")
        self.spool.sweep()
        self.cache = BundleCache(data / "bundles", dict(config.trusted_keys))
        self.bundles = BundleFetcher(self.cache)
        files = FileCache(data / "files", config.file_cache_bytes, config.file_cache_seconds)
        files.evict()
        self.inputs = InputFetcher(files)
        self.relay: RelayServer | None = None
        if config.relay is not None:
            self.relay = RelayServer(
                config.relay,
                self.identity.node_id,
                data,
                self.inputs,
                config.file_cache_bytes,
                config.file_cache_seconds,
            )
            # The relay's own tasks take their bundles from its relay cache: one download.
            self.bundles = BundleFetcher(self.cache, source=self.relay.bundles.fetch_blob)
        self.uploads = Uploader(node_id=self.identity.node_id)
        self.scratch = data / "scratch"
        # Sandboxes of runs the node was killed in the middle of may still run (a root
        # node's bubblewrap namespaces: node/sandbox.py, record_namespace): end them first.
        kill_recorded_namespaces(self.scratch)
        # Leftovers of runs killed with the node: nothing in them will be used again.
        # remove_tree, not rmtree: in/ is read-only (0555) and a task may have chmodded more.
        remove_tree(self.scratch)
        self.executors: dict[str, Executor] = {}
        # Accepted leases, in the order accepted: running, fetching inputs, or queued.
        self.running: dict[int, Running] = {}
        self.reserved = 0  # offers chosen to run, waiting for their bundle
        # A task runs only holding a slot; the waiters (prefetched leases) are served
        # in the order they came (asyncio.Semaphore is first come, first served).
        self.slot_gate = asyncio.Semaphore(config.slots)
        self.recent_walls: deque[float] = deque(maxlen=WALL_HISTORY)
        self.median_wall: float | None = None  # of recent_walls; None until a task ran
        self.link: _Link | None = None
        self.stopping = False
        self.heartbeat_interval = 5.0
        self.heartbeat_misses = 3
        self._avoid: dict[Address, float] = {}  # address -> loop time until which it is skipped
        self._last_address: Address | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # TLS (config ``tls``) applies to every address the node connects to.
        self._tls = client_context(config.tls.ca) if config.tls is not None else None
        self._pin = config.tls.fingerprint if config.tls is not None else None

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background, keeping a reference until it is done."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- top level ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve hubs until ``stop`` is set; raises FatalNodeError if refused for good."""
        if self.relay is not None:
            await self.relay.start()
        serving = asyncio.create_task(self._connect_forever())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([serving, stopper], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()  # re-raise a fatal refusal
        finally:
            await self._shutdown(serving)
            stopper.cancel()

    async def _connect_forever(self) -> None:
        failures = 0
        while True:
            link = await self._connect_any()
            if link is None:
                failures += 1
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**failures))
                log.info("no hub reachable; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                continue
            try:
                await self._serve(link)  # ends only by raising
            except FatalNodeError:
                raise
            except (IsscError, ConnectionError, OSError, TimeoutError) as exc:
                if link.moving_to is None:
                    log.warning("connection to %s lost: %s", link.address, exc)
                    # A connection that got as far as welcome was a success: back-off
                    # starts over, so a hub that restarts is rejoined within a second.
                    failures = 1 if link.welcomed else failures + 1
            finally:
                self._drop_link(link)
            if link.moving_to is None:
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**failures))
                await asyncio.sleep(delay)

    async def _candidates(self) -> list[Address]:
        """Addresses to try, best first: relays found by discovery, then ``hub:`` in
        order; addresses whose relay altered traffic are skipped while others remain."""
        found: list[Address] = []
        discover = self.config.discover
        if discover is not None:
            found = await discover_relays(
                discover.address, discover.port, discover.timeout, exclude=self.identity.node_id
            )
        ordered = list(dict.fromkeys([*found, *self.config.hubs]))
        now = asyncio.get_running_loop().time()
        usable = [a for a in ordered if self._avoid.get(a, 0.0) <= now]
        return usable or ordered

    async def _connect_any(self) -> _Link | None:
        candidates = await self._candidates()
        for rank, address in enumerate(candidates):
            try:
                reader, writer = await asyncio.wait_for(
                    open_connection(address.host, address.port, self._tls, self._pin),
                    CONNECT_TIMEOUT,
                )
            except PinMismatchError as exc:
                log.warning("refusing %s: %s", address, exc)
                continue
            except ssl.SSLError as exc:  # a certificate that does not verify, say
                log.warning("TLS with %s failed: %s", address, exc)
                continue
            except (OSError, TimeoutError) as exc:
                log.debug("cannot reach %s: %s", address, exc)
                continue
            loop = asyncio.get_running_loop()
            fallbacks = rank < len(candidates) - 1
            return _Link(
                Connection(Role.NODE), reader, writer, address, loop.time(), rank, fallbacks
            )
        return None

    async def _prefer_earlier(self, link: _Link) -> None:
        """While connected to a fallback address, look for a preferred one coming back
        (a relay that restarted, say) and move there; running tasks keep running and
        their leases are resumed over the new connection."""
        while True:
            await asyncio.sleep(max(1.0, 3 * self.heartbeat_interval))
            candidates = await self._candidates()
            if link.address in candidates:
                candidates = candidates[: candidates.index(link.address)]
            for address in candidates:
                if await _reachable(address, self._tls, self._pin):
                    log.info("%s is reachable again; moving there from %s", address, link.address)
                    link.moving_to = address
                    with contextlib.suppress(Exception):
                        self._send(link, Goodbye(reason=f"moving to {address}"))
                    link.writer.close()
                    return

    def _avoid_address(self, link: _Link, why: str) -> None:
        """Skip ``link``'s address for AVOID_SECONDS while others remain: what passed
        through it was altered or withheld (a relay that tampers)."""
        log.warning(
            "traffic through %s was altered (%s); avoiding it for %g s",
            link.address,
            why,
            AVOID_SECONDS,
        )
        self._avoid[link.address] = asyncio.get_running_loop().time() + AVOID_SECONDS

    def _drop_link(self, link: _Link) -> None:
        if self.link is link:
            self.link = None
            self.bundles.detach()
            self.inputs.detach()
            self.uploads.detach()
            if self.relay is not None:
                self.relay.uplink_down()
        with contextlib.suppress(Exception):
            link.writer.close()

    # ---- one connection -----------------------------------------------------------------

    async def _serve(self, link: _Link) -> None:
        welcome = await self._handshake(link)
        self._welcomed(link, welcome)
        helpers = [asyncio.create_task(self._heartbeats(link))]
        if link.rank > 0 or self.config.discover is not None:
            helpers.append(asyncio.create_task(self._prefer_earlier(link)))
        try:
            while True:
                message = await self._next_message(link)
                if message is None:
                    raise ConnectionError("the hub closed the connection")
                link.last_heard = asyncio.get_running_loop().time()
                await self._dispatch(link, message)
        finally:
            for helper in helpers:
                helper.cancel()

    async def _handshake(self, link: _Link) -> Welcome:
        """hello, challenge, proof, welcome.

        Raises:
            FatalNodeError: the hub refused this node for good (auth, version).
            RemoteProtocolError: the hub broke off or sent something unusable.
            TimeoutError: the hub did not answer in time.
        """
        held = sorted(set(self.running) | set(self.spool.leases()))
        volunteer, token = self.config.volunteer, self.config.token
        self._send(
            link,
            Hello(
                protocol=PROTOCOL_VERSION,
                software=f"issc-node/{__version__}",
                volunteer=volunteer,
                token=token,
                public_key=self.identity.public_key,
                projects=list(self.config.projects),
                slots=self.config.slots,
                leases=held,
            ),
        )
        challenge = await self._handshake_reply(link, Challenge)
        try:
            answer = self.identity.answer(challenge.nonce, challenge.kex, volunteer, token)
        except ValueError as exc:
            self._send(link, Error(code=ErrorCode.PROTOCOL, message=f"challenge: {exc}"))
            raise RemoteProtocolError(f"the hub sent an unusable challenge: {exc}") from None
        link.result_key = answer.result_key
        self._send(link, Proof(signature=answer.signature, kex=answer.kex))
        welcome = await self._handshake_reply(link, Welcome)
        if welcome.node_id != self.identity.node_id:
            raise RemoteProtocolError(
                f"the hub calls this node {welcome.node_id!r}, but its key makes it "
                f"{self.identity.node_id}"
            )
        return welcome

    async def _handshake_reply(self, link: _Link, kind: type[_M]) -> _M:
        message = await asyncio.wait_for(self._next_message(link), CONNECT_TIMEOUT)
        if isinstance(message, Error):
            if message.code == ErrorCode.LIMIT:  # a full relay, say: try the others first
                self._avoid[link.address] = asyncio.get_running_loop().time() + LIMIT_AVOID_SECONDS
            self._refused(message)
        if not isinstance(message, kind):
            hint = ""
            if message is None and kind is Challenge and self._tls is None:
                hint = " (is it a TLS hub? this node has no tls: in its config)"
            raise RemoteProtocolError(f"the hub closed the connection during the handshake{hint}")
        return message

    def _welcomed(self, link: _Link, welcome: Welcome) -> None:
        link.welcomed = True
        self.heartbeat_interval = welcome.heartbeat_interval
        self.heartbeat_misses = welcome.heartbeat_misses
        link.conn.set_max_frame_size(welcome.max_frame_size)
        log.info("connected to %s as node %s", link.address, welcome.node_id)
        if link.address != self._last_address:
            # A bundle refused as it came over another path (a relay that altered it)
            # may be fine from here.
            self.cache.refused.clear()
            self._last_address = link.address
        resumed = set(welcome.resumed)
        for lease, running in list(self.running.items()):
            if lease not in resumed:
                log.info("lease %d was not resumed by the hub; stopping it", lease)
                self._cancel_run(lease, running)
        self.link = link
        send = self._sender(link)
        self.bundles.attach(send)
        self.inputs.attach(send)  # downloads of resumed leases go on from their partial files
        self.uploads.attach(send, link.result_key)
        if self.relay is not None:
            self.relay.uplink_up(Uplink(send, link.writer.drain, welcome.max_frame_size))
        for lease in self.spool.leases():
            record = self.spool.load(lease)
            if record is not None:
                self.uploads.submit(record, self.spool.output_dir(lease))
        self._send_ready()

    def _refused(self, error: Error) -> NoReturn:
        if error.code == ErrorCode.AUTH:
            raise FatalNodeError(
                f"the hub refused node {self.identity.node_id} of volunteer "
                f"{self.config.volunteer!r} (auth): {error.message}"
            )
        if error.code == ErrorCode.VERSION:
            raise FatalNodeError(f"the hub refused this node ({error.code}): {error.message}")
        raise RemoteProtocolError(f"the hub refused the connection ({error.code}): {error.message}")

    async def _next_message(self, link: _Link) -> Message | None:
        while True:
            event = link.conn.next_event()
            if event is CLOSED:
                return None
            if event is not NEED_DATA:
                assert isinstance(event, Message)
                return event
            link.conn.receive_data(await link.reader.read(READ_SIZE))

    async def _heartbeats(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if loop.time() - link.last_heard > self.heartbeat_interval * self.heartbeat_misses:
                log.warning(
                    "no word from the hub for %.0f s; reconnecting", loop.time() - link.last_heard
                )
                link.writer.close()
                return
            self._send(link, Heartbeat(running=sorted(self.running)))

    def _send(self, link: _Link, message: Message) -> None:
        link.writer.write(link.conn.send(message))

    def _sender(self, link: _Link) -> Send:
        """Sending for the transfer modules: messages for a link that is no longer the
        current one, or is closing, are dropped (they are redone on the next link)."""

        def send(message: Message) -> None:
            if self.link is link and link.conn.state is State.OPEN:
                self._send(link, message)

        return send

    def _send_ready(self) -> None:
        if self.link is None or self.stopping:
            return
        # Offers in flight are not subtracted: the hub knows them and does that itself.
        self._send(self.link, Ready(free=max(0, self._free())))

    def _free(self) -> int:
        """How many more leases the node takes now (may be negative after tasks turned
        long: the queue then drains and no more are asked for)."""
        return self._capacity() - len(self.running) - self.reserved

    def _capacity(self) -> int:
        """Leases the node holds at once: its slots, plus a queue per slot while tasks are
        short (``queued_per_slot``), so that a slot that frees starts the next task at
        once instead of idling for an offer round trip."""
        return self.config.slots * (1 + queued_per_slot(self.median_wall))

    # ---- messages from the hub ------------------------------------------------------------

    async def _dispatch(self, link: _Link, message: Message) -> None:
        match message:
            case Offer():
                self._spawn(self._take_offers(link, message.tasks))
            case Cancel():
                for lease in message.leases:
                    if (running := self.running.get(lease)) is not None:
                        log.info("hub cancelled lease %d: %s", lease, message.reason)
                        self._cancel_run(lease, running)
                    self.uploads.forget(lease)  # a spooled result is dropped too
                    self.spool.remove(lease)
            case BundleChunk():
                self.bundles.feed(message.digest, message.offset, message.total, message.data)
                if self.relay is not None:
                    self.relay.on_bundle_chunk(message)
            case FileChunk():
                self.inputs.on_chunk(message)
            case UploadAck():
                self.uploads.on_ack(message)
            case ResultAck():
                self.uploads.forget(message.lease)
                self.spool.remove(message.lease)
                if not message.accepted:
                    log.info(
                        "hub did not record result of lease %d: %s", message.lease, message.reason
                    )
            case HeartbeatAck():
                pass
            case Relayed() | PeerClosed():
                if self.relay is None:
                    raise RemoteProtocolError(
                        f"the hub sent {message.TAG!r} to a node not relaying"
                    )
                self.relay.on_uplink_message(message)
            case Error():
                if message.code == ErrorCode.RELAY:
                    self._avoid_address(link, f"the hub says: {message.message[:500]}")
                self._refused(message)

    async def _take_offers(self, link: _Link, offers: list[TaskOffer]) -> None:
        """Check each offer, fetch and verify bundles, then accept what can run."""
        by_digest: dict[str, list[TaskOffer]] = {}
        declined: list[int] = []
        free = self._free()
        for offer in offers:
            reason = self._offer_problem(offer)
            if reason is None and free <= 0:
                reason = "no free slot"
            if reason is not None:
                log.info("declining lease %d (%s): %s", offer.lease, offer.task, reason)
                declined.append(offer.lease)
                continue
            free -= 1
            self.reserved += 1
            by_digest.setdefault(offer.digest, []).append(offer)
        if declined:
            self._send(link, Decline(leases=declined, reason="not runnable on this node"))
        for digest, group in by_digest.items():
            try:
                await self._accept_group(link, digest, group)
            finally:
                self.reserved -= len(group)

    def _offer_problem(self, offer: TaskOffer) -> str | None:
        if self.stopping:
            return "node is stopping"
        if offer.project not in self.config.projects:
            return f"project {offer.project!r} is not one this volunteer chose"
        if offer.version < self.cache.highest_version(offer.project):
            return f"version {offer.version} is older than one already run"
        return None

    async def _accept_group(self, link: _Link, digest: str, offers: list[TaskOffer]) -> None:
        project = offers[0].project
        leases = [o.lease for o in offers]
        try:
            bundle_dir = await self.bundles.fetch(digest, project, offers[0].size)
            manifest = self.cache.manifest(digest)
            if manifest.version != offers[0].version:
                raise BundleError(
                    f"bundle says version {manifest.version}, the offer {offers[0].version}"
                )
        except BundleError as exc:
            log.error("refusing bundle %s of %s: %s", digest[:12], project, exc)
            self._send(
                link, BundleRefused(project=project, digest=digest, reason=str(exc), leases=leases)
            )
            return
        except (ConnectionError, FileTransferError) as exc:
            # Not the bundle's fault: the offers expire at the hub; the partial file stays.
            log.warning("cannot fetch bundle %s of %s: %s", digest[:12], project, exc)
            return
        if self.link is not link:
            return  # the connection died meanwhile: the hub will not see an accept
        self.cache.record_version(project, manifest.version)
        self._send(link, Accept(leases=leases))
        for offer in offers:
            running = self.running[offer.lease] = Running(offer)
            running.task = asyncio.create_task(self._run_task(running, bundle_dir, manifest))

    # ---- running tasks ------------------------------------------------------------------

    def _executor(self, mode: str) -> Executor:
        if mode not in self.executors:
            self.executors[mode] = make_executor(
                mode, self.scratch, self.config.slots, sandbox_for(self.config.sandbox)
            )
        return self.executors[mode]

    async def _run_task(self, running: Running, bundle_dir: Path, manifest: Manifest) -> None:
        offer = running.offer
        try:
            with self.inputs.pinned(offer.files):  # never evicted while the task lives
                inputs, outcome = await self._inputs_of(running)
                if outcome is None and inputs:
                    # Checked when the offer was accepted; the wait for the input files
                    # since may have been long: checked again just before the run.
                    bundle_dir, outcome = await self._bundle_again(offer, bundle_dir)
                if outcome is None and (inputs or not offer.files):
                    outcome = await self._execute_in_slot(running, manifest, bundle_dir, inputs)
        except asyncio.CancelledError:
            if not running.cancelled:
                raise  # the node is going down, not this lease
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()  # our own cancel, from _cancel_run: handled here
            outcome = None
        finally:
            self.running.pop(offer.lease, None)
        if outcome is None or running.cancelled:
            self.spool.discard_outputs(offer.lease)
        else:
            await self._deliver(offer, outcome)
        self._send_ready()

    async def _execute_in_slot(
        self, running: Running, manifest: Manifest, bundle_dir: Path, inputs: dict[str, Path]
    ) -> RunOutcome | None:
        """Wait for a free slot (a prefetched lease waits here, in order), run the task
        holding it, and note its wall time for ``_capacity``. None if it was cancelled
        just as the slot came.

        Raises CancelledError when cancelled while queued (``_cancel_run``).
        """
        running.queued = True
        try:
            await self.slot_gate.acquire()
        finally:
            running.queued = False
        try:
            if running.cancelled:
                return None
            outcome = await self._execute(running.offer, manifest, bundle_dir, inputs)
        finally:
            self.slot_gate.release()
        if outcome.wall_seconds > 0:  # 0: it never started; that says nothing of its length
            self.recent_walls.append(outcome.wall_seconds)
            self.median_wall = statistics.median(self.recent_walls)
        return outcome

    async def _bundle_again(
        self, offer: TaskOffer, bundle_dir: Path
    ) -> tuple[Path, RunOutcome | None]:
        """The bundle directory re-verified just before the run (a stat check unless it
        changed since it was verified); a corrupt cache entry is fetched again."""
        try:
            return await self.bundles.fetch(offer.digest, offer.project, offer.size), None
        except (BundleError, ConnectionError, FileTransferError) as exc:
            return bundle_dir, failure(f"cannot have the project's bundle: {exc}")

    async def _inputs_of(self, running: Running) -> tuple[dict[str, Path], RunOutcome | None]:
        """The task's input files by name (waiting for a connection if need be); or a
        failed outcome naming the file that could not be had; or, when it was given back
        instead, no files and no outcome.

        Files that cannot be had over a connection with other addresses after it (a relay
        that withholds or alters them, say) are not the task's fault: the lease is given
        back, no attempt counted, and the address avoided. Over the last address (the
        hub itself) the task fails, so that a file the hub cannot serve ends as F with
        the cause, not in offers without end.
        """
        if not running.offer.files:
            return {}, None
        running.fetching = True
        try:
            return await self.inputs.fetch_all(running.offer.files), None
        except (FileTransferError, OSError) as exc:
            link = self.link
            if link is None or not link.fallbacks or isinstance(exc, OSError):
                return {}, failure(f"cannot fetch the input files: {exc}")
            lease = running.offer.lease
            log.warning("giving lease %d back: cannot fetch its input files: %s", lease, exc)
            self._send(link, Decline(leases=[lease], reason=f"input files: {exc}"[:500]))
            self._avoid_address(link, f"input files could not be had: {exc}")
            link.writer.close()
            return {}, None
        finally:
            running.fetching = False

    async def _execute(
        self, offer: TaskOffer, manifest: Manifest, bundle_dir: Path, inputs: dict[str, Path]
    ) -> RunOutcome:
        request = RunRequest(
            lease=offer.lease,
            task_id=offer.task,
            input=offer.input,
            bundle_dir=bundle_dir,
            entrypoint=manifest.entrypoint,
            limits=manifest.limits,
            input_files=inputs,
            output_dir=self.spool.output_dir(offer.lease),
        )
        try:
            return await self._executor(manifest.mode).run(request)
        except ExecutionError as exc:  # e.g. an input the program cannot be given
            return failure(f"cannot run the task: {exc}")

    async def _deliver(self, offer: TaskOffer, outcome: RunOutcome) -> None:
        outcome = _sendable(outcome)
        files = [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in outcome.output_files]
        if not outcome.ok:
            files = []  # a result that cannot travel takes no files with it
            self.spool.discard_outputs(offer.lease)
        record: dict[str, Any] = {
            "lease": offer.lease,
            "project": offer.project,
            "task": offer.task,
            "ok": outcome.ok,
            "result": outcome.result if outcome.ok else None,
            "error": outcome.error,
            "cpu_seconds": outcome.cpu_seconds,
            "wall_seconds": outcome.wall_seconds,
            "files": files,
            "given": given_record(offer),
        }
        try:
            # Digested as it will travel (after _sendable), once, and kept with it: each
            # connection it is sent over authenticates the digest with its own key.
            seal_record(self.identity.node_id, record)
        except ValueError as exc:  # a lone surrogate in the result: not UTF-8, cannot travel
            self.spool.discard_outputs(offer.lease)
            error = f"result cannot be sent: {exc}"
            record.update(ok=False, result=None, error=error, files=[])
            seal_record(self.identity.node_id, record)
        await self.spool.put(offer.lease, record)
        log.info(
            "task %s/%s %s in %.2f s",
            offer.project,
            offer.task,
            "done" if record["ok"] else f"failed: {record['error']}",
            outcome.wall_seconds,
        )
        self.uploads.submit(record, self.spool.output_dir(offer.lease))

    def _cancel_run(self, lease: int, running: Running) -> None:
        running.cancelled = True
        if (running.fetching or running.queued) and running.task is not None:
            running.task.cancel()  # nothing runs yet; stop waiting for its files or slot
        for executor in self.executors.values():
            self._spawn(executor.cancel(lease))

    # ---- clean stop -----------------------------------------------------------------------

    async def _shutdown(self, serving: asyncio.Task[None]) -> None:
        """Stop running tasks, give their leases back, flush results, say goodbye."""
        self.stopping = True
        leases = sorted(self.running)
        for lease, running in list(self.running.items()):
            self._cancel_run(lease, running)
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE)
        link = self.link
        if link is not None:
            with contextlib.suppress(Exception):
                if leases:
                    self._send(link, Decline(leases=leases, reason="node stopping"))
                deadline = asyncio.get_running_loop().time() + STOP_GRACE
                while self.spool.leases() and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.05)
                self._send(link, Goodbye(reason="node stopping"))
                await asyncio.wait_for(link.writer.drain(), 2)
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        if self.relay is not None:
            await self.relay.close()
        await self.bundles.close()
        await self.inputs.close()
        for executor in self.executors.values():
            await executor.close()


def queued_per_slot(median_wall: float | None) -> int:
    """Leases to hold queued per slot when the recent median task took ``median_wall``
    seconds: none for tasks of a second or more, or before any task ran (no telling);
    else about QUEUED_WORK_SECONDS of work, between 1 and MAX_QUEUED_PER_SLOT leases."""
    if median_wall is None or median_wall >= PREFETCH_BELOW_SECONDS:
        return 0
    if median_wall * MAX_QUEUED_PER_SLOT <= QUEUED_WORK_SECONDS:
        return MAX_QUEUED_PER_SLOT
    return max(1, int(QUEUED_WORK_SECONDS / median_wall))


def _sendable(outcome: RunOutcome) -> RunOutcome:
    """The outcome, or a failure saying why its result cannot travel (too deep, too big)."""
    error = outcome.error[-MAX_ERROR:] if outcome.error else outcome.error
    if outcome.ok:
        try:
            check_field_value("result", "result", outcome.result)
        except LocalProtocolError as exc:
            error, outcome = f"result cannot be sent: {exc}", replace(outcome, ok=False)
    return replace(outcome, error=error, result=outcome.result if outcome.ok else None)


async def _reachable(
    address: Address, tls: ssl.SSLContext | None = None, pin: str | None = None
) -> bool:
    """Whether a connection to ``address`` opens (a relay listens only while it can
    reach the hub); with TLS, whether the handshake and the pin check pass too."""
    timeout = PROBE_TIMEOUT if tls is None else PROBE_TIMEOUT + HANDSHAKE_TIMEOUT
    try:
        _reader, writer = await asyncio.wait_for(
            open_connection(address.host, address.port, tls, pin), timeout
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
