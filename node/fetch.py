"""Fetching what a task needs from the hub: its project's bundle and its input files.

Both download in chunks over the node's connection (``node.transfer``) into their
caches, and a download of one digest is shared by every task that needs it.

* ``BundleFetcher``: a bundle is fetched for offers not yet accepted, so a lost
  connection ends its download (the offers expire at the hub; the partial file stays and
  the next offer resumes it). A complete bundle is verified and installed by
  ``node.cache.BundleCache``.
* ``InputFetcher``: input files are fetched for accepted leases, which survive a lost
  connection, so a download waits for the next connection and resumes from the partial
  length. A digest mismatch discards the data and fetches once more; a second mismatch,
  a stalled hub or a refused chunk fails the tasks that wait for the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

from issc.errors import BundleError, FileTransferError
from issc.names import PLAIN_NAME_RE, SHA256_RE
from issc.protocol import FetchBundle, FetchFile, FileChunk, FileRef, Message
from node.cache import BundleCache
from node.files import MAX_INPUT_FILE_SIZE, DigestMismatchError, FileCache
from node.taskfiles import MAX_FILES
from node.transfer import MAX_STALLS, STALL_SECONDS, Fetcher

log = logging.getLogger(__name__)

MAX_DIGEST_MISMATCHES = 2  # a mismatch may be a glitch; two in a row are not


class BundleFetcher(Fetcher):
    """Bundles by digest, verified and extracted by ``cache``."""

    def __init__(
        self,
        cache: BundleCache,
        *,
        source: Callable[[str, int], Awaitable[Path]] | None = None,
        stall_seconds: float = STALL_SECONDS,
        max_stalls: int = MAX_STALLS,
    ) -> None:
        """``source(digest, size)``, if given, provides the archive (a relay's own
        cache, which fetches each bundle once for the relay and its peers)."""
        super().__init__(stall_seconds=stall_seconds, max_stalls=max_stalls)
        self.cache = cache
        self.source = source

    async def fetch(self, digest: str, project: str, size: int) -> Path:
        """The verified bundle directory, downloaded over the current connection if needed.

        A cached bundle is re-verified first (``BundleCache.ready``); a corrupt one is
        deleted and downloaded again.

        Raises:
            BundleError: the bundle was refused (now or earlier): digest, signature, owner
                key (or its rotation), project, a file's hash, or a chunk the hub should
                not have sent.
            FileTransferError: the hub stopped answering.
            ConnectionError: there is no connection, or it was lost meanwhile.
        """
        if not SHA256_RE.match(digest):  # it becomes a file name in the cache
            raise BundleError(f"{digest[:80]!r} is not a SHA-256 digest")
        if digest in self.cache.refused:
            raise BundleError(self.cache.refused[digest])
        # Re-verified before every use; a corrupt entry is deleted and fetched again. The
        # usual use (a small bundle verified before, unchanged) is checked without a hop.
        ready = self.cache.quick_ready(digest)
        if ready is None:
            ready = await asyncio.to_thread(self.cache.ready, digest)
        if ready is not None:
            self.cache.check_owner(digest, project)
            return ready
        return await self.shared(digest, lambda: self._download(digest, project, size))

    async def _download(self, digest: str, project: str, size: int) -> Path:
        if self.source is not None:
            try:
                archive = await self.source(digest, size)
            except FileTransferError as exc:
                raise ConnectionError(f"cannot fetch bundle {digest[:12]}: {exc}") from None
            return await asyncio.to_thread(self.cache.adopt, digest, project, archive)
        offset = self.cache.partial_size(digest)
        log.info("fetching bundle %s of %s (%d bytes, from %d)", digest[:12], project, size, offset)
        await self.transfer(
            digest,
            offset,
            lambda at: FetchBundle(digest=digest, offset=at),
            lambda at, total, data: self.cache.append_chunk(digest, at, total, data),
        )
        return self.cache.install(digest, project)


class BlobFetcher(Fetcher):
    """Files by SHA-256, kept in ``cache`` and asked for with ``request(sha256, offset)``.

    The downloads wait for a connection while there is none and resume from the partial
    length. A digest mismatch discards the data and fetches once more; a second mismatch,
    a stalled hub or a refused chunk fails everyone waiting for the file.
    """

    def __init__(
        self,
        cache: FileCache,
        request: Callable[[str, int], Message],
        *,
        stall_seconds: float = STALL_SECONDS,
        max_stalls: int = MAX_STALLS,
    ) -> None:
        super().__init__(stall_seconds=stall_seconds, max_stalls=max_stalls)
        self.cache = cache
        self._request = request

    async def fetch_blob(self, sha256: str, size: int) -> Path:
        """The cached file with this digest and size. Raises FileTransferError."""
        cached = self.cache.path(sha256)
        if cached is not None:
            return cached
        return await self.shared(sha256, lambda: self._download(sha256, size))

    async def _download(self, sha256: str, size: int) -> Path:
        mismatches = 0
        while True:
            await self.connected()
            offset = self.cache.partial_size(sha256)
            if offset > size:  # left by an earlier offer that named another size
                self.cache.discard(sha256)
                offset = 0
            # A part already complete (the node stopped before checking it) needs no ask.
            if offset < size or size == 0:
                log.info("fetching %s (%d bytes, from %d)", sha256[:12], size, offset)
                try:
                    await self.transfer(
                        sha256,
                        offset,
                        lambda at: self._request(sha256, at),
                        lambda at, total, data: self.cache.append_chunk(
                            sha256, at, total, data, size=size
                        ),
                    )
                except ConnectionError:
                    continue  # resumed from the partial length on the next connection
            try:
                path = await asyncio.to_thread(self.cache.finish, sha256)
            except DigestMismatchError as exc:
                mismatches += 1
                if mismatches >= MAX_DIGEST_MISMATCHES:
                    raise DigestMismatchError(f"{exc} (twice)") from None
                log.warning("%s: %s; fetching it once more", sha256[:12], exc)
                continue
            self.cache.evict()
            return path


class InputFetcher(BlobFetcher):
    """Tasks' input files by SHA-256, kept in ``cache``."""

    def __init__(
        self,
        cache: FileCache,
        *,
        stall_seconds: float = STALL_SECONDS,
        max_stalls: int = MAX_STALLS,
    ) -> None:
        super().__init__(
            cache,
            lambda sha256, at: FetchFile(sha256=sha256, offset=at),
            stall_seconds=stall_seconds,
            max_stalls=max_stalls,
        )

    def on_chunk(self, chunk: FileChunk) -> None:
        self.feed(chunk.sha256, chunk.offset, chunk.total, chunk.data)

    @contextlib.contextmanager
    def pinned(self, refs: Sequence[FileRef]) -> Iterator[None]:
        """Keep these files from eviction while the block runs (the task's whole life)."""
        with self.cache.pinned(ref.sha256 for ref in refs):
            yield

    async def fetch_all(self, refs: Sequence[FileRef]) -> dict[str, Path]:
        """Each input file's cached path by name, downloading what is missing.

        Waits for a connection while there is none.

        Raises FileTransferError naming the file: a bad name, digest or size in the offer,
        too many files, or a download that failed (stalled hub, refused chunk, digest
        mismatch twice).
        """
        check_refs(refs)
        paths: dict[str, Path] = {}
        for ref in refs:
            try:
                paths[ref.name] = await self.fetch(ref)
            except FileTransferError as exc:  # the same kind, naming the file
                raise type(exc)(f"input file {ref.name}: {exc}") from None
        return paths

    async def fetch(self, ref: FileRef) -> Path:
        """One input file's cached path. Raises FileTransferError."""
        return await self.fetch_blob(ref.sha256, ref.size)


def check_refs(refs: Sequence[FileRef]) -> None:
    """Refuse an offer's file list that the node cannot or must not use.

    Raises FileTransferError naming the problem: more than 64 files, a name that is not a
    plain file name (it becomes ``in/NAME``), a name twice, a digest that is not 64 hex
    digits (it becomes a cache file name), or a size over 1 GiB.
    """
    if len(refs) > MAX_FILES:
        raise FileTransferError(f"{len(refs)} input files; at most {MAX_FILES} are allowed")
    seen: set[str] = set()
    for ref in refs:
        if not PLAIN_NAME_RE.match(ref.name):
            raise FileTransferError(f"input file name {ref.name[:200]!r} is not a plain file name")
        if ref.name in seen:
            raise FileTransferError(f"input file {ref.name} is named twice")
        seen.add(ref.name)
        if not SHA256_RE.match(ref.sha256):
            raise FileTransferError(f"input file {ref.name}: {ref.sha256[:80]!r} is not a SHA-256")
        if ref.size > MAX_INPUT_FILE_SIZE:
            raise FileTransferError(
                f"input file {ref.name}: {ref.size} bytes exceed the limit of "
                f"{MAX_INPUT_FILE_SIZE} bytes"
            )
