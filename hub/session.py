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
from issc.nodeauth import Claim, new_nonce, verify_proof
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
MAX_WRITE_BUFFER = 16 * 1024 * 1024  # a node that reads slower than this is dropped
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MAX_SLOTS = 1024
MAX_TOKEN_LEN = 256


class NodeSession:
    """Serves one TCP connection until it closes. Protocol errors end only this session."""

    def __init__(
        self,
        runtime: HubRuntime,
        transport: Transport,
        *,
        via: NodeSession | None = None,
    ) -> None:
        """Serve ``transport``: a TCP connection, or a peer's frames carried by the relay
        session ``via``."""
        self.runtime = runtime
        self.transport = transport
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
            hello = await asyncio.wait_for(self._authenticate(), HANDSHAKE_TIMEOUT)
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
        except TimeoutError:
            log.info("%s: no hello and proof within %s s", self.address, HANDSHAKE_TIMEOUT)
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
        """The next message, or None at a clean end of the connection."""
        while True:
            event = self.conn.next_event()
            if event is CLOSED:
                return None
            if event is not NEED_DATA:
                assert isinstance(event, Message)
                return event
            data = await self.transport.read()
            self.conn.receive_data(data)

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
        # A fresh nonce for every connection: a proof recorded on another one is useless.
        nonce = new_nonce()
        self.send(Challenge(nonce=nonce))
        proof = await self._next_message()
        if isinstance(proof, Error):
            log.warning("%s: the node refused the challenge: %s", self.address, proof.message[:500])
        if not isinstance(proof, Proof):
            return None
        try:
            verify_proof(nonce, _claim(hello), proof.signature)
        except AuthError as exc:
            self._refuse(hello, str(exc))
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
        try:
            self.transport.write(self.conn.send(message))
        except LocalProtocolError:
            log.exception("node %s: refused to send %s", self.node_id, type(message).__name__)
            self.close()
            return
        except (ConnectionError, RuntimeError):
            self.close()
            return
        if self.transport.backlog() > MAX_WRITE_BUFFER:
            log.warning("node %s: not reading its data; disconnecting", self.node_id)
            self.close()

    def send_welcome(self, resumed: tuple[int, ...]) -> None:
        assert self.node_id is not None
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
            # First of all, on every path (direct or relayed): the node signed what it was
            # given and what it returns; whatever altered either on the way is caught here.
            try:
                problem = await self.runtime.result_forged(self._id, message)
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
                reason = "the result's signature does not verify: altered on the way"
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
                    f"{path} (its signature does not verify); the lease was given back",
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
        await self.peers.relayed(message)

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
    if len(hello.projects) > 256 or len(hello.leases) > 4 * MAX_SLOTS:
        return "too many projects or leases"
    return None
