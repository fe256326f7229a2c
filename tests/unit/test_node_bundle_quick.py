"""The cheap re-check of a cached bundle on the event loop (``BundleCache.quick_ready``).

Every task's bundle is re-checked before it runs; for a small bundle verified earlier in
this process the stat fingerprint is compared on the event loop, without a thread hop.
Anything else (never checked, changed, large) still goes through ``BundleCache.ready``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_cache_reverify import bundle, change_content, setup  # noqa: F401

from node import cache as cache_module
from node.cache import BundleCache

pytestmark = pytest.mark.timeout(30)


def count_ready(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = BundleCache.ready

    def counted(self: BundleCache, digest: str) -> Path | None:
        calls.append(digest)
        return real(self, digest)

    monkeypatch.setattr(BundleCache, "ready", counted)
    return calls


async def test_an_unchanged_verified_bundle_is_rechecked_without_ready(
    tmp_path: Path,
    bundle: tuple[bytes, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fetcher, hub = setup(tmp_path / "cache", bundle)
    first = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    calls = count_ready(monkeypatch)
    for _ in range(3):
        assert await fetcher.fetch(hub.digest, "primes", len(hub.bundle)) == first
    assert calls == []  # installed (so verified) by this process: the quick check sufficed
    await fetcher.close()


async def test_a_changed_bundle_falls_back_to_the_full_check(
    tmp_path: Path,
    bundle: tuple[bytes, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fetcher, hub = setup(tmp_path / "cache", bundle)
    first = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    calls = count_ready(monkeypatch)
    change_content(first)
    again = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    assert calls == [hub.digest]  # the quick check saw the change and left it to ready()
    assert hub.downloads() == 2  # which found it corrupt: fetched again
    assert (again / "main.py").stat().st_size > 0
    await fetcher.close()


async def test_a_large_bundle_is_not_fingerprinted_on_the_event_loop(
    tmp_path: Path,
    bundle: tuple[bytes, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache_module, "QUICK_ENTRIES", 1)
    fetcher, hub = setup(tmp_path / "cache", bundle)
    first = await fetcher.fetch(hub.digest, "primes", len(hub.bundle))
    calls = count_ready(monkeypatch)
    assert await fetcher.fetch(hub.digest, "primes", len(hub.bundle)) == first
    assert calls == [hub.digest]
    assert os.path.isdir(first)
    await fetcher.close()
