"""The hub's content store, upload area and input resolution: real files, no event loop."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from hub.blobs import ContentStore, FileStoreError, UploadArea
from hub.inputs import InputResolver
from hub.store import TaskEntry
from issc.errors import TaskFileError

DATA = b"the quick brown fox " * 5000  # 100 kB
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "files")


def test_add_file_stores_by_digest_once_and_read_only(store: ContentStore, tmp_path: Path) -> None:
    source = tmp_path / "a.txt"
    source.write_bytes(DATA)
    assert store.add_file(source) == (SHA, len(DATA))
    copy = tmp_path / "b.txt"
    copy.write_bytes(DATA)
    assert store.add_file(copy) == (SHA, len(DATA))
    assert store.path(SHA).read_bytes() == DATA
    assert store.path(SHA).stat().st_mode & 0o777 == 0o444
    assert list((tmp_path / "files" / "tmp").iterdir()) == []  # no temp file left


def test_add_file_refuses_an_oversized_file(store: ContentStore, tmp_path: Path) -> None:
    source = tmp_path / "big"
    source.write_bytes(DATA)
    with pytest.raises(FileStoreError, match="larger than the 1000-byte limit"):
        store.add_file(source, max_size=1000)
    assert list((tmp_path / "files").rglob("*")) == [tmp_path / "files" / "tmp"]


def test_read_serves_chunks_and_refuses_unknown_files(store: ContentStore, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(DATA)
    store.add_file(tmp_path / "a")
    assert store.read(SHA, 0, 10) == (len(DATA), DATA[:10])
    assert store.read(SHA, len(DATA) - 3) == (len(DATA), DATA[-3:])
    assert store.read(SHA, len(DATA) + 1) is None
    assert store.read("0" * 64, 0) is None
    assert store.read("../../etc/passwd", 0) is None


def upload_in_chunks(area: UploadArea, data: bytes, sha: str, start: int, stop: int) -> int:
    held = area.received(7, "out.bin", sha, len(data))
    while held < min(stop, len(data)):
        held = area.write(7, "out.bin", sha, len(data), held, data[held : held + 4096])
    return held


def test_upload_cut_and_resumed_lands_in_the_store(store: ContentStore, tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads", store)
    assert upload_in_chunks(area, DATA, SHA, 0, 50_000) >= 50_000
    # The connection is cut; a new area (a restarted hub) sees what was held durably.
    area = UploadArea(tmp_path / "uploads", store)
    held = area.received(7, "out.bin", SHA, len(DATA))
    assert 50_000 <= held < len(DATA)
    assert upload_in_chunks(area, DATA, SHA, held, len(DATA)) == len(DATA)
    assert store.path(SHA).read_bytes() == DATA
    assert not (tmp_path / "uploads" / "7" / "out.bin.part").exists()


def test_upload_chunk_at_the_wrong_offset_is_ignored(store: ContentStore, tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads", store)
    assert area.write(7, "out.bin", SHA, len(DATA), 0, DATA[:100]) == 100
    assert area.write(7, "out.bin", SHA, len(DATA), 50, DATA[50:150]) == 100  # overlap
    assert area.write(7, "out.bin", SHA, len(DATA), 200, DATA[200:300]) == 100  # gap
    assert area.write(7, "out.bin", SHA, 150, 100, DATA[100:300]) == 100  # past the size


def test_upload_with_a_digest_mismatch_is_discarded(store: ContentStore, tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads", store)
    wrong = hashlib.sha256(b"something else").hexdigest()
    assert area.write(7, "out.bin", wrong, 100, 0, DATA[:100]) == 0
    assert store.size(wrong) is None
    assert area.received(7, "out.bin", wrong, 100) == 0


def test_upload_of_content_the_store_has_needs_no_bytes(
    store: ContentStore, tmp_path: Path
) -> None:
    (tmp_path / "a").write_bytes(DATA)
    store.add_file(tmp_path / "a")
    area = UploadArea(tmp_path / "uploads", store)
    assert area.received(9, "same.txt", SHA, len(DATA)) == len(DATA)


def entry(*files: tuple[str, str]) -> TaskEntry:
    return TaskEntry("t-1", "{}", 4, file_paths=files)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    (tmp_path / "inbox" / "texts").mkdir(parents=True)
    (tmp_path / "inbox" / "texts" / "a.txt").write_bytes(DATA)
    (tmp_path / "inbox" / "stop.txt").write_bytes(b"the\n")
    return tmp_path / "inbox"


def test_inputs_resolve_into_the_store_once_per_path(inbox: Path, store: ContentStore) -> None:
    resolver = InputResolver(inbox, store)
    first = resolver.resolve(entry(("text", "texts/a.txt"), ("stop", "stop.txt")))
    second = resolver.resolve(entry(("text", "texts/a.txt")))
    assert [(f.name, f.sha256, f.size) for f in first.files] == [
        ("text", SHA, len(DATA)),
        ("stop", hashlib.sha256(b"the\n").hexdigest(), 4),
    ]
    assert second.files == first.files[:1]
    assert sorted(resolver.used) == ["stop.txt", "texts/a.txt"]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("missing.txt", "does not exist"),
        ("../outside.txt", "must not leave"),
        ("/etc/passwd", "must be a relative path"),
        ("texts", "is not a regular file"),
        ("link.txt", "is a symbolic link"),
        ("texts\\a.txt", "must be a relative path"),
        ("accepted/old.txt", "accepted/ or rejected/"),
    ],
)
def test_bad_input_paths_are_refused_with_the_line(
    inbox: Path, store: ContentStore, tmp_path: Path, path: str, reason: str
) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", inbox / "link.txt")
    with pytest.raises(TaskFileError, match=reason) as caught:
        InputResolver(inbox, store).resolve(entry(("x", path)))
    assert caught.value.line == 4
    assert "input file x" in str(caught.value)
