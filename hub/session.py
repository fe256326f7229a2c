"""One node's connection to the hub: a thin loop over the sans-I/O protocol.

Read bytes, feed the protocol, dispatch each message through one table to the
runtime. Nothing here decides scheduling; nothing here touches the database except
through the runtime's store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hub import events as ev
from hub.changes import FileInfo
from hub.relaying import ENVELOPE_OVERHEAD, RelayedPeers, RelayedTransport
from hub.transport import Transport
from issc.config import HubLimits
from issc.errors import (
    AuthError,
    IsscError,
    KeyFormatError,
    LocalProtocolError,
    RemoteProtocolError,
    StoreError,
)
from issc.keys import parse_public_key
from issc.names import SHA256_RE
from issc.nodeauth import Claim, Exchange, new_kex, new_nonce, result_key, verify_proof
from issc.protocol import (
    CLOSED,
    MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    Accept,
    BundleChunk,
    BundleRefused,
    Challenge,
    Connection,
    Decline,
    Error,
    ErrorCode,
    FetchBundle,
    FetchFile,
    FileChunk,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    PeerClosed,
    PeerOpened,
    Proof,
    Ready,
    Relayed,
    Result,
    ResultAck,
    Role,
    Upload,
    UploadAck,
    Welcome,
)

if TYPE_CHECKING:
    from hub.runtime import HubRuntime

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds from connect to a verified proof
# Idle timeout: a connection on which no whole frame arrived for IDLE_BEATS heartbeat
# intervals plus IDLE_SLACK seconds is ended (error `limit`). Nodes send a heartbeat every
# interval whether or not they hold leases, so only a dead or stalling peer meets it. The
# clock restarts on a complete frame, never on bytes: one byte every few seconds (a
# "slow loris") does not keep a connection. It runs from the moment the session is ready
# for the next frame, so time the hub itself spends on a message is not the node's.
IDLE_BEATS = 2
IDLE_SLACK = 1.0
# Unsent data: above WRITE_HIGH_WATER for longer than limits.write_timeout, or above
# MAX_WRITE_BUFFER at any time, and the connection is cut off (no error frame could get
# through). A node fetches stop-and-wait, one chunk (1 MiB) per download at a time, so an
# honest node stays far below the mark unless its link is very slow and very busy.
WRITE_HIGH_WATER = 8 * 1024 * 1024
MAX_WRITE_BUFFER = 16 * 1024 * 1024
WRITE_POLL = 0.1  # seconds between looks at the backlog while it is above the mark
# Envelopes a relay sends for peers whose session is over (see NodeSession._count): at
# most SPILL_FACTOR times a connection's rate and burst, then the relay is slowed down.
SPILL_FACTOR = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MAX_SLOTS = 1024
# Leases a node may hold per slot (hello.leases): one running and up to eight queued while
# its tasks are short (node/client.py, "Prefetch"). Bounds what a hello makes the hub read.
HELD_PER_SLOT = 9
MAX_TOKEN_LEN = 256


class LimitExceeded(Exception):
    """The node went over one of the hub's limits; the message says which."""


class TokenBucket:
    """At most ``rate`` messages a second on average and ``burst`` at once."""

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, rate: float, burst: float) -> bool:
        """Take one token (True), or there is none left (False)."""
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def wait(self, rate: float) -> float:
        """Seconds until the next token (after a ``take`` that failed)."""
        return max(0.0, (1.0 - self.tokens) / rate)


class NodeSession:
    """Serves one TCP connection until it closes. Protocol errors end only this session."""

    def __init__(
        self,
        runtime: HubRuntime,
        transport: Transport,
        *,
        via: NodeSession | None = None,
        limits: HubLimits | None = None,
    ) -> None:
        """Serve ``transport``: a TCP connection, or a peer's frames carried by the relay
        session ``via`` (whose limits a peer's session shares)."""
        self.runtime = runtime
        self.transport = transport
        self.limits: HubLimits = via.limits if via is not None else limits or HubLimits()
        loop = asyncio.get_running_loop()
        self._bucket = TokenBucket(self.limits.message_burst, loop.time())
        self._spill = TokenBucket(self.limits.message_burst * SPILL_FACTOR, loop.time())
        # A peer behind a relay has no connection of its own: the relay's is watched
        # (idle, unread data). A peer's frames may wait behind other peers' in the relay
        # (backpressure, hub.relaying), so its silence alone is not held against it; the
        # lease window (heartbeat_misses) still ends a session that says nothing.
        self.idle_timeout: float | None = (
            None if via is not None else IDLE_BEATS * runtime.config.heartbeat_interval + IDLE_SLACK
        )
        self._write_watch: asyncio.Task[None] | None = None
        self.welcomed = False  # the runtime sends nothing but welcome before it
        self.relay = via
        self.via: str | None = via.node_id if via is not None else None
        self.depth: int = via.depth + 1 if via is not None else 0  # relays between us
        frame_limit = (
            via.conn.max_frame_size - ENVELOPE_OVERHEAD if via is not None else MAX_FRAME_SIZE
        )
        self.conn: Connection = Connection(Role.HUB, frame_limit)
        self.address = transport.address
        self.peers: RelayedPeers | None = None  # set once this node relays for others
        self.node_id: str | None = None
        self.result_key = b""  # the connection's, from the handshake (issc.nodeauth)
        self.volunteer = ""
        self.slots = 0
        self.closed = False
        self.handlers: dict[type[Message], Callable[[Any], Awaitable[None] | None]] = {
            Heartbeat: self._on_heartbeat,
            Ready: self._on_ready,
            Accept: self._on_accept,
            Decline: self._on_decline,
            BundleRefused: self._on_bundle_refused,
            FetchBundle: self._on_fetch_bundle,
            FetchFile: self._on_fetch_file,
            Upload: self._on_upload,
            Result: self._on_result,
            Goodbye: self._on_goodbye,
            Error: self._on_error,
            PeerOpened: self._on_peer_opened,
            Relayed: self._on_relayed,
            PeerClosed: self._on_peer_closed,
        }

    # ---- the loop ---------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            try:
                hello = await asyncio.wait_for(self._authenticate(), HANDSHAKE_TIMEOUT)
            except TimeoutError:
                log.info("%s: no hello and proof within %s s", self.address, HANDSHAKE_TIMEOUT)
                self._send_error(
                    ErrorCode.LIMIT, f"no hello and verified proof within {HANDSHAKE_TIMEOUT:g} s"
                )
                return
            if hello is None or not await self._enroll(hello):
                return
            while not self.closed:
                message = await self._next_message()
                if message is None:
                    break
                handler = self.handlers[type(message)]
                outcome = handler(message)
                if outcome is not None:
                    await outcome
        except RemoteProtocolError as exc:
            log.warning("node %s (%s): protocol error: %s", self.node_id, self.address, exc)
            self._send_error(ErrorCode.PROTOCOL, str(exc))
        except LimitExceeded as exc:
            log.warning("node %s (%s): %s; disconnecting", self.node_id, self.address, exc)
            self._send_error(ErrorCode.LIMIT, str(exc))
        except (ConnectionError, OSError) as exc:
            log.info("node %s (%s): connection lost: %s", self.node_id, self.address, exc)
        except StoreError as exc:  # a bundle or a stored offer could not be read
            log.error("node %s (%s): %s", self.node_id, self.address, exc)
            self._send_error(ErrorCode.INTERNAL, "the hub cannot serve this node right now")
        finally:
            self.close()
            if self.node_id is not None:
                self.runtime.detach(self)

    async def _next_message(self) -> Message | None:
        """The next message, or None at a clean end of the connection.

        Raises:
            LimitExceeded: no whole frame within the idle timeout, or the node sends
                faster than ``limits.messages_per_second`` allows.
        """
        loop = asyncio.get_running_loop()
        idle = self.idle_timeout
        deadline = loop.time() + idle if idle is not None else None
        while True:
            event = self.conn.next_event()
            if event is CLOSED:
                return None
            if event is not NEED_DATA:
                assert isinstance(event, Message)
                if not isinstance(event, Relayed):  # charged in _on_relayed
                    self._count(loop.time())
                return event
            if deadline is None:
                data = await self.transport.read()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await self.transport.read()
                except TimeoutError:
                    assert idle is not None
                    raise LimitExceeded(
                        f"no complete message in {idle:g} s (idle timeout: "
                        f"{IDLE_BEATS} x heartbeat_interval + {IDLE_SLACK:g} s)"
                    ) from None
            self.conn.receive_data(data)

    def _count(self, now: float) -> None:
        """Charge one message to this session's token bucket.

        Every message is charged once, to the session whose conversation it is. A relay's
        connection carries its peers' frames: an envelope (``relayed``) handed to a live
        peer's session is charged to that session, which reads the frame like any node's,
        and not to the relay's; the relay's own messages, ``peer_opened`` and
        ``peer_closed`` are charged to the relay. So a busy relay never trips its own
        limit with its peers' traffic, and each peer has the allowance of a direct node.
        Envelopes for a peer whose session is over are not charged to anyone who could be
        closed for them: when the hub ends a flooding peer, whatever the peer had sent
        until then is still on its way through the relay's connection (thousands of small
        frames in the socket buffers), and that must not cost an honest relay, and all
        its other peers, their connection. They go through a separate, larger bucket
        (_spill: SPILL_FACTOR times the rate and burst); beyond it the hub slows its
        reading of the relay down rather than closing it, so a relay that sends such
        envelopes on purpose still gets no more than that rate out of the hub.

        Raises:
            LimitExceeded: over the rate.
        """
        limits = self.limits
        if not self._bucket.take(now, limits.messages_per_second, limits.message_burst):
            raise LimitExceeded(
                f"more than {limits.messages_per_second:g} messages a second, "
                f"{limits.message_burst} at once (limits.messages_per_second, message_burst)"
            )

    async def _authenticate(self) -> Hello | None:
        """hello, challenge, proof: the hello once its proof verified, else None (the
        connection ended or was refused; the refusal is sent and logged)."""
        hello = await self._next_message()
        if not isinstance(hello, Hello):
            return None
        if hello.protocol != PROTOCOL_VERSION:
            self._send_error(
                ErrorCode.VERSION, f"hub speaks protocol {PROTOCOL_VERSION}, not {hello.protocol}"
            )
            return None
        problem = _check_hello(hello)
        if problem:
            self._send_error(ErrorCode.PROTOCOL, problem)
            return None
        # A fresh nonce and key for every connection: a proof recorded on another one is
        # useless, and so is a result key learnt from one.
        nonce = new_nonce()
        kex_private, hub_kex = new_kex()
        self.send(Challenge(nonce=nonce, kex=hub_kex))
        proof = await self._next_message()
        if isinstance(proof, Error):
            log.warning("%s: the node refused the challenge: %s", self.address, proof.message[:500])
        if not isinstance(proof, Proof):
            return None
        exchange = Exchange(nonce, hub_kex, proof.kex)
        try:
            verify_proof(exchange, _claim(hello), proof.signature)
            self.result_key = result_key(kex_private, exchange, proof.kex)
        except AuthError as exc:
            self._refuse(hello, str(exc))
            return None
        except ValueError:  # a point of small order: a secret everybody knows
            self._refuse(hello, "the proof's key exchange value is not usable (small order)")
            return None
        return hello

    async def _enroll(self, hello: Hello) -> bool:
        try:
            self.node_id = await self.runtime.enroll(hello, self.address)
        except AuthError as exc:
            self._refuse(hello, str(exc))
            return False
        except StoreError as exc:
            # Not the node's fault: it retries later, it is not told to give up.
            degraded = self.runtime.degraded is not None
            (log.info if degraded else log.error)("%s: cannot enroll node: %s", self.address, exc)
            self._send_error(ErrorCode.INTERNAL, "the hub cannot admit nodes right now")
            return False
        self.volunteer = hello.volunteer
        self.slots = hello.slots
        log.info(
            "node %s of %s joined from %s (%d slots, projects %s)",
            self.node_id,
            self.volunteer,
            self.address,
            self.slots,
            ",".join(hello.projects),
        )
        self.runtime.attach(self, hello)
        return True

    def _refuse(self, hello: Hello, reason: str) -> None:
        log.warning(
            "refused node from %s (volunteer %r, key %s): %s",
            self.address,
            hello.volunteer,
            hello.public_key,
            reason,
        )
        self._send_error(ErrorCode.AUTH, reason)

    # ---- sending ----------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message; a node that does not keep up with its data is dropped."""
        if self.closed:
            return
        if self.node_id is not None and not self.welcomed:
            # Enrolled, in the runtime's `sessions`, but its NodeJoined not handled yet
            # (later in this batch, or in the next one); the protocol allows nothing but
            # `welcome` before `welcome`. Whatever the scheduler told this node meanwhile
            # (a cancel, an offer, a result_ack) came from events handled *before* its
            # NodeJoined, and the welcome itself settles it, so it is skipped, not queued.
            # A lease cancelled or superseded before NodeJoined is no longer live then:
            # `resumed` leaves it out and the node stops it (rule 7); a result for it is
            # refused, since cancels go only to leases of finished tasks, so no lease that
            # another node now holds is completed twice. An offer not sent ends at
            # NodeJoined (the node does not list it); an ack not sent makes the node send
            # its spooled result again, and it is acknowledged then (docs/reliability.md,
            # "cancel before welcome").
            log.debug("node %s: not welcomed yet; %s not sent", self.node_id, message.TAG)
            return
        try:
            self.transport.write(self.conn.send(message))
        except LocalProtocolError:
            log.exception("node %s: refused to send %s", self.node_id, type(message).__name__)
            self.close()
            return
        except (ConnectionError, RuntimeError):
            self.close()
            return
        self._check_backlog()

    def _check_backlog(self) -> None:
        """Cut off a node that does not take its data: at once above MAX_WRITE_BUFFER,
        after ``limits.write_timeout`` seconds above WRITE_HIGH_WATER. For a peer behind a
        relay the backlog is the relay's connection's, watched by the relay's session."""
        backlog = self.transport.backlog()
        if backlog > MAX_WRITE_BUFFER:
            self._cut_off(f"{backlog} bytes unsent, over {MAX_WRITE_BUFFER}")
        elif backlog > WRITE_HIGH_WATER and self.relay is None and self._write_watch is None:
            self._write_watch = asyncio.create_task(self._watch_writes())

    async def _watch_writes(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.limits.write_timeout
        deadline = loop.time() + timeout
        try:
            while not self.closed and self.transport.backlog() > WRITE_HIGH_WATER:
                if loop.time() >= deadline:
                    self._cut_off(
                        f"over {WRITE_HIGH_WATER} bytes unsent for {timeout:g} s "
                        "(limits.write_timeout)"
                    )
                    return
                await asyncio.sleep(min(WRITE_POLL, max(0.0, deadline - loop.time())))
        finally:
            self._write_watch = None

    def _cut_off(self, why: str) -> None:
        """End the connection dropping what is queued: the node does not read it."""
        log.warning(
            "node %s (%s): not reading its data (%s); disconnecting",
            self.node_id,
            self.address,
            why,
        )
        self.close()
        self.transport.abort()

    def send_welcome(self, resumed: tuple[int, ...]) -> None:
        assert self.node_id is not None
        self.welcomed = True
        settings = self.runtime.config
        self.send(
            Welcome(
                protocol=PROTOCOL_VERSION,
                node_id=self.node_id,
                heartbeat_interval=settings.heartbeat_interval,
                heartbeat_misses=settings.heartbeat_misses,
                max_frame_size=self.conn.max_frame_size,
                resumed=list(resumed),
            )
        )

    def end(self, code: ErrorCode, message: str) -> None:
        """Tell the node why, then close the connection (``internal``: it may come back)."""
        self._send_error(code, message)

    def _send_error(self, code: ErrorCode, message: str) -> None:
        # The connection is going away anyway: failing to say why must not raise.
        with contextlib.suppress(IsscError, ConnectionError, RuntimeError):
            self.transport.write(self.conn.send(Error(code=code, message=message[:2000])))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
            if self.peers is not None:
                self.peers.close_all()  # a relay's peers go with it

    # ---- handlers ---------------------------------------------------------------------

    @property
    def _id(self) -> str:
        assert self.node_id is not None
        return self.node_id

    def _on_heartbeat(self, message: Heartbeat) -> None:
        self.runtime.submit(ev.HeartbeatReceived(self._id, self.runtime.now()))
        self.send(HeartbeatAck())

    def _on_ready(self, message: Ready) -> None:
        free = min(message.free, MAX_SLOTS)
        self.runtime.submit(ev.SlotsFree(self._id, free, self.runtime.now()))

    def _on_accept(self, message: Accept) -> None:
        now = self.runtime.now()
        self.runtime.submit(ev.OffersAccepted(self._id, tuple(message.leases), now))

    def _on_decline(self, message: Decline) -> None:
        event = ev.LeasesDeclined(
            self._id, tuple(message.leases), message.reason[:500], self.runtime.now()
        )
        self.runtime.submit(event)

    def _on_bundle_refused(self, message: BundleRefused) -> None:
        if self.via is not None:
            # The peer got the bundle from its relay, which checks only the digest of
            # what it caches: a bundle the peer refuses was altered there, not signed
            # wrongly by its owner. The offers go back without costing the task an
            # attempt, and the peer is told to reach the hub another way.
            reason = (
                f"node {self.node_id} refused bundle {message.digest[:12]} fetched via "
                f"relay {self.via}: {message.reason[:500]}"
            )
            log.warning("%s", reason)
            self.runtime.submit(
                ev.LeasesDeclined(self._id, tuple(message.leases), reason, self.runtime.now())
            )
            self._send_error(ErrorCode.RELAY, reason)
            return
        log.warning(
            "node %s refused bundle %s of %s: %s",
            self.node_id,
            message.digest[:12],
            message.project,
            message.reason,
        )
        reason = f"node {self.node_id} refused bundle {message.digest[:12]}: {message.reason[:500]}"
        event = ev.BundleRefused(
            self._id, message.digest, reason, tuple(message.leases), self.runtime.now()
        )
        self.runtime.submit(event)

    async def _on_fetch_bundle(self, message: FetchBundle) -> None:
        chunk = await self.runtime.bundle_chunk(message.digest, message.offset)
        if chunk is None:
            raise RemoteProtocolError(
                f"fetch_bundle: no bundle {message.digest[:16]!r} at offset {message.offset}"
            )
        total, data = chunk
        self.send(BundleChunk(digest=message.digest, offset=message.offset, total=total, data=data))

    async def _on_fetch_file(self, message: FetchFile) -> None:
        chunk = await self.runtime.file_chunk(message.sha256, message.offset)
        if chunk is None:
            raise RemoteProtocolError(
                f"fetch_file: no file {message.sha256[:16]!r} at offset {message.offset}"
            )
        total, data = chunk
        self.send(FileChunk(sha256=message.sha256, offset=message.offset, total=total, data=data))

    async def _on_upload(self, message: Upload) -> None:
        if not self.runtime.upload_wanted(message.lease):
            # The task finished meanwhile: say "complete" so the node moves on to its
            # result, which the hub then acknowledges without recording it.
            self.send(UploadAck(lease=message.lease, name=message.name, received=message.size))
            return
        refusal = self.runtime.upload_refusal(
            self._id, message.lease, message.name, message.size
        ) or _bad_digest(message.sha256)
        if refusal is not None:
            raise RemoteProtocolError(f"upload: {refusal}")
        try:
            held = await self.runtime.upload(
                message.lease,
                message.name,
                message.sha256,
                message.size,
                message.offset,
                message.data,
            )
        except OSError as exc:  # a full disk, say: the node keeps its result and comes back
            self.runtime.upload_failed(self, exc)
            return
        self.send(UploadAck(lease=message.lease, name=message.name, received=held))

    async def _on_result(self, message: Result) -> None:
        if self.runtime.upload_wanted(message.lease):
            # First of all, on every path (direct or relayed): the node authenticated what
            # it was given and what it returns; whatever altered either on the way is
            # caught here.
            try:
                problem = await self.runtime.result_forged(self._id, self.result_key, message)
            except StoreError as exc:  # rebuilding an offer made before a restart
                log.error(
                    "node %s: cannot check the result of lease %d: %s",
                    self.node_id,
                    message.lease,
                    exc,
                )
                self._send_error(ErrorCode.INTERNAL, "the hub cannot take results right now")
                return
            if problem is not None:
                log.warning(
                    "node %s of %s: result of lease %d (task %s) refused, %s: %s",
                    self.node_id,
                    self.volunteer,
                    message.lease,
                    self.runtime.offered_task(message.lease) or f"{message.task!r}?",
                    f"via relay {self.via}" if self.via else "direct connection",
                    problem,
                )
                reason = "the result's HMAC does not check: altered on the way"
                try:
                    # Given back, not failed: the task is run again, no attempt counted;
                    # committed before the node is told to forget the result.
                    declined = ev.LeasesDeclined(
                        self._id, (message.lease,), reason, self.runtime.now()
                    )
                    await self.runtime.submit_and_wait(declined)
                except StoreError:
                    self.close()  # the hub is stopping: the node sends the result again
                    return
                self.send(ResultAck(lease=message.lease, accepted=False, reason=reason))
                path = f" through relay {self.via}" if self.via else ""
                self._send_error(
                    ErrorCode.RELAY,
                    f"the result of lease {message.lease} was altered on its way to the hub"
                    f"{path} (its HMAC does not check); the lease was given back",
                )
                return
        wanted = message.ok and self.runtime.upload_wanted(message.lease)
        missing = self.runtime.missing_output(message.files) if wanted else None
        if missing is not None:
            # The node thinks the file is here; tell it what the hub holds so it resumes.
            held = self.runtime.uploads.received(
                message.lease, missing.name, missing.sha256, missing.size
            )
            self.send(UploadAck(lease=message.lease, name=missing.name, received=held))
            return
        error = message.error[-4000:] if message.error else message.error
        event = ev.ResultReceived(
            self._id,
            message.lease,
            message.ok,
            message.result if message.ok else None,
            error if not message.ok else None,
            max(0.0, message.cpu_seconds),
            max(0.0, message.wall_seconds),
            self.runtime.now(),
            tuple(FileInfo(f.name, f.sha256, f.size) for f in message.files) if message.ok else (),
        )
        self.runtime.submit(event)

    def _on_goodbye(self, message: Goodbye) -> None:
        log.info("node %s says goodbye: %s", self.node_id, message.reason[:200])
        self.close()

    # ---- relaying for peers -------------------------------------------------------------

    def _on_peer_opened(self, message: PeerOpened) -> None:
        if self.peers is None:
            self.peers = RelayedPeers(self, self._relayed_session)
            log.info("node %s of %s is relaying for peers", self.node_id, self.volunteer)
        self.peers.opened(message)

    def _relayed_session(self, transport: RelayedTransport) -> NodeSession:
        return NodeSession(self.runtime, transport, via=self)

    async def _on_relayed(self, message: Relayed) -> None:
        if self.peers is None:
            raise RemoteProtocolError(f"relayed: peer {message.peer} was never opened")
        if not await self.peers.relayed(message):
            await self._spilled()

    async def _spilled(self) -> None:
        """An envelope no session took: throttled, never a reason to close (see _count)."""
        loop = asyncio.get_running_loop()
        rate = self.limits.messages_per_second * SPILL_FACTOR
        burst = self.limits.message_burst * SPILL_FACTOR
        while not self._spill.take(loop.time(), rate, burst):
            await asyncio.sleep(self._spill.wait(rate))

    def _on_peer_closed(self, message: PeerClosed) -> None:
        if self.peers is not None:
            self.peers.closed(message)

    def _on_error(self, message: Error) -> None:
        log.warning(
            "node %s reports error %s: %s", self.node_id, message.code, message.message[:500]
        )
        self.close()


def _bad_digest(sha256: str) -> str | None:
    return None if SHA256_RE.match(sha256) else "sha256 must be 64 lowercase hex digits"


def _claim(hello: Hello) -> Claim:
    return Claim(volunteer=hello.volunteer, public_key=hello.public_key, token=hello.token)


def _check_hello(hello: Hello) -> str | None:
    """Why a hello is unacceptable, or None."""
    if not _NAME_RE.match(hello.volunteer):
        return f"volunteer name {hello.volunteer[:80]!r} is not valid"
    try:
        parse_public_key(hello.public_key)
    except KeyFormatError as exc:
        return f"hello.public_key: {exc}"
    if hello.token is not None and not 1 <= len(hello.token) <= MAX_TOKEN_LEN:
        return f"token must be 1..{MAX_TOKEN_LEN} characters"
    if not 1 <= hello.slots <= MAX_SLOTS:
        return f"slots must be 1..{MAX_SLOTS}"
    if len(hello.projects) > 256 or len(hello.leases) > HELD_PER_SLOT * MAX_SLOTS:
        return "too many projects or leases"
    return None
