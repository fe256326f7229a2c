"""Input-file downloads over a fake connection: chunks, resumption, stalls, retries, sharing."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from issc.errors import BundleError, FileTransferError
from issc.protocol import FetchFile, FileChunk, FileRef, Message
from node.cache import BundleCache
from node.fetch import BundleFetcher, InputFetcher
from node.files import FileCache

pytestmark = pytest.mark.timeout(10)

DATA = bytes(range(256)) * 20  # 5120 bytes: six chunks of 1000
SHA = hashlib.sha256(DATA).hexdigest()
REF = FileRef(name="data.bin", sha256=SHA, size=len(DATA))
CHUNK = 1000
STALL = 0.05


class FakeHub:
    """Answers fetch_file from ``content`` a moment later, unless told otherwise."""

    def __init__(self, fetcher: InputFetcher, content: dict[str, bytes]) -> None:
        self.fetcher = fetcher
        self.content = content
        self.sent: list[Message] = []
        self.answers_left: int | None = None  # None: answer everything
        self.drop: Callable[[FetchFile], bool] = lambda ask: False
        self.repeat = False  # answer every fetch twice (a late duplicate)

    def send(self, message: Message) -> None:
        self.sent.append(message)
        if not isinstance(message, FetchFile) or self.drop(message):
            return
        if self.answers_left is not None:
            if self.answers_left == 0:
                return
            self.answers_left -= 1
        loop = asyncio.get_running_loop()
        loop.call_soon(self.answer, message)
        if self.repeat:  # the duplicate arrives once the first answer moved the download on
            loop.call_soon(self.answer, message)

    def answer(self, ask: FetchFile) -> None:
        data = self.content[ask.sha256]
        piece = data[ask.offset : ask.offset + CHUNK]
        self.fetcher.on_chunk(
            FileChunk(sha256=ask.sha256, offset=ask.offset, total=len(data), data=piece)
        )

    def offsets(self) -> list[int]:
        return [m.offset for m in self.sent if isinstance(m, FetchFile)]


@pytest.fixture
def cache(tmp_path: Path) -> FileCache:
    return FileCache(tmp_path / "files", max_bytes=10**9, max_age=86400.0)


@pytest.fixture
def fetcher(cache: FileCache) -> InputFetcher:
    return InputFetcher(cache, stall_seconds=STALL, max_stalls=2)


def connect(fetcher: InputFetcher, content: dict[str, bytes] | None = None) -> FakeHub:
    hub = FakeHub(fetcher, content if content is not None else {SHA: DATA})
    fetcher.attach(hub.send)
    return hub


async def test_files_are_fetched_chunk_by_chunk_and_then_come_from_the_cache(
    fetcher: InputFetcher,
) -> None:
    hub = connect(fetcher)
    paths = await fetcher.fetch_all([REF])
    assert paths["data.bin"].read_bytes() == DATA
    assert hub.offsets() == [0, 1000, 2000, 3000, 4000, 5000]
    assert await fetcher.fetch_all([REF]) == paths
    assert len(hub.offsets()) == 6  # nothing asked again


async def test_tasks_needing_the_same_file_share_one_download(fetcher: InputFetcher) -> None:
    hub = connect(fetcher)
    other = FileRef(name="other-name.bin", sha256=SHA, size=len(DATA))
    first, second = await asyncio.gather(fetcher.fetch_all([REF]), fetcher.fetch_all([other]))
    assert first["data.bin"] == second["other-name.bin"]
    assert hub.offsets() == [0, 1000, 2000, 3000, 4000, 5000]


async def test_a_cut_download_waits_for_the_next_connection_and_resumes_there(
    fetcher: InputFetcher, cache: FileCache
) -> None:
    hub = connect(fetcher)
    hub.answers_left = 3
    fetching = asyncio.create_task(fetcher.fetch_all([REF]))
    while cache.partial_size(SHA) < 3000:
        await asyncio.sleep(0.001)
    fetcher.detach()
    await asyncio.sleep(3 * STALL)  # no connection: the download waits, it does not fail
    assert not fetching.done()
    assert cache.partial_size(SHA) == 3000
    again = connect(fetcher)
    paths = await fetching
    assert paths["data.bin"].read_bytes() == DATA
    assert again.offsets() == [3000, 4000, 5000]


async def test_a_complete_part_left_by_a_stop_is_checked_without_asking(
    fetcher: InputFetcher, cache: FileCache
) -> None:
    cache.append_chunk(SHA, 0, len(DATA), DATA, size=len(DATA))  # never finished
    hub = connect(fetcher)
    paths = await fetcher.fetch_all([REF])
    assert paths["data.bin"].read_bytes() == DATA
    assert hub.sent == []


async def test_a_stalled_request_is_asked_again_from_the_current_length(
    fetcher: InputFetcher,
) -> None:
    hub = connect(fetcher)
    dropped: list[int] = []

    def drop_first_ask_at_2000(ask: FetchFile) -> bool:
        if ask.offset == 2000 and not dropped:
            dropped.append(ask.offset)
            return True
        return False

    hub.drop = drop_first_ask_at_2000
    paths = await fetcher.fetch_all([REF])
    assert paths["data.bin"].read_bytes() == DATA
    assert hub.offsets() == [0, 1000, 2000, 2000, 3000, 4000, 5000]


async def test_late_duplicate_answers_are_ignored(fetcher: InputFetcher) -> None:
    hub = connect(fetcher)
    hub.repeat = True
    paths = await fetcher.fetch_all([REF])
    assert paths["data.bin"].read_bytes() == DATA
    assert hub.offsets() == [0, 1000, 2000, 3000, 4000, 5000]


async def test_a_hub_that_never_answers_fails_the_task_instead_of_hanging(
    fetcher: InputFetcher,
) -> None:
    hub = connect(fetcher)
    hub.answers_left = 0
    with pytest.raises(FileTransferError, match=r"input file data\.bin: no data from the hub"):
        await fetcher.fetch_all([REF])
    assert hub.offsets() == [0, 0, 0]  # the first ask and max_stalls=2 repeats


async def test_a_digest_mismatch_is_fetched_once_more(
    fetcher: InputFetcher, cache: FileCache
) -> None:
    hub = connect(fetcher, {SHA: b"x" * len(DATA)})
    fetching = asyncio.create_task(fetcher.fetch_all([REF]))
    while len(hub.offsets()) < 6:
        await asyncio.sleep(0.001)
    hub.content[SHA] = DATA  # the hub's second answer is right
    paths = await fetching
    assert paths["data.bin"].read_bytes() == DATA
    assert hub.offsets() == [0, 1000, 2000, 3000, 4000, 5000] * 2


async def test_a_second_digest_mismatch_fails_the_task_naming_the_file(
    fetcher: InputFetcher, cache: FileCache
) -> None:
    hub = connect(fetcher, {SHA: b"x" * len(DATA)})
    with pytest.raises(FileTransferError, match=r"input file data\.bin: .*SHA-256.*\(twice\)"):
        await fetcher.fetch_all([REF])
    assert len(hub.offsets()) == 12
    assert cache.partial_size(SHA) == 0
    assert cache.path(SHA) is None


async def test_a_chunk_contradicting_the_offered_size_fails_the_task(
    fetcher: InputFetcher,
) -> None:
    connect(fetcher, {SHA: DATA + b"more"})
    with pytest.raises(FileTransferError, match=r"data\.bin: the hub sends 5124 bytes"):
        await fetcher.fetch_all([REF])


@pytest.mark.parametrize(
    ("refs", "problem"),
    [
        ([FileRef(name="../secret", sha256=SHA, size=1)], "not a plain file name"),
        ([FileRef(name=".hidden", sha256=SHA, size=1)], "not a plain file name"),
        ([REF, REF], "named twice"),
        ([FileRef(name="a", sha256="../../identity.json", size=1)], "not a SHA-256"),
        ([FileRef(name="a", sha256=SHA, size=2**30 + 1)], "exceed the limit"),
        ([FileRef(name=f"f{n}", sha256=SHA, size=1) for n in range(65)], "at most 64"),
    ],
)
async def test_an_offer_naming_files_badly_fails_before_anything_is_fetched(
    fetcher: InputFetcher, refs: list[FileRef], problem: str
) -> None:
    hub = connect(fetcher)
    with pytest.raises(FileTransferError, match=problem):
        await fetcher.fetch_all(refs)
    assert hub.sent == []


async def test_a_download_nobody_waits_for_any_more_is_cancelled(
    fetcher: InputFetcher, cache: FileCache
) -> None:
    hub = connect(fetcher)
    hub.answers_left = 2
    fetching = asyncio.create_task(fetcher.fetch_all([REF]))
    while cache.partial_size(SHA) < 2000:
        await asyncio.sleep(0.001)
    fetching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetching
    hub.answers_left = None
    await asyncio.sleep(4 * STALL)  # a live download would have asked again by now
    assert hub.offsets() == [0, 1000, 2000]
    await fetcher.close()


async def test_a_bundle_download_ends_with_its_connection(tmp_path: Path) -> None:
    fetcher = BundleFetcher(BundleCache(tmp_path / "bundles", {}), stall_seconds=STALL)
    sent: list[Message] = []
    fetcher.attach(sent.append)
    digest = hashlib.sha256(b"bundle").hexdigest()
    fetching = asyncio.create_task(fetcher.fetch(digest, "p", 6))
    while not sent:
        await asyncio.sleep(0.001)
    fetcher.detach()  # its offers expire at the hub; nothing waits for the next connection
    with pytest.raises(ConnectionError):
        await fetching
    with pytest.raises(BundleError, match="not a SHA-256"):
        await fetcher.fetch("../evil", "p", 6)
