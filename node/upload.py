"""Sending results to the hub: output files first (``upload``), then the ``result``.

For each output file of a spooled result, one at a time, the node sends ``upload`` with
empty data at offset 0 (a probe); the hub answers ``upload_ack`` with how many bytes it
holds durably, and every chunk (at most 1 MiB, from that count) is answered likewise.
When every file is complete (the hub's count equals the size, its digest checked), the
``result`` listing the files is sent. If the hub answers the result with an
``upload_ack`` for a file it lacks, that file is uploaded again from the count it gives,
and the result is sent again after. A result without files is sent at once.

The hub's word is checked, never trusted beyond the file: a count over the file's size
restarts the file at 0. A count that goes backwards, or a chunk the hub did not take, is
a setback; after ``max_setbacks`` of them for one file the node stops (the hub keeps
losing or refusing the data) and sends the result as a failure saying so, so that
neither side loops forever.

State lives per connection: ``detach`` forgets everything and the node resubmits its
spool after the next ``welcome``, where every file starts again with a probe.

Every result travels with an HMAC under the connection's result key (issc.resultmac).
When it is spooled, the record gets the SHA-256 of its transcript (hex,
``"transcript"``) and keeps what the node was given under the lease (``"given"``:
bundle digest, input digest, input files): each connection the result is sent over
authenticates that digest with its own key, and a result turned into a failure here is
digested anew.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from issc.protocol import BUNDLE_CHUNK_SIZE, FileRef, Message, Result, TaskOffer, Upload, UploadAck
from issc.resultmac import Given, files_of, json_digest, result_mac, returned_of, transcript_digest
from node.transfer import Send

log = logging.getLogger(__name__)

MAX_SETBACKS = 3


@dataclass(slots=True)
class _File:
    ref: FileRef
    path: Path
    held: int | None = None  # what the hub last said it holds; None before its first answer
    setbacks: int = 0

    @property
    def complete(self) -> bool:
        return self.held == self.ref.size


@dataclass(slots=True)
class _Pending:
    """One result on its way: its spool record and its files."""

    record: dict[str, Any]
    files: dict[str, _File] = field(default_factory=dict)
    waiting: str | None = None  # the file whose upload_ack is awaited
    waiting_chunk: bool = False  # ... for a chunk (True) or a probe (False)
    result_sent: bool = False


class Uploader:
    """Uploads the files of results and sends the results, over the current connection."""

    def __init__(
        self,
        *,
        chunk_size: int = BUNDLE_CHUNK_SIZE,
        max_setbacks: int = MAX_SETBACKS,
        node_id: str = "",
    ) -> None:
        self.chunk_size = chunk_size
        self.max_setbacks = max_setbacks
        self.node_id = node_id  # digests the failure a result becomes when its files cannot go
        self._send: Send | None = None
        self._key = b""  # the connection's result key
        self._pending: dict[int, _Pending] = {}

    def attach(self, send: Send, key: bytes) -> None:
        """Send over ``send`` from now on, results authenticated with the connection's
        result ``key`` (then ``submit`` the spool)."""
        self._send, self._key = send, key
        self._pending.clear()

    def detach(self) -> None:
        """The connection is gone: forget every upload in progress."""
        self._send = None
        self._pending.clear()

    def submit(self, record: dict[str, Any], files_dir: Path) -> None:
        """Start delivering a spooled result whose files are in ``files_dir``.

        Without a connection this does nothing: the spool is resubmitted after ``welcome``.
        A result already on its way starts over.
        """
        if self._send is None:
            return
        if "transcript" not in record and "given" in record:  # spooled by an older node
            with contextlib.suppress(ValueError, KeyError, TypeError):
                seal_record(self.node_id, record)
        pending = _Pending(record)
        for entry in record["files"]:
            ref = FileRef(name=entry["name"], sha256=entry["sha256"], size=entry["size"])
            pending.files[ref.name] = _File(ref, files_dir / ref.name)
        self._pending[record["lease"]] = pending
        self._advance(pending)

    def forget(self, lease: int) -> None:
        """The hub acknowledged the result (or the lease was cancelled)."""
        self._pending.pop(lease, None)

    def on_ack(self, ack: UploadAck) -> None:
        """Take the hub's count for one file and send what comes next."""
        pending = self._pending.get(ack.lease)
        if pending is None or (upload := pending.files.get(ack.name)) is None:
            return  # a result already acknowledged, failed, or from before a reconnect
        size = upload.ref.size
        answers_chunk = pending.waiting == ack.name and pending.waiting_chunk
        received = ack.received
        setback = False
        if received > size:
            log.warning(
                "lease %d: hub claims %d bytes of %s, which has %d; starting it again",
                ack.lease,
                received,
                ack.name,
                size,
            )
            received, setback = 0, True
        elif upload.held is not None:
            setback = received < upload.held or (answers_chunk and received == upload.held)
        if setback:
            upload.setbacks += 1
            if upload.setbacks >= self.max_setbacks:
                self._give_up(pending, upload)
                return
        upload.held = received
        if pending.waiting == ack.name:
            pending.waiting = None
        if pending.result_sent and not upload.complete:
            log.info("lease %d: the hub lacks %s; uploading it again", ack.lease, ack.name)
            pending.result_sent = False  # sent again once the file is complete
        self._advance(pending)

    def _advance(self, pending: _Pending) -> None:
        """Send the next probe or chunk, or the result once every file is complete."""
        if self._send is None or pending.waiting is not None or pending.result_sent:
            return
        lease = pending.record["lease"]
        for upload in pending.files.values():
            if upload.complete:
                continue
            offset = upload.held or 0
            data = b""
            if upload.held is not None:
                length = min(self.chunk_size, upload.ref.size - offset)
                try:
                    data = _read(upload.path, offset, length)
                except OSError as exc:
                    self._give_up(pending, upload, f"lost from the node's spool ({exc.strerror})")
                    return
                if len(data) != length:
                    self._give_up(pending, upload, "shorter in the node's spool than recorded")
                    return
            ref = upload.ref
            self._send(
                Upload(
                    lease=lease,
                    name=ref.name,
                    sha256=ref.sha256,
                    size=ref.size,
                    offset=offset,
                    data=data,
                )
            )
            pending.waiting, pending.waiting_chunk = ref.name, upload.held is not None
            return
        pending.result_sent = True
        self._send(result_message(pending.record, self._key))

    def _give_up(self, pending: _Pending, upload: _File, why: str | None = None) -> None:
        """Send the result as a failure: its files cannot be delivered."""
        reason = why or f"the hub lost or refused its data {upload.setbacks} times"
        error = f"output file {upload.ref.name} could not be uploaded: {reason}"
        log.error("lease %d: %s", pending.record["lease"], error)
        failed = {**pending.record, "ok": False, "result": None, "error": error, "files": []}
        # The digest was of the result; the failure needs its own, or the hub refuses it.
        failed.pop("transcript", None)
        if "given" in failed:
            seal_record(self.node_id, failed)
        pending.record, pending.files, pending.waiting = failed, {}, None
        pending.result_sent = True
        if self._send is not None:
            self._send(result_message(failed, self._key))


def given_record(offer: TaskOffer) -> dict[str, Any]:
    """What the node was given under ``offer``, as its spool record keeps it (``"given"``)."""
    return {
        "digest": offer.digest,
        "input_digest": json_digest(offer.input),
        "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in offer.files],
    }


def seal_record(node_id: str, record: dict[str, Any]) -> None:
    """Digest a spool record's result as it will travel: sets ``record["transcript"]``
    (hex SHA-256 of issc.resultmac's transcript).

    ``record`` holds the fields of ``result`` and ``"given"`` (given_record).

    Raises:
        ValueError: a string in it is not UTF-8 (a lone surrogate): it could not travel.
    """
    given = record["given"]
    digest = transcript_digest(
        node_id,
        Given(
            record["lease"],
            record["project"],
            record["task"],
            given["digest"],
            given["input_digest"],
            files_of(given["files"]),
        ),
        returned_of(
            record["ok"],
            record["result"],
            record["error"],
            record["cpu_seconds"],
            record["wall_seconds"],
            record["files"],
        ),
    )
    record["transcript"] = digest.hex()


def result_message(record: dict[str, Any], key: bytes) -> Message:
    """The ``result`` message of a spool record, authenticated with the connection's
    result ``key``.

    A record without its transcript digest (spooled by a node from before results were
    authenticated this way) goes with an empty HMAC, which the hub refuses: the task is
    given back and run again.
    """
    files = [FileRef(name=f["name"], sha256=f["sha256"], size=f["size"]) for f in record["files"]]
    try:
        mac = result_mac(key, bytes.fromhex(record["transcript"]))
    except (KeyError, TypeError, ValueError):
        log.warning(
            "lease %d: the spooled result has no transcript digest; the hub will refuse it",
            record["lease"],
        )
        mac = b""
    return Result(
        lease=record["lease"],
        project=record["project"],
        task=record["task"],
        ok=record["ok"],
        result=record["result"],
        error=record["error"],
        cpu_seconds=record["cpu_seconds"],
        wall_seconds=record["wall_seconds"],
        files=files,
        mac=mac,
    )


def _read(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes of a spooled output file from ``offset`` (fewer at its end).

    Raises OSError if it cannot be read, or is a symlink (never followed: the spool holds
    only what the executor copied there).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
