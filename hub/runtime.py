"""The hub's runtime: carries out what the pure scheduler decides.

One pump loop takes every event that arrived since the last round, hands them to the
scheduler in one call, commits all resulting changes in one transaction, and only
then sends the messages. Events that arrive while a commit is in flight wait for the
next round, so commits are grouped naturally: under load one disk sync covers many
tasks, at rest a single event is committed at once.

A commit that cannot be made (a full disk, a database gone beyond the store's retries)
does not end the hub: the batch's messages are not sent, and the hub is *degraded*. It
takes no new work (inbox paused, node sessions closed, new nodes refused with ``error``
``internal``), probes the store and the data directory with backoff, and once both take
writes again it rebuilds its scheduler from the database, exactly as at start-up. Nothing
uncommitted was ever sent, so what nodes and owners were told still holds. A full disk
met by the outbox, the inbox or an upload degrades the hub the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hub import events as ev
from hub import faults
from hub.blobs import ContentStore, UploadArea
from hub.changes import Change, LeaseEnded, TaskFinished, TrustChanged
from hub.clock import AnchoredClock
from hub.dirwatch import DirWatch
from hub.inbox import Inbox
from hub.lifecycle import TaskState
from hub.outbox import Outbox
from hub.retry import RetryPolicy, brief, is_disk_full
from hub.scheduler import Scheduler, Snapshot
from hub.session import NodeSession
from hub.store import AsyncStore, Store
from hub.store_inbox import OfferPayload
from issc.config import HubConfig
from issc.errors import AuthError, StoreError
from issc.fsutil import write_all
from issc.names import PLAIN_NAME_RE
from issc.protocol import (
    BUNDLE_CHUNK_SIZE,
    Cancel,
    ErrorCode,
    FileRef,
    Hello,
    Offer,
    Result,
    ResultAck,
    TaskOffer,
)
from issc.resultmac import Given, check_result_mac, given_of, returned_of, transcript_digest

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between timer rounds (offer and heartbeat expiry)
INBOX_POLL = 0.5  # seconds between inbox scans that inotify did not ask for
# After a database or disk error in the inbox or outbox, the failing scan or export is
# tried again after 0.25 s, then twice the pause before, up to 5 s (with jitter).
RETRY_BACKOFF = RetryPolicy(first=0.25, cap=5.0)
EXPORT_COALESCE = 0.2  # seconds; results.jsonl trails the database by at most about this
EXPORT_PAUSE = 4.0  # an export of d seconds is followed by a pause of up to 4 d
MAX_OUTPUT_FILES = 64  # output files one result may carry
MAX_OFFER_BYTES = 2 * 1024 * 1024  # inputs per offer message, well under the frame limit
RATE_WINDOW = 10  # seconds over which tasks_per_second is measured
# While degraded: the first probe of the store and the disk comes after 0.5 s, each
# later one after twice the pause before it, up to 5 s (with jitter).
PROBE_BACKOFF = RetryPolicy(first=0.5, cap=5.0)
PROBE_BYTES = 1024 * 1024  # free space the data directory must have: one upload chunk
STEADY = 60.0  # seconds healthy after which a new outage starts probing from the first pause
_MESSAGE_TYPES = (
    ev.SendWelcome,
    ev.SendOffers,
    ev.SendCancel,
    ev.SendResultAck,
    ev.Disconnect,
)


class HubRuntime:
    def __init__(
        self,
        config: HubConfig,
        store: Store,
        scheduler: Scheduler,
        inbox: Inbox,
        outbox: Outbox,
        files: ContentStore,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.astore = AsyncStore(store)
        self.scheduler = scheduler
        self.inbox = inbox
        self.outbox = outbox
        # Wall time at start plus monotonic time since: leases never see the clock jump.
        self.now: Callable[[], float] = clock or AnchoredClock()
        self.sessions: dict[str, NodeSession] = {}
        self._volunteers: dict[str, str] = {}  # node id -> volunteer, of nodes seen this run
        self.started_at = self.now()
        self._pending: list[ev.Event] = []
        self._wake = asyncio.Event()
        self._export_wanted = asyncio.Event()
        self._bundles: dict[str, bytes] = {}
        self.files = files
        self.uploads = UploadArea(config.data_dir / "uploads", self.files)
        self._declared: dict[int, dict[str, int]] = {}  # lease -> output name -> size
        self._sweep_uploads = True  # the next finished task sweeps what earlier runs left
        # What each lease's offer held, per task: a result's MAC is checked against
        # it. Kept while the task is unfinished (a late result of an ended lease may still
        # count), dropped when it finishes; after a restart, rebuilt from the store on demand.
        # A tuple: the candidates (one, unless rebuilt: see _offered_under).
        self._offered: dict[int, dict[int, tuple[Given, ...]]] = {}  # task -> lease -> Given
        self.transfers = {
            "bundles_sent": 0,  # whole bundles: chunks that reached a bundle's end
            "bundle_bytes_sent": 0,
            "file_bytes_sent": 0,
            "upload_bytes_received": 0,
        }
        self.batches = 0
        self._waiters: list[asyncio.Future[None]] = []  # submit_and_wait callers, this round
        # Held from an inbox scan's commit until its TasksAdded are submitted, so an admin's
        # event submitted meanwhile comes after them (a cancel covers every committed task).
        self.ingest_lock = asyncio.Lock()
        self._finished_per_second: deque[list[int]] = deque()  # [UNIX second, C or F count]
        # Why the hub is degraded (no new work until the store and the disk take writes
        # again), or None; `issc-ctl status` shows it.
        self.degraded: str | None = None
        self._healthy = asyncio.Event()  # set while not degraded
        self._healthy.set()
        self._degraded_at = 0.0  # monotonic
        self._recovered_at = -STEADY  # monotonic
        self._probes = 0  # probes of this outage so far (the next pause grows with them)
        self.outages = 0  # times the hub was degraded, this run
        self._round_committed = False
        self._pump_idle = False  # waiting for events: the store's thread is free

    # ---- events in --------------------------------------------------------------------

    def submit(self, event: ev.Event) -> None:
        self._pending.append(event)
        self._wake.set()

    async def submit_and_wait(self, event: ev.Event) -> None:
        """Submit ``event``; return once the batch holding it is committed and its messages
        are sent (an admin is told of a change only when the database holds it).

        Raises:
            StoreError: the batch could not be committed, or the hub is degraded.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        async with self.ingest_lock:
            if self.degraded is not None:
                raise StoreError(f"the hub is degraded and takes no changes now: {self.degraded}")
            self._pending.append(event)
            self._waiters.append(done)
            self._wake.set()
        await done

    def attach(self, session: NodeSession, hello: Hello) -> None:
        assert session.node_id is not None
        if self.degraded is not None:  # enrolled a moment before the hub was degraded
            session.end(ErrorCode.INTERNAL, self._unavailable())
            return
        old = self.sessions.get(session.node_id)
        if old is not None and old is not session:
            log.info("node %s connected again; closing its old connection", session.node_id)
            old.close()
        self.sessions[session.node_id] = session
        self._volunteers[session.node_id] = hello.volunteer  # for log lines after it left
        self.submit(
            ev.NodeJoined(
                session.node_id,
                hello.volunteer,
                tuple(hello.projects),
                tuple(hello.leases),
                self.now(),
            )
        )

    def detach(self, session: NodeSession) -> None:
        assert session.node_id is not None
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
            log.info(
                "node %s of %s left (%s); its leases wait one heartbeat window",
                session.node_id,
                session.volunteer,
                session.address,
            )
            self.submit(ev.NodeLeft(session.node_id, self.now()))

    async def enroll(self, hello: Hello, address: str) -> str:
        """Admit a node whose proof verified; its node id.

        Raises:
            AuthError: the node may not join (registration, token, volunteer).
            StoreError: the database failed, or the hub is degraded.
        """
        if self.degraded is not None:
            raise StoreError(f"the hub is degraded: {self.degraded}")
        return await self.astore.call(
            self.store.enroll_node,
            hello.volunteer,
            hello.public_key,
            hello.token,
            self.config.registration == "open",
            address,
            hello.slots,
            self.now(),
            tuple(hello.projects),
        )

    async def bundle_chunk(self, digest: str, offset: int) -> tuple[int, bytes] | None:
        """(total size, data) of the bundle from ``offset``, or None if there is none."""
        content = self._bundles.get(digest)
        if content is None:
            content = await self.astore.call(self.store.bundle_content, digest)
            if content is None:
                return None
            self._bundles[digest] = content
        if offset > len(content):
            return None
        data = content[offset : offset + BUNDLE_CHUNK_SIZE]
        self.transfers["bundle_bytes_sent"] += len(data)
        if data and offset + len(data) == len(content):
            self.transfers["bundles_sent"] += 1
        return len(content), data

    async def file_chunk(self, sha256: str, offset: int) -> tuple[int, bytes] | None:
        """(total size, data) of an input file from ``offset``, or None if there is none."""
        chunk = await asyncio.to_thread(self.files.read, sha256, offset, BUNDLE_CHUNK_SIZE)
        if chunk is not None:
            self.transfers["file_bytes_sent"] += len(chunk[1])
        return chunk

    def upload_wanted(self, lease: int) -> bool:
        """False once the lease's task is finished (or the lease unknown): no bytes needed."""
        return lease in self.scheduler.leases or lease in self.scheduler.past_leases

    def upload_refusal(self, node_id: str, lease: int, name: str, size: int) -> str | None:
        """Why this node may not upload this output file for this lease, or None."""
        holder = self.scheduler.leases.get(lease) or self.scheduler.past_leases.get(lease)
        if holder is None or holder.node_id != node_id:
            return f"lease {lease} is not an unfinished lease of this node"
        if not PLAIN_NAME_RE.match(name):
            return f"output name {name[:80]!r} is not a plain file name"
        task = self.scheduler.tasks[holder.task_pk]
        limit = self.scheduler.projects[task.project_id].output_mb * 1024 * 1024
        declared = self._declared.setdefault(lease, {})
        declared[name] = size
        if len(declared) > MAX_OUTPUT_FILES:
            return f"more than {MAX_OUTPUT_FILES} output files"
        if sum(declared.values()) > limit:
            return f"output files total more than the project's output_mb limit ({limit} bytes)"
        return None

    async def upload(
        self, lease: int, name: str, sha256: str, size: int, offset: int, data: bytes
    ) -> int:
        """Store a chunk of an output file; returns the bytes the hub now holds (durably:
        a chunk that could not be written whole and synced is not counted).

        Raises:
            OSError: the chunk could not be stored (see ``upload_failed``).
        """
        held = await asyncio.to_thread(self.uploads.write, lease, name, sha256, size, offset, data)
        self.transfers["upload_bytes_received"] += len(data)
        return held

    def upload_failed(self, session: NodeSession, exc: OSError) -> None:
        """An upload chunk could not be stored: end that node's session with ``internal``
        (it keeps the result in its spool and sends it again later); a full disk
        degrades the hub."""
        full = is_disk_full(exc)
        log.error("node %s: cannot store an upload: %s", session.node_id, exc)
        session.end(
            ErrorCode.INTERNAL,
            "the hub is out of disk space" if full else f"the hub cannot store uploads: {exc}",
        )
        if full:
            self.degrade(f"disk full: uploads: {exc}")

    async def result_forged(self, node_id: str, key: bytes, message: Result) -> str | None:
        """Why ``message`` is not this node's authenticated result for what the hub
        offered under its lease (something on the way altered the offer or the result),
        or None if it is. ``key`` is the connection's result key (issc.nodeauth).

        For a lease whose task is unfinished (upload_wanted): one SHA-256 and one HMAC.
        A lease of another node is not checked: the scheduler refuses its result anyway.
        """
        holder = self.scheduler.leases.get(message.lease) or self.scheduler.past_leases.get(
            message.lease
        )
        if holder is not None and holder.node_id != node_id:
            return None
        try:
            returned = returned_of(
                message.ok,
                message.result,
                message.error,
                message.cpu_seconds,
                message.wall_seconds,
                message.files,
            )
        except (ValueError, TypeError) as exc:  # the protocol's decoder lets none through
            return f"the result is not JSON: {exc}"
        problem = "the hub does not know what it offered under this lease"
        for given in await self._offered_under(message.lease):
            try:
                check_result_mac(key, message.mac, transcript_digest(node_id, given, returned))
            except AuthError as exc:
                problem = str(exc)
                continue
            return None
        return problem

    def offered_task(self, lease: int) -> str | None:
        """The task id the hub offered under ``lease``, if it still knows (for logs)."""
        holder = self.scheduler.leases.get(lease) or self.scheduler.past_leases.get(lease)
        known = self._offered.get(holder.task_pk, {}).get(lease) if holder else None
        return known[0].task if known else None

    async def _offered_under(self, lease: int) -> tuple[Given, ...]:
        """What the offer of ``lease`` held: remembered when it was sent, or, for a lease
        offered before the hub restarted, rebuilt from the store. The offer named the
        bundle current when it was made, which the store does not keep with the lease: the
        rebuilt candidates are the project's newest bundle by then and the one before it
        (the scheduler hears of a new bundle a moment after it is stored)."""
        holder = self.scheduler.leases.get(lease) or self.scheduler.past_leases.get(lease)
        if holder is None:
            return ()
        known = self._offered.get(holder.task_pk, {}).get(lease)
        if known is not None:
            return known
        task = self.scheduler.tasks.get(holder.task_pk)
        if task is None:
            return ()
        project = self.scheduler.projects[task.project_id]
        payloads = await self.astore.call(self.store.offer_payloads, [holder.task_pk])
        digests = await self.astore.call(self.store.bundles_by, task.project_id, holder.offered_at)
        if holder.task_pk not in payloads:
            return ()
        task_id, input_json, files = payloads[holder.task_pk]
        try:
            candidates = tuple(
                given_of(lease, project.name, task_id, digest, json.loads(input_json), files)
                for digest in digests
            )
        except (ValueError, TypeError):
            return ()  # an input no offer could carry
        if holder.task_pk in self.scheduler.tasks:  # else finished meanwhile: nothing to keep
            self._offered.setdefault(holder.task_pk, {})[lease] = candidates
        return candidates

    def missing_output(self, files: Sequence[FileRef]) -> FileRef | None:
        """The first listed output file the content store does not hold, if any."""
        for ref in files:
            if self.files.size(ref.sha256) != ref.size:
                return ref
        return None

    # ---- the loops --------------------------------------------------------------------

    async def pump(self) -> None:
        """Feed events to the scheduler, commit, then send; forever.

        A StoreError (a commit, or a read for the messages after it) degrades the hub
        instead of ending it; while degraded the pump runs the recovery (``_recover``).
        """
        while True:
            if self.degraded is not None:
                await self._recover()
                continue
            self._pump_idle = True
            await self._woken(TICK)
            self._pump_idle = False
            self._wake.clear()
            if self.degraded is not None:
                continue  # degraded meanwhile (outbox, inbox, upload): the recovery rebuilds
            events, self._pending = self._pending, []
            waiters, self._waiters = self._waiters, []
            self._round_committed = False
            try:
                instructions = self.scheduler.handle(*events, ev.Tick(self.now()))
                await self._carry_out(instructions)
            except StoreError as exc:
                # The scheduler's memory is now ahead of the database (or its messages were
                # not all sent): nothing more of this batch goes out, the hub is degraded
                # and rebuilds its scheduler from the database once the store works again.
                if self._round_committed:
                    _settle(waiters, None)  # the change is in the database
                else:
                    _settle(waiters, StoreError(f"the change was not committed: {exc}"))
                cause = "disk full" if is_disk_full(exc) else "database"
                self.degrade(f"{cause}: {brief(exc)}")
                continue
            except BaseException as exc:
                for waiter in waiters:
                    if waiter.done():
                        continue
                    if isinstance(exc, Exception):
                        waiter.set_exception(StoreError(f"the change was not committed: {exc}"))
                    else:
                        waiter.cancel()
                raise
            _settle(waiters, None)

    async def _woken(self, timeout: float) -> None:
        """Wait until an event is submitted, or ``timeout`` seconds. Not ``wait_for``: on
        Python 3.11 it swallows a cancellation that meets a wake-up, and the hub would not
        stop."""
        if self._wake.is_set():
            return
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()

    # ---- degraded: no new work until the store and the disk take writes again -----------

    def degrade(self, cause: str) -> None:
        """Enter the degraded state (once; later causes while degraded are only logged).

        Node sessions are ended with ``internal`` (nodes keep running their tasks, keep
        results in their spool and reconnect with backoff), no node is admitted, the
        inbox and the outbox wait, admin changes are refused; the pump probes the store
        and the disk and rebuilds the scheduler from the database when both work.
        """
        if self.degraded is not None:
            log.warning("while degraded: %s", cause)
            return
        self.degraded = cause
        self.outages += 1
        self._healthy.clear()
        self.astore.fail_fast = True  # the recovery probes; readers get an error at once
        now = time.monotonic()
        if now - self._recovered_at > STEADY:
            self._probes = 0  # else it goes on from where the last outage was
        self._degraded_at = now
        sessions = list(self.sessions.values())
        log.error(
            "HUB DEGRADED: %s. Nothing uncommitted was sent. Taking no new work: inbox "
            "paused, %d node session(s) closed, new nodes refused, until the database and "
            "%s take writes again (probing with backoff).",
            cause,
            len(sessions),
            self.config.data_dir,
        )
        self.sessions.clear()  # so their ends submit no NodeLeft: the scheduler is rebuilt
        for session in sessions:
            if not session.closed:  # one that met the fault was told already
                session.end(ErrorCode.INTERNAL, self._unavailable())
        self._wake.set()

    def _unavailable(self) -> str:
        return f"the hub takes no work for now ({self.degraded}); try again later"

    async def _recover(self) -> None:
        """Probe until the store commits a small write and the data directory has room,
        then rebuild the scheduler from the database, exactly as at start-up."""
        attempts = 0
        while True:
            await asyncio.sleep(PROBE_BACKOFF.delay(self._probes))
            self._probes += 1
            attempts += 1
            try:
                await self.astore.call(self.store.probe, self.now())
                await asyncio.to_thread(self._probe_disk)
                async with self.ingest_lock:  # no inbox scan between loading and installing
                    snapshot = await self.astore.call(self.store.load_snapshot)
                    self._rebuild(snapshot)
            except (StoreError, OSError) as exc:
                log.info("still degraded (probe %d): %s", attempts, brief(exc))
                continue
            break
        took = time.monotonic() - self._degraded_at
        self._recovered_at = time.monotonic()
        log.warning(
            "HUB RECOVERED after %.1f s (%d probe(s)): scheduler rebuilt from the database "
            "(%d waiting tasks, %d live leases); taking work again",
            took,
            attempts,
            self.scheduler.waiting_count(),
            len(self.scheduler.leases),
        )

    def _probe_disk(self) -> None:
        """Write, sync and remove PROBE_BYTES in the data directory (raises OSError)."""
        path = self.config.data_dir / ".issc-space-probe"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(fd, bytes(PROBE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    def _rebuild(self, snapshot: Snapshot) -> None:
        """Leave the degraded state with a scheduler made from ``snapshot``: events that
        came meanwhile are dropped (their nodes were disconnected and say it all again)."""
        self.scheduler = Scheduler(self.scheduler.settings, snapshot, now=self.now())
        self._pending = []
        waiters, self._waiters = self._waiters, []
        _settle(waiters, StoreError(f"the change was not committed: {self.degraded}"))
        live = self.scheduler.leases.keys() | self.scheduler.past_leases.keys()
        self._declared = {lease: d for lease, d in self._declared.items() if lease in live}
        self._sweep_uploads = True
        self._offered = {pk: o for pk, o in self._offered.items() if pk in self.scheduler.tasks}
        self._bundles.clear()
        self.degraded = None
        self.astore.fail_fast = False
        self._healthy.set()
        self._export_wanted.set()
        self._wake.set()

    async def _carry_out(self, instructions: Sequence[ev.Instruction]) -> None:
        changes: list[Change] = []
        messages: list[ev.Message] = []
        for item in instructions:
            if isinstance(item, _MESSAGE_TYPES):
                messages.append(item)
            else:
                changes.append(item)
        # The payloads of every offer of the round, read in its commit's transaction: one
        # read, not one per node (thousands of nodes asking for one task each), and no
        # second trip to the store's thread.
        offered = [
            item.task_pk for m in messages if isinstance(m, ev.SendOffers) for item in m.items
        ]
        payloads: Mapping[int, OfferPayload] = {}
        if changes:
            # A failure here degrades the hub (see pump): memory is ahead of the database.
            payloads = await self.astore.call(self.store.apply, changes, offered)
            faults.point("runtime.after_commit")  # committed, nothing of it told yet
            self._round_committed = True
            self.batches += 1
            try:
                await self._log_endings(changes)
            except StoreError as exc:  # only the log lines are missing: not worth degrading
                log.warning("cannot name the tasks of ended leases for the log: %s", brief(exc))
            finished = [c for c in changes if isinstance(c, TaskFinished)]
            for done in finished:
                self._offered.pop(done.task_pk, None)  # no result of the task counts now
            if finished:
                self._export_wanted.set()
                self._count_finished(
                    sum(1 for c in finished if c.state in (TaskState.C, TaskState.F))
                )
                try:
                    if self._declared or self._sweep_uploads:
                        await asyncio.to_thread(self._discard_uploads, finished)
                except OSError as exc:  # left for the next round that finishes a task
                    log.warning("uploads: cannot remove partial uploads: %s", exc)
        elif offered:  # not made by the scheduler (an offer is a new lease), but cheap to allow
            payloads = await self.astore.call(self.store.offer_payloads, offered)
        for message in messages:
            self._deliver(message, payloads)

    def _deliver(self, message: ev.Message, payloads: Mapping[int, OfferPayload]) -> None:
        session = self.sessions.get(message.node_id)
        if session is None:
            return  # gone: its leases expire on their own
        match message:
            case ev.SendWelcome():
                session.send_welcome(message.resumed)
            case ev.SendOffers():
                self._send_offers(session, message.items, payloads)
            case ev.SendCancel():
                session.send(Cancel(leases=list(message.leases), reason=message.reason))
            case ev.SendResultAck():
                session.send(
                    ResultAck(lease=message.lease, accepted=message.accepted, reason=message.reason)
                )
            case ev.Disconnect():
                log.warning("node %s: %s; disconnecting", message.node_id, message.reason)
                session.close()

    def _send_offers(
        self,
        session: NodeSession,
        items: Sequence[ev.OfferItem],
        payloads: Mapping[int, OfferPayload],
    ) -> None:
        batch: list[TaskOffer] = []
        size = 0
        for item in items:
            task_id, input_json, files = payloads[item.task_pk]
            project = item.project
            assert project.digest is not None
            value = json.loads(input_json)
            with contextlib.suppress(ValueError, TypeError):  # else the offer cannot go either
                given = given_of(item.lease, project.name, task_id, project.digest, value, files)
                self._offered.setdefault(item.task_pk, {})[item.lease] = (given,)
            batch.append(
                TaskOffer(
                    lease=item.lease,
                    project=project.name,
                    task=task_id,
                    version=project.version,
                    digest=project.digest,
                    size=project.size,
                    input=value,
                    files=[FileRef(name=f.name, sha256=f.sha256, size=f.size) for f in files],
                )
            )
            size += len(input_json)
            if size > MAX_OFFER_BYTES:
                session.send(Offer(tasks=batch))
                batch, size = [], 0
        if batch:
            session.send(Offer(tasks=batch))

    async def _log_endings(self, changes: Sequence[Change]) -> None:
        """One log line per lease that ended other than by its result, and per failed task.

        These are the events an operator looks for (a node lost, a bundle refused, a task
        given up on); completions are counted in `issc-ctl status`, not logged one by one.
        """
        for trust in changes:
            if isinstance(trust, TrustChanged) and trust.disagreed:
                log.warning(
                    "volunteer %s is not trusted: a result of theirs disagreed with the "
                    "agreed or known answer; their results count only when confirmed",
                    trust.volunteer,
                )
        ended = [c for c in changes if isinstance(c, LeaseEnded) and c.outcome != "completed"]
        failed = [c for c in changes if isinstance(c, TaskFinished) and c.state is TaskState.F]
        if not ended and not failed:
            return
        pks = [c.task_pk for c in ended] + [c.task_pk for c in failed]
        names = await self.astore.call(self.store.task_names, pks)
        for c in ended:
            log.info(
                "lease %d of task %s on node %s (volunteer %s) ended: %s%s",
                c.lease,
                names.get(c.task_pk, c.task_pk),
                c.node_id,
                self._volunteer_of(c.node_id),
                c.outcome,
                f": {c.detail}" if c.detail else "",
            )
        for done in failed:
            log.warning(
                "task %s failed after %d attempt(s) (last node %s, volunteer %s): %s",
                names.get(done.task_pk, done.task_pk),
                done.attempts,
                done.node_id,
                done.volunteer,
                done.error,
            )

    def _volunteer_of(self, node_id: str) -> str:
        return self._volunteers.get(node_id, "?")

    def _discard_uploads(self, finished: Sequence[TaskFinished]) -> None:
        """Partial uploads of leases that can no longer deliver a result are deleted.

        Run only while some lease has declared uploads, or once after a start (uploads a
        previous run left): every upload is declared first (``upload_refusal``).
        """
        for change in finished:
            if change.lease is not None:
                self._declared.pop(change.lease, None)
        live = self.scheduler.leases.keys() | self.scheduler.past_leases.keys()
        for lease in self.uploads.leases():
            if lease not in live:
                self.uploads.discard(lease)
        self._sweep_uploads = False

    async def export_loop(self) -> None:
        """Write finished tasks to the outbox, off the event loop, coalescing requests.

        A failed export (a database error, a full disk, EIO) loses and duplicates nothing
        (hub/outbox.py): it is tried again with backoff; a full disk degrades the hub, and
        the export waits for its recovery.
        """
        self._export_wanted.set()  # whatever a crash left unexported
        failures = 0
        took = 0.0  # seconds the last export kept the store's thread
        ended = 0.0  # when it ended (perf_counter)
        while True:
            await self._export_wanted.wait()
            await self._healthy.wait()
            # While the scheduler is busy, let finished tasks gather: one export (one
            # fsync, one transaction) for many. One per commit kept the store's thread
            # from committing; a fixed wait made a lone task's result late. A pause of
            # EXPORT_PAUSE times the last export's cost since it ended leaves the thread
            # to commits at least 80 % of the time under load; an idle pump needs none.
            if not self._pump_idle or self._pending:
                pause = min(EXPORT_COALESCE, EXPORT_PAUSE * took)
                await asyncio.sleep(max(0.0, ended + pause - time.perf_counter()))
            self._export_wanted.clear()
            started = time.perf_counter()
            try:
                await self.astore.call(self.outbox.export)
            except (StoreError, OSError) as exc:
                # Nothing is lost: unexported tasks stay marked so in the database.
                failures += 1
                if is_disk_full(exc):
                    self.degrade(f"disk full: outbox: {brief(exc)}")
                elif failures == 1:
                    log.error("outbox: export failed, retrying with backoff: %s", brief(exc))
                await asyncio.sleep(_backoff(failures))
                self._export_wanted.set()
                continue
            ended = time.perf_counter()
            took = ended - started
            if failures:
                log.warning("outbox: export works again after %d failed tries", failures)
                failures = 0

    async def inbox_loop(self) -> None:
        """Read the inbox as soon as a file is completed in it (hub/dirwatch.py) and every
        INBOX_POLL seconds; not while the hub is degraded."""
        watch = DirWatch(self.inbox.inbox)
        dropped = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_events() -> None:
            if watch.read_events():
                dropped.set()

        if watch.available:
            loop.add_reader(watch.fileno(), on_events)
        try:
            await self._scan_inbox_forever(watch, dropped)
        finally:
            if watch.available:
                loop.remove_reader(watch.fileno())
            watch.close()

    async def _scan_inbox_forever(self, watch: DirWatch, dropped: asyncio.Event) -> None:
        failures = 0
        while True:
            await self._healthy.wait()
            trouble: BaseException | None = None
            async with self.ingest_lock:
                dropped.clear()
                completed = watch.take()
                try:
                    ingested = await self.astore.call(self.inbox.scan, completed)
                    trouble = self.inbox.trouble
                except (StoreError, OSError) as exc:
                    # The file that met the error stays in the inbox and is read again later.
                    ingested, trouble = [], exc
                for item in ingested:
                    if item.project is not None:
                        self._bundles.pop(item.project.digest or "", None)
                        self.submit(ev.ProjectUpdated(item.project))
                    if item.project_id is not None and item.task_pks:
                        self.submit(ev.TasksAdded(item.project_id, item.task_pks, item.expected))
            delay = INBOX_POLL
            if trouble is not None:
                failures += 1
                if is_disk_full(trouble):
                    self.degrade(f"disk full: inbox: {brief(trouble)}")
                elif failures == 1:
                    log.error("inbox: scan failed, retrying with backoff: %s", brief(trouble))
                delay = max(delay, _backoff(failures))
            elif failures:
                log.warning("inbox: reading files again after %d failed scans", failures)
                failures = 0
            if trouble is not None:
                await asyncio.sleep(delay)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dropped.wait(), delay)

    # ---- admin views ------------------------------------------------------------------

    def _count_finished(self, count: int) -> None:
        """Remember how many tasks reached C or F in this second, for tasks_per_second."""
        second = int(self.now())
        if self._finished_per_second and self._finished_per_second[-1][0] == second:
            self._finished_per_second[-1][1] += count
        else:
            self._finished_per_second.append([second, count])
        while self._finished_per_second[0][0] < second - RATE_WINDOW:
            self._finished_per_second.popleft()

    def tasks_per_second(self) -> float:
        """Tasks that reached C or F per second, over the last RATE_WINDOW seconds."""
        now = self.now()
        window = min(float(RATE_WINDOW), max(1.0, now - self.started_at))
        recent = sum(n for second, n in self._finished_per_second if second >= now - window)
        return round(recent / window, 2)

    def volunteers_live(self) -> dict[str, dict[str, Any]]:
        """Per volunteer: nodes connected now and the projects those nodes give time to."""
        out: dict[str, dict[str, Any]] = {}
        for node_id in self.sessions:
            node = self.scheduler.nodes.get(node_id)
            if node is None:
                continue
            entry = out.setdefault(node.volunteer, {"connected": 0, "projects": set()})
            entry["connected"] += 1
            entry["projects"].update(node.projects)
        return out

    def nodes_view(self) -> list[dict[str, Any]]:
        out = []
        for node_id, session in sorted(self.sessions.items()):
            node = self.scheduler.nodes.get(node_id)
            out.append(
                {
                    "node": node_id,
                    "volunteer": session.volunteer,
                    "slots": session.slots,
                    "leases": len(node.leases) if node else 0,
                    "address": session.address,
                    "via": session.via,
                    "last_seen_seconds_ago": round(self.now() - node.last_seen, 1)
                    if node
                    else None,
                }
            )
        return out


def _settle(waiters: Sequence[asyncio.Future[None]], error: Exception | None) -> None:
    """Resolve submit_and_wait callers: committed (``error`` None) or not."""
    for waiter in waiters:
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)


def _backoff(failures: int) -> float:
    """Seconds before the next try after ``failures`` failures in a row (with jitter)."""
    return RETRY_BACKOFF.delay(failures)
