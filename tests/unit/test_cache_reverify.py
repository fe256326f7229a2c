"""A cached bundle directory is re-verified before use; a corrupt one is fetched again.

The fetcher talks to a fake hub that serves one bundle; every test counts the downloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import node.cache as cache_module
from issc.bundle import pack_bundle
from issc.keys import generate_key
from issc.protocol import FetchBundle, Message
from node.cache import BundleCache
from node.fetch import BundleFetcher

pytestmark = pytest.mark.timeout(20)

CHUNK = 64 * 1024
MAIN = b"print('the real code')\n"


class FakeHub:
    """Answers fetch_bundle from the one bundle it holds."""

    def __init__(self, fetcher: BundleFetcher, bundle: bytes) -> None:
        self.fetcher = fetcher
        self.bundle = bundle
        self.digest = hashlib.sha256(bundle).hexdigest()
        self.asked: list[int] = []
        fetcher.attach(self.send)

    def send(self, message: Message) -> None:
        if isinstance(message, FetchBundle):
            self.asked.append(message.offset)
            asyncio.get_running_loop().call_soon(self.answer, message.offset)

    def answer(self, offset: int) -> None:
        piece = self.bundle[offset : offset + CHUNK]
        self.fetcher.feed(self.digest, offset, len(self.bundle), piece)

    def downloads(self) -> int:
        return self.asked.count(0)


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[bytes, str]:
    """(bundle bytes, owner public key) of a project with a file in a subdirectory."""
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    (src / "project.yaml").write_text("name: primes\nversion: 1\nentrypoint: [python3, main.py]\n")
    (src / "main.py").write_bytes(MAIN)
    (src / "lib" / "data.bin").write_bytes(os.urandom(200_000))
    public = generate_key(tmp_path / "owner.pem")
    pack_bundle(src, tmp_path / "owner.pem", tmp_path / "primes.issc")
    return (tmp_path / "primes.issc").read_bytes(), public


def setup(directory: Path, bundle: tuple[bytes, str]) -> tuple[BundleFetcher, FakeHub]:
    data, public = bundle
    fetcher = BundleFetcher(BundleCache(directory, {"primes": public}), stall_seconds=2.0)
    return fetcher, FakeHub(fetcher, data)


def writable(path: Path) -> None:
    os.chmod(path, 0o644)


def change_content(root: Path) -> None:
    """Same size, same mtime: only the hash can tell."""
    target = root / "main.py"
    stamp = target.stat()
    writable(target)
    target.write_bytes(MAIN.replace(b"real", b"evil"))
    os.chmod(target, 0o444)
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def remove_file(root: Path) -> None:
    (root / "lib" / "data.bin").unlink()


def add_file(root: Path) -> None:
    (root / "lib" / "sitecustomize.py").write_text("import os\n")


def change_mode(root: Path) -> None:
    os.chmod(root / "main.py", 0o555)


def replace_with_symlink(root: Path) -> None:
    (root / "main.py").unlink()
    (root / "main.py").symlink_to("/etc/hostname")


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "content changed": change_content,
    "file missing": remove_file,
    "file added": add_file,
    "mode changed": change_mode,
    "replaced by a symlink": replace_with_symlink,
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
async def test_a_corrupt_cache_entry_is_fetched_again_not_used(
    tmp_path: Path, bundle: tuple[bytes, str], how: str
) -> None:
    fetcher, hub = setup(tmp_path / "cache", bundle)
    path = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    assert hub.downloads() == 1
    CORRUPTIONS[how](path)
    again = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    assert hub.downloads() == 2  # deleted and fetched again from the hub
    assert (again / "main.py").read_bytes() == MAIN
    assert sorted(p.relative_to(again).as_posix() for p in again.rglob("*")) == [
        "lib",
        "lib/data.bin",
        "main.py",
        "project.yaml",
    ]
    assert os.stat(again / "main.py").st_mode & 0o777 == 0o444
    await fetcher.close()


async def test_corruption_made_while_the_node_was_down_is_caught_at_its_first_use(
    tmp_path: Path, bundle: tuple[bytes, str]
) -> None:
    fetcher, hub = setup(tmp_path / "cache", bundle)
    path = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    await fetcher.close()
    change_content(path)  # keeps size and mtime
    fetcher, hub = setup(tmp_path / "cache", bundle)  # a restarted node
    again = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    assert hub.downloads() == 1
    assert (again / "main.py").read_bytes() == MAIN
    await fetcher.close()


async def test_a_good_cache_entry_is_used_without_fetching_and_hashed_once(
    tmp_path: Path, bundle: tuple[bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fetcher, hub = setup(tmp_path / "cache", bundle)
    first = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    await fetcher.close()
    full_checks: list[Path] = []
    real_check = cache_module._check_tree
    monkeypatch.setattr(
        cache_module, "_check_tree", lambda path, m: (full_checks.append(path), real_check(path, m))
    )
    fetcher, hub = setup(tmp_path / "cache", bundle)  # a restarted node: nothing fetched
    for _ in range(5):
        assert await fetcher.fetch(hub.digest, "primes", len(hub.bundle)) == first
    assert hub.downloads() == 0
    assert len(full_checks) == 1  # the first use; then the stat fingerprint held
    os.utime(first / "main.py")  # a touch: the fingerprint changes, the content does not
    assert await fetcher.fetch(hub.digest, "primes", len(hub.bundle)) == first
    assert len(full_checks) == 2 and hub.downloads() == 0
    await fetcher.close()


async def test_a_corrupt_kept_archive_is_fetched_again(
    tmp_path: Path, bundle: tuple[bytes, str]
) -> None:
    fetcher, hub = setup(tmp_path / "cache", bundle)
    await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    archive = tmp_path / "cache" / f"{hub.digest}.issc"
    archive.write_bytes(archive.read_bytes()[:-10])
    again = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    assert hub.downloads() == 2
    assert (again / "main.py").read_bytes() == MAIN
    await fetcher.close()
