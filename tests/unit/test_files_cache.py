"""The node's input-file cache: chunked, resumable downloads checked by SHA-256, and eviction."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from issc.errors import FileTransferError
from node.files import MAX_INPUT_FILE_SIZE, DigestMismatchError, FileCache
from node.transfer import append_part

DATA = bytes(range(256)) * 40  # 10 240 bytes
SHA = hashlib.sha256(DATA).hexdigest()
DAY = 86400.0


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path) -> FileCache:
    return FileCache(tmp_path / "files", max_bytes=10**9, max_age=14 * DAY)


def download(cache: FileCache, data: bytes, *, chunk: int = 4096, start: int = 0) -> bool:
    """Feed ``data`` from ``start`` in chunks; True once complete."""
    sha, offset, complete = sha_of(data), start, False
    while offset < len(data) or not complete:
        piece = data[offset : offset + chunk]
        complete = cache.append_chunk(sha, offset, len(data), piece, size=len(data))
        offset += len(piece)
    return complete


def cached(cache: FileCache, data: bytes, mtime: float) -> Path:
    """``data`` downloaded and finished, last used at ``mtime``."""
    download(cache, data)
    path = cache.finish(sha_of(data))
    os.utime(path, (mtime, mtime))
    return path


# ---- downloading ------------------------------------------------------------------------


def test_a_cut_download_keeps_its_part_and_resumes_at_its_length(tmp_path: Path) -> None:
    first = FileCache(tmp_path / "files", max_bytes=10**9, max_age=DAY)
    assert first.partial_size(SHA) == 0
    assert first.append_chunk(SHA, 0, len(DATA), DATA[:4096], size=len(DATA)) is False
    assert first.append_chunk(SHA, 4096, len(DATA), DATA[4096:6000], size=len(DATA)) is False
    # The node restarts: a new cache object over the same directory resumes from the part.
    again = FileCache(tmp_path / "files", max_bytes=10**9, max_age=DAY)
    assert again.partial_size(SHA) == 6000
    assert again.path(SHA) is None  # nothing is used before it checks
    assert again.append_chunk(SHA, 6000, len(DATA), DATA[6000:], size=len(DATA)) is True
    path = again.finish(SHA)
    assert path == tmp_path / "files" / SHA
    assert path.read_bytes() == DATA
    assert again.partial_size(SHA) == 0
    assert again.path(SHA) == path
    assert path.stat().st_mode & 0o777 == 0o444


def test_an_out_of_order_chunk_is_refused_and_the_part_kept(cache: FileCache) -> None:
    cache.append_chunk(SHA, 0, len(DATA), DATA[:100], size=len(DATA))
    for offset in (0, 50, 101, 5000):
        with pytest.raises(FileTransferError, match="does not follow the 100 bytes"):
            cache.append_chunk(SHA, offset, len(DATA), DATA[offset : offset + 10], size=len(DATA))
    assert cache.partial_size(SHA) == 100
    assert download(cache, DATA, start=100)
    assert cache.finish(SHA).read_bytes() == DATA


def test_a_chunk_past_the_offered_size_is_refused(cache: FileCache) -> None:
    cache.append_chunk(SHA, 0, len(DATA), DATA[:10000], size=len(DATA))
    with pytest.raises(FileTransferError, match="runs past"):
        cache.append_chunk(SHA, 10000, len(DATA), DATA[10000:] + b"extra", size=len(DATA))
    assert cache.partial_size(SHA) == 10000


def test_an_empty_chunk_before_the_end_is_refused(cache: FileCache) -> None:
    # Answered by asking for the same offset again, it would loop forever.
    with pytest.raises(FileTransferError, match="empty chunk"):
        cache.append_chunk(SHA, 0, len(DATA), b"", size=len(DATA))


def test_a_total_other_than_the_offered_size_is_refused_and_the_part_dropped(
    cache: FileCache,
) -> None:
    cache.append_chunk(SHA, 0, len(DATA), DATA[:100], size=len(DATA))
    with pytest.raises(FileTransferError, match=f"sends {len(DATA) + 1} bytes; the offer said"):
        cache.append_chunk(SHA, 100, len(DATA) + 1, DATA[100:200], size=len(DATA))
    assert cache.partial_size(SHA) == 0


def test_a_file_over_the_one_gib_cap_is_refused(cache: FileCache) -> None:
    huge = MAX_INPUT_FILE_SIZE + 1
    with pytest.raises(FileTransferError, match="exceed the input file limit"):
        cache.append_chunk(SHA, 0, huge, b"x", size=huge)
    assert cache.partial_size(SHA) == 0
    assert not any(cache.directory.iterdir())


def test_the_shared_appender_refuses_a_total_over_its_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exceed the limit of 10 bytes"):
        append_part(tmp_path / "x.part", 0, 11, b"a", limit=10)
    assert not (tmp_path / "x.part").exists()


def test_a_digest_mismatch_discards_the_download(cache: FileCache) -> None:
    wrong = b"x" * len(DATA)
    offset = 0
    while offset < len(wrong):
        cache.append_chunk(SHA, offset, len(wrong), wrong[offset : offset + 4096], size=len(wrong))
        offset += 4096
    with pytest.raises(DigestMismatchError, match="discarded"):
        cache.finish(SHA)
    assert cache.partial_size(SHA) == 0
    assert cache.path(SHA) is None
    assert not any(cache.directory.iterdir())


def test_an_empty_file_downloads_in_one_empty_chunk(cache: FileCache) -> None:
    empty = sha_of(b"")
    assert cache.append_chunk(empty, 0, 0, b"", size=0) is True
    assert cache.finish(empty).read_bytes() == b""


def test_a_digest_that_is_not_hex_never_becomes_a_path(cache: FileCache) -> None:
    for bad in ("../../identity.json", "A" * 64, SHA[:-1], SHA + "0", ""):
        with pytest.raises(FileTransferError, match="not a SHA-256"):
            cache.path(bad)
        with pytest.raises(FileTransferError, match="not a SHA-256"):
            cache.append_chunk(bad, 0, 1, b"x", size=1)


# ---- eviction ---------------------------------------------------------------------------


def test_least_recently_used_files_go_first_beyond_the_size_cap(tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "files", max_bytes=2500, max_age=14 * DAY)
    now = 1_000_000_000.0
    files = [bytes([n]) * 1000 for n in range(4)]
    for age, data in zip((4, 3, 2, 1), files, strict=True):  # files[0] least recently used
        cached(cache, data, now - age * 60)
    removed = cache.evict(now)
    assert sorted(removed) == sorted([sha_of(files[0]), sha_of(files[1])])
    assert [cache.path(sha_of(data)) is not None for data in files] == [False, False, True, True]


def test_using_a_file_touches_it_so_it_is_kept(tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "files", max_bytes=1500, max_age=14 * DAY)
    old, new = b"o" * 1000, b"n" * 1000
    now = 1_000_000_000.0
    cached(cache, old, now - 600)
    cached(cache, new, now - 60)
    used = cache.path(sha_of(old))  # a task uses the older file now
    assert used is not None
    assert used.stat().st_mtime > now
    cache.evict()
    assert cache.path(sha_of(old)) is not None
    assert cache.path(sha_of(new)) is None


def test_files_unused_for_max_age_are_evicted_even_under_the_size_cap(tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "files", max_bytes=10**9, max_age=2 * DAY)
    now = 1_000_000_000.0
    stale, fresh = b"s" * 10, b"f" * 10
    cached(cache, stale, now - 3 * DAY)
    cached(cache, fresh, now - 1 * DAY)
    cache.append_chunk(SHA, 0, len(DATA), DATA[:10], size=len(DATA))
    part = cache.directory / f"{SHA}.part"
    os.utime(part, (now - 3 * DAY, now - 3 * DAY))  # an abandoned download
    assert sorted(cache.evict(now)) == sorted([sha_of(stale), f"{SHA}.part"])
    assert cache.path(sha_of(fresh)) is not None


def test_pinned_files_survive_eviction_by_size_and_by_age(tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "files", max_bytes=1000, max_age=DAY)
    now = 1_000_000_000.0
    a, b, c = b"a" * 800, b"b" * 800, b"c" * 800
    cached(cache, a, now - 5 * DAY)  # too old
    cached(cache, b, now - 120)  # least recently used of the fresh ones
    cached(cache, c, now - 60)
    with cache.pinned([sha_of(a), sha_of(b)]):
        cache.pin(sha_of(b))  # a second task uses b as well
        assert cache.evict(now) == [sha_of(c)]  # the pinned 1600 bytes leave no room for c
        cache.unpin(sha_of(b))
        assert cache.evict(now) == []  # b is still pinned once
    assert cache.evict(now) == [sha_of(a)]  # unpinned: too old; b fits the cap alone
    assert [p.name for p in cache.directory.iterdir()] == [sha_of(b)]
