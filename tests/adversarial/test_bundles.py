"""The bad-input suite, bundle side: hostile archives built by hand, fed to the node's
bundle cache (``node.cache.BundleCache.install``, what the node runs on every download).

Every case asserts the exact refusal (the reason the node reports to the hub) and that
nothing was written anywhere: the cache directory, the node's data_dir and the directory
around it are exactly as before (``adv_tree``). Where the member check must be reached,
the archive carries a manifest validly signed with the trusted key. The version case runs
a real node (``node.client.NodeClient``) against a hub played by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import stat
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scripted_hub import HubSide, listen

from issc.bundle import sign_manifest
from issc.config import load_node_config
from issc.errors import BundleError
from issc.keys import public_key_string
from issc.manifest import FileEntry, Limits, Manifest, manifest_to_bytes
from issc.protocol import (
    Accept,
    BundleChunk,
    BundleRefused,
    Decline,
    FetchBundle,
    Message,
    Offer,
    Result,
    ResultAck,
    TaskOffer,
)
from node.cache import BundleCache
from node.client import NodeClient

pytestmark = pytest.mark.timeout(60)

M = TypeVar("M", bound=Message)
OWNER = Ed25519PrivateKey.from_private_bytes(b"\x51" * 32)
OWNER_PUBLIC = public_key_string(OWNER.public_key())
MAIN = b"print(1)\n"
Member = tuple[tarfile.TarInfo, bytes]
Tree = dict[str, tuple[str, int, int, int]]


# ---- building archives by hand ----------------------------------------------------------------


def member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644
) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null
    return info, data


def tar_bytes(members: list[Member], trailer: bytes = b"\0" * 1024) -> bytes:
    """Uncompressed tar with headers exactly as given (PAX where a name needs it)."""
    raw = io.BytesIO()
    for info, data in members:
        raw.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        raw.write(data + b"\0" * (-len(data) % 512))
    raw.write(trailer)
    return raw.getvalue()


def manifest_of(files: dict[str, bytes], version: int = 1, executable: bool = False) -> Manifest:
    entries = tuple(
        FileEntry(path, len(data), hashlib.sha256(data).hexdigest(), executable)
        for path, data in sorted(files.items())
    )
    return Manifest(
        name="primes",
        version=version,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(wall_seconds=20, memory_mb=256, output_mb=1),
        quorum=1,
        files=entries,
        owner_key=OWNER_PUBLIC,
    )


def head(manifest: Manifest, signature: bytes | None = None) -> list[Member]:
    """manifest.json and its signature (by OWNER, the trusted key, unless given)."""
    data = manifest_to_bytes(manifest)
    return [
        member("manifest.json", data),
        member("signature", sign_manifest(data, OWNER) if signature is None else signature),
    ]


def signed_with(files: list[Member], declared: dict[str, bytes] | None = None) -> bytes:
    """A gzip'd bundle: a manifest declaring ``declared`` (default: main.py), validly
    signed, followed by ``files`` as given."""
    manifest = manifest_of({"main.py": MAIN} if declared is None else declared)
    return gzip.compress(tar_bytes([*head(manifest), *files]), compresslevel=1, mtime=0)


# ---- the node's cache ------------------------------------------------------------------------


@dataclass
class Area:
    """tmp_path/node (a node data_dir with its bundle cache) beside tmp_path/outside."""

    root: Path
    cache: BundleCache
    tree: Callable[[Path], Tree]

    def install(self, archive: bytes) -> tuple[str, Path]:
        """Drop ``archive`` as a finished download and install it: (digest, directory)."""
        digest = hashlib.sha256(archive).hexdigest()
        (self.cache.directory / f"{digest}.part").write_bytes(archive)
        return digest, self.cache.install(digest, "primes")

    def refuses(self, archive: bytes, reason: str) -> None:
        """The cache refuses ``archive`` with exactly ``reason`` and nothing changes."""
        before = self.tree(self.root.parent)
        with pytest.raises(BundleError) as refused:
            self.install(archive)
        assert str(refused.value) == reason
        assert self.tree(self.root.parent) == before  # the download went too
        assert list(self.cache.directory.iterdir()) == []


@pytest.fixture
def adv_area(tmp_path: Path, adv_tree: Callable[[Path], Tree]) -> Area:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("untouched")
    node = tmp_path / "node"
    node.mkdir()
    (node / "node.key").write_text("secret")
    cache = BundleCache(node / "bundles", {"primes": OWNER_PUBLIC})
    return Area(node, cache, adv_tree)


# ---- members that must never be written ------------------------------------------------------


def test_a_member_dot_dot_x_is_refused(adv_area: Area) -> None:
    archive = signed_with([member("../x", b"x"), member("files/main.py", MAIN)])
    adv_area.refuses(archive, "member ../x: unsafe path (has a '..' component)")
    assert not (adv_area.root / "x").exists()


def test_an_absolute_member_path_is_refused(adv_area: Area) -> None:
    target = adv_area.root.parent / "outside" / "pwned"
    archive = signed_with([member(str(target), b"x"), member("files/main.py", MAIN)])
    adv_area.refuses(archive, f"member {target}: unsafe path (absolute path)")
    assert not target.exists()


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(tarfile.SYMTYPE, id="symlink-to-etc-passwd"),
        pytest.param(tarfile.LNKTYPE, id="hard-link-to-etc-passwd"),
        pytest.param(tarfile.CHRTYPE, id="device-node"),
    ],
)
def test_a_member_that_is_not_a_regular_file_is_refused(adv_area: Area, kind: bytes) -> None:
    # Named as the manifest's own file, so that only its type is wrong.
    archive = signed_with([member("files/main.py", kind=kind)])
    adv_area.refuses(archive, "member files/main.py: not a regular file")


def test_a_setuid_file_is_extracted_without_the_bit(adv_area: Area) -> None:
    """Tar modes are never trusted: a setuid member is installed 0444, as every file."""
    archive = signed_with([member("files/main.py", MAIN, mode=0o4755)])
    before = adv_area.tree(adv_area.root.parent / "outside")
    _digest, directory = adv_area.install(archive)
    mode = (directory / "main.py").stat().st_mode
    assert stat.S_IMODE(mode) == 0o444
    assert not mode & (stat.S_ISUID | stat.S_ISGID)
    assert adv_area.tree(adv_area.root.parent / "outside") == before


# ---- bounds ----------------------------------------------------------------------------------


def empty_members(names: list[str]) -> bytes:
    """POSIX ustar headers of empty regular files, made fast: one template, the name and
    the checksum patched in (tarfile's writer takes seconds for 100,000 of them)."""
    template = bytearray(member("x")[0].tobuf(tarfile.USTAR_FORMAT))
    template[0:100] = bytes(100)
    template[148:156] = b" " * 8
    base = sum(template)
    out = bytearray()
    for name in names:
        raw = name.encode()
        block = bytearray(template)
        block[0 : len(raw)] = raw
        block[148:156] = b"%06o\0 " % (base + sum(raw))
        out += block
    return bytes(out)


def test_a_hundred_thousand_members_are_refused_at_the_first_stranger(adv_area: Area) -> None:
    names = [f"files/m{i:06d}" for i in range(100_000)]
    manifest = manifest_of({"main.py": MAIN})
    tar = tar_bytes([*head(manifest), member("files/main.py", MAIN)], trailer=b"")
    archive = gzip.compress(tar + empty_members(names) + bytes(1024), compresslevel=1, mtime=0)
    started = time.monotonic()
    adv_area.refuses(archive, "unexpected member files/m000000")
    assert time.monotonic() - started < 5


def test_a_manifest_of_a_hundred_thousand_files_is_refused_before_reading_it(
    adv_area: Area,
) -> None:
    paths = [f"m{i:06d}" for i in range(100_000)]
    empty = hashlib.sha256(b"").hexdigest()
    manifest = dataclasses.replace(
        manifest_of({}), files=tuple(FileEntry(path, 0, empty) for path in paths)
    )
    data = manifest_to_bytes(manifest)
    size = len(data)
    signed = [member("manifest.json", data), member("signature", sign_manifest(data, OWNER))]
    members = empty_members([f"files/{path}" for path in paths])
    tar = tar_bytes(signed, trailer=b"") + members + bytes(1024)
    archive = gzip.compress(tar, compresslevel=1, mtime=0)
    adv_area.refuses(
        archive, f"member manifest.json: {size} bytes, over the limit of {4 * 1024 * 1024}"
    )


BOMB_PIECE = 16 * 1024 * 1024
BOMB_BYTES = 16 * BOMB_PIECE  # 256 MiB of zeros


@functools.cache
def zeros_member() -> bytes:
    """One gzip member of 16 MiB of zeros (about 16 KiB)."""
    return gzip.compress(bytes(BOMB_PIECE), compresslevel=9, mtime=0)


def zeros_gzip(prefix: bytes) -> bytes:
    """gzip of ``prefix`` followed by 256 MiB of zeros: concatenated gzip members, which
    a reader inflates as one stream."""
    return gzip.compress(prefix, mtime=0) + zeros_member() * (BOMB_BYTES // BOMB_PIECE)


def test_a_compression_bomb_is_refused_at_the_manifests_bound(adv_area: Area) -> None:
    """A valid bundle followed, in the same gzip stream, by 256 MiB of zeros: over
    1000:1. Reading stops at the bytes the signed manifest allows."""
    bundle = tar_bytes([*head(manifest_of({"main.py": MAIN})), member("files/main.py", MAIN)])
    archive = zeros_gzip(bundle)
    assert (len(bundle) + BOMB_BYTES) / len(archive) > 1000
    started = time.monotonic()
    adv_area.refuses(archive, "archive holds more data than its manifest allows")
    assert time.monotonic() - started < 5  # nowhere near 256 MiB were inflated


def test_a_manifest_member_claiming_a_bomb_is_refused_before_reading(adv_area: Area) -> None:
    info, _ = member("manifest.json")
    info.size = BOMB_BYTES
    archive = zeros_gzip(info.tobuf(tarfile.PAX_FORMAT))
    assert BOMB_BYTES / len(archive) > 1000
    adv_area.refuses(
        archive, f"member manifest.json: {BOMB_BYTES} bytes, over the limit of {4 * 1024 * 1024}"
    )


# ---- signatures ------------------------------------------------------------------------------


def test_a_flipped_signature_bit_is_refused(adv_area: Area) -> None:
    manifest = manifest_of({"main.py": MAIN})
    signature = bytearray(sign_manifest(manifest_to_bytes(manifest), OWNER))
    signature[17] ^= 0x04
    archive = gzip.compress(
        tar_bytes([*head(manifest, bytes(signature)), member("files/main.py", MAIN)]), mtime=0
    )
    adv_area.refuses(
        archive,
        f"signature does not verify with the trusted key (the manifest names owner key "
        f"{OWNER_PUBLIC})",
    )


def test_the_same_bundle_unflipped_installs(adv_area: Area) -> None:
    """The control for the cases above: the honest archive they are made from is fine."""
    digest, directory = adv_area.install(signed_with([member("files/main.py", MAIN)]))
    assert (directory / "main.py").read_bytes() == MAIN
    assert adv_area.cache.ready(digest) == directory


# ---- versions: a node never goes back ---------------------------------------------------------


async def serve_bundle(hub: HubSide, bundle: bytes) -> None:
    ask = await hub.expect(FetchBundle)
    hub.send(BundleChunk(digest=ask.digest, offset=0, total=len(bundle), data=bundle))


def versioned(version: int) -> bytes:
    manifest = manifest_of({"main.py": MAIN}, version=version)
    return gzip.compress(tar_bytes([*head(manifest), member("files/main.py", MAIN)]), mtime=0)


def offer_of(lease: int, bundle: bytes, version: int) -> Offer:
    task = TaskOffer(
        lease=lease,
        project="primes",
        task=f"t-{lease}",
        version=version,
        digest=hashlib.sha256(bundle).hexdigest(),
        size=len(bundle),
        input=None,
        files=[],
    )
    return Offer(tasks=[task])


@pytest.fixture
async def adv_node_and_hub(tmp_path: Path) -> AsyncIterator[tuple[NodeClient, HubSide]]:
    listening = await listen()
    config = {
        "hub": f"127.0.0.1:{listening.port}",
        "volunteer": "alice",
        "data_dir": str(tmp_path / "node"),
        "projects": ["primes"],
        "trusted_keys": {"primes": OWNER_PUBLIC},
        "slots": 1,
        "sandbox": "none",  # task code here prints 1; the sandbox is test_task_code's
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    client = NodeClient(load_node_config(tmp_path / "node.yaml"))
    stop = asyncio.Event()
    running = asyncio.create_task(client.run(stop))
    try:
        hub = await asyncio.wait_for(listening.connections.get(), 15)
        await hub.handshake(resumed=[])
        yield client, hub
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 15)
        listening.server.close()


async def test_a_lower_version_after_a_higher_one_is_declined_unfetched(
    adv_node_and_hub: tuple[NodeClient, HubSide], caplog: pytest.LogCaptureFixture
) -> None:
    client, hub = adv_node_and_hub
    v2, v1 = versioned(2), versioned(1)
    hub.send(offer_of(1, v2, 2))
    await serve_bundle(hub, v2)
    assert (await hub.expect(Accept)).leases == [1]
    result = await hub.expect(Result)
    assert (result.lease, result.ok, result.result) == (1, True, 1), result.error
    hub.send(ResultAck(lease=1, accepted=True, reason=None))
    assert client.cache.highest_version("primes") == 2
    cache_before = sorted(p.name for p in client.cache.directory.iterdir())
    with caplog.at_level("INFO", logger="node.client"):
        hub.send(offer_of(2, v1, 1))
        decline = await hub.expect(Decline)  # and no fetch_bundle before it
    assert (decline.leases, decline.reason) == ([2], "not runnable on this node")
    assert "declining lease 2 (t-2): version 1 is older than one already run" in caplog.text
    assert sorted(p.name for p in client.cache.directory.iterdir()) == cache_before


async def test_an_offer_lying_about_its_version_is_refused(
    adv_node_and_hub: tuple[NodeClient, HubSide],
) -> None:
    """The offer says version 3; the bundle behind its digest is a signed version 1."""
    client, hub = adv_node_and_hub
    v1 = versioned(1)
    hub.send(offer_of(7, v1, 3))
    await serve_bundle(hub, v1)
    refused = await hub.expect(BundleRefused)
    assert (refused.leases, refused.reason) == ([7], "bundle says version 1, the offer 3")
    assert client.cache.highest_version("primes") == 0  # never run, never recorded
