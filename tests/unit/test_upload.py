"""Uploading output files before their result, driven by hand-fed upload_acks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from issc.errors import AuthError
from issc.protocol import FileRef, Message, Result, TaskOffer, Upload, UploadAck
from issc.resultmac import (
    Given,
    Returned,
    check_result_mac,
    given_of,
    returned_of,
    transcript_digest,
)
from node.identity import NodeIdentity
from node.upload import Uploader, given_record, result_message, seal_record

CHUNK = 1000
LEASE = 7
IDENTITY = NodeIdentity._of(Ed25519PrivateKey.from_private_bytes(b"\x41" * 32), Path("node.key"))
KEY = b"\x42" * 32  # the connection's result key
OFFER = TaskOffer(
    lease=LEASE,
    project="p",
    task="t-1",
    version=1,
    digest="d" * 64,
    size=100,
    input={"text": "three small words"},
    files=[FileRef(name="in.txt", sha256="e" * 64, size=17)],
)


class Link:
    """What the uploader sends, and acks fed back to it."""

    def __init__(self, uploader: Uploader) -> None:
        self.uploader = uploader
        self.sent: list[Message] = []
        uploader.attach(self.sent.append, KEY)

    def ack(self, name: str, received: int, lease: int = LEASE) -> None:
        self.uploader.on_ack(UploadAck(lease=lease, name=name, received=received))

    def last(self) -> Message:
        return self.sent[-1]

    def take(self) -> list[Message]:
        sent = list(self.sent)
        self.sent.clear()  # in place: the uploader holds this list's append
        return sent


def upload(name: str, size: int, offset: int, data: bytes) -> Upload:
    return Upload(
        lease=LEASE,
        name=name,
        sha256=hashlib.sha256(FILES[name]).hexdigest(),
        size=size,
        offset=offset,
        data=data,
    )


FILES = {"big.bin": bytes(range(250)) * 10, "small.txt": b"hello\n"}  # 2500 and 6 bytes


def make_record(files_dir: Path, names: tuple[str, ...] = ("big.bin", "small.txt")) -> Any:
    files_dir.mkdir(exist_ok=True)
    entries = []
    for name in names:
        (files_dir / name).write_bytes(FILES[name])
        entries.append(
            {
                "name": name,
                "sha256": hashlib.sha256(FILES[name]).hexdigest(),
                "size": len(FILES[name]),
            }
        )
    record = {
        "lease": LEASE,
        "project": "p",
        "task": "t-1",
        "ok": True,
        "result": {"words": 3},
        "error": None,
        "cpu_seconds": 0.5,
        "wall_seconds": 0.75,
        "files": entries,
        "given": given_record(OFFER),
    }
    seal_record(IDENTITY.node_id, record)
    return record


def refs(record: Any) -> list[FileRef]:
    return [FileRef(**entry) for entry in record["files"]]


@pytest.fixture
def uploader() -> Uploader:
    return Uploader(chunk_size=CHUNK, max_setbacks=3, node_id=IDENTITY.node_id)


def given_and_returned(result: Result) -> tuple[Given, Returned]:
    """What the hub would rebuild for IDENTITY's ``result`` of OFFER."""
    given = given_of(LEASE, "p", "t-1", OFFER.digest, OFFER.input, OFFER.files)
    returned = returned_of(
        result.ok,
        result.result,
        result.error,
        result.cpu_seconds,
        result.wall_seconds,
        result.files,
    )
    return given, returned


def verify(result: Message) -> None:
    """Raise AuthError unless ``result`` is IDENTITY's result for OFFER, as sent,
    authenticated with KEY."""
    assert isinstance(result, Result)
    digest = transcript_digest(IDENTITY.node_id, *given_and_returned(result))
    check_result_mac(KEY, result.mac, digest)


def test_probe_then_chunks_then_the_result_listing_the_files(
    tmp_path: Path, uploader: Uploader
) -> None:
    link = Link(uploader)
    record = make_record(tmp_path / "out")
    big, small = FILES["big.bin"], FILES["small.txt"]
    uploader.submit(record, tmp_path / "out")
    assert link.take() == [upload("big.bin", 2500, 0, b"")]  # how much does the hub hold?
    link.ack("big.bin", 0)
    assert link.take() == [upload("big.bin", 2500, 0, big[:1000])]
    link.ack("big.bin", 1000)
    assert link.take() == [upload("big.bin", 2500, 1000, big[1000:2000])]
    link.ack("big.bin", 2000)
    assert link.take() == [upload("big.bin", 2500, 2000, big[2000:])]
    link.ack("big.bin", 2500)
    assert link.take() == [upload("small.txt", 6, 0, b"")]  # one file at a time
    link.ack("small.txt", 0)
    assert link.take() == [upload("small.txt", 6, 0, small)]
    link.ack("small.txt", 6)
    sent = link.take()
    assert len(sent) == 1 and isinstance(sent[0], Result)
    assert sent[0].files == refs(record)
    assert (sent[0].ok, sent[0].result, sent[0].lease) == (True, {"words": 3}, LEASE)
    verify(sent[0])
    assert (
        transcript_digest(IDENTITY.node_id, *given_and_returned(sent[0])).hex()
        == record["transcript"]
    )


def test_files_the_hub_already_holds_are_not_sent_again(tmp_path: Path, uploader: Uploader) -> None:
    link = Link(uploader)
    uploader.submit(make_record(tmp_path / "out"), tmp_path / "out")
    link.take()
    link.ack("big.bin", 2500)
    assert link.take() == [upload("small.txt", 6, 0, b"")]
    link.ack("small.txt", 6)
    assert isinstance(link.last(), Result)


def test_a_result_without_files_is_sent_at_once(tmp_path: Path, uploader: Uploader) -> None:
    link = Link(uploader)
    record = make_record(tmp_path / "out", names=())
    uploader.submit(record, tmp_path / "out")
    sent = link.take()
    assert len(sent) == 1 and isinstance(sent[0], Result) and sent[0].files == []


def test_nothing_is_sent_without_a_connection(tmp_path: Path, uploader: Uploader) -> None:
    uploader.submit(make_record(tmp_path / "out"), tmp_path / "out")  # before any attach
    link = Link(uploader)
    assert link.sent == []  # the client resubmits its spool after welcome


def test_after_a_cut_the_upload_resumes_at_the_count_the_hub_reports(
    tmp_path: Path, uploader: Uploader
) -> None:
    first = Link(uploader)
    record = make_record(tmp_path / "out")
    uploader.submit(record, tmp_path / "out")
    first.ack("big.bin", 0)
    first.ack("big.bin", 1000)
    assert first.last() == upload("big.bin", 2500, 1000, FILES["big.bin"][1000:2000])
    uploader.detach()  # that chunk never arrived
    first.ack("big.bin", 2000)  # a stray ack from the old connection changes nothing
    second = Link(uploader)
    uploader.submit(record, tmp_path / "out")
    assert second.take() == [upload("big.bin", 2500, 0, b"")]
    second.ack("big.bin", 1000)
    assert second.take() == [upload("big.bin", 2500, 1000, FILES["big.bin"][1000:2000])]


def test_a_count_beyond_the_file_size_restarts_the_file_at_zero(
    tmp_path: Path, uploader: Uploader
) -> None:
    link = Link(uploader)
    uploader.submit(make_record(tmp_path / "out"), tmp_path / "out")
    link.take()
    link.ack("big.bin", 10**12)
    assert link.take() == [upload("big.bin", 2500, 0, FILES["big.bin"][:1000])]


def test_a_file_the_hub_lacks_after_the_result_is_uploaded_again_then_the_result_resent(
    tmp_path: Path, uploader: Uploader
) -> None:
    link = Link(uploader)
    record = make_record(tmp_path / "out")
    uploader.submit(record, tmp_path / "out")
    link.ack("big.bin", 2500)
    link.ack("small.txt", 6)
    assert isinstance(link.last(), Result)
    link.take()
    link.ack("big.bin", 1500)  # the hub's answer to the result: it holds 1500 bytes of big.bin
    assert link.take() == [upload("big.bin", 2500, 1500, FILES["big.bin"][1500:2500])]
    link.ack("big.bin", 2500)
    sent = link.take()
    assert len(sent) == 1 and isinstance(sent[0], Result) and sent[0].files == refs(record)
    link.ack("small.txt", 6)  # an ack for a complete file: nothing more to do
    assert link.sent == []


def test_a_hub_that_keeps_refusing_the_bytes_gets_a_failed_result(
    tmp_path: Path, uploader: Uploader
) -> None:
    link = Link(uploader)
    uploader.submit(make_record(tmp_path / "out"), tmp_path / "out")
    link.ack("big.bin", 0)
    for _ in range(2):  # each chunk answered "0 bytes held": a setback, sent again
        link.ack("big.bin", 0)
        assert link.last() == upload("big.bin", 2500, 0, FILES["big.bin"][:1000])
    link.take()
    link.ack("big.bin", 0)  # the third setback
    sent = link.take()
    assert len(sent) == 1 and isinstance(sent[0], Result)
    assert sent[0].ok is False and sent[0].files == [] and sent[0].result is None
    assert "output file big.bin could not be uploaded" in (sent[0].error or "")
    verify(sent[0])  # digested anew: the failure is the node's word too
    link.ack("big.bin", 0)
    assert link.sent == []


def test_an_output_file_lost_from_the_spool_fails_the_result_naming_it(
    tmp_path: Path, uploader: Uploader
) -> None:
    link = Link(uploader)
    uploader.submit(make_record(tmp_path / "out"), tmp_path / "out")
    (tmp_path / "out" / "big.bin").unlink()
    (tmp_path / "out" / "big.bin").symlink_to(tmp_path / "secret")  # never followed
    (tmp_path / "secret").write_bytes(b"s" * 2500)
    link.ack("big.bin", 0)
    sent = link.take()
    assert isinstance(sent[-1], Result) and sent[-1].ok is False
    assert sent[-1].error is not None and "big.bin" in sent[-1].error
    assert not any(isinstance(m, Upload) and m.data for m in sent)


def test_an_acknowledged_result_is_forgotten(tmp_path: Path, uploader: Uploader) -> None:
    link = Link(uploader)
    uploader.submit(make_record(tmp_path / "out"), tmp_path / "out")
    uploader.forget(LEASE)
    link.take()
    link.ack("big.bin", 0)
    assert link.sent == []


def test_a_sealed_record_survives_the_spool_and_a_tampered_one_does_not_verify(
    tmp_path: Path,
) -> None:
    record = make_record(tmp_path / "out", names=())
    spooled = json.loads(json.dumps(record))  # what a restarted node reads back
    message = result_message(spooled, KEY)
    verify(message)
    assert message == result_message(record, KEY)
    with pytest.raises(AuthError):
        verify(result_message({**spooled, "result": {"words": 4}}, KEY))
    with pytest.raises(AuthError):
        verify(result_message({**spooled, "cpu_seconds": 0.25}, KEY))


def test_a_record_spooled_without_what_was_given_goes_without_a_mac(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = make_record(tmp_path / "out", names=())
    del record["transcript"], record["given"]
    message = result_message(record, KEY)
    assert isinstance(message, Result) and message.mac == b""
    assert "no transcript digest" in caplog.text


def test_a_record_spooled_by_an_older_node_is_digested_when_sent(
    tmp_path: Path, uploader: Uploader
) -> None:
    link = Link(uploader)
    record = make_record(tmp_path / "out", names=())
    del record["transcript"]
    record["signature"] = "00" * 64  # what results carried before
    uploader.submit(record, tmp_path / "out")
    verify(link.take()[0])
