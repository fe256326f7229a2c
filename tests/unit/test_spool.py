"""The node's result spool: durable before it returns, group fsync, replay after a crash."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from node import spool as spool_module
from node.spool import ResultSpool


def record(n: int) -> dict[str, Any]:
    return {"lease": n, "ok": True, "result": n, "error": None, "files": []}


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("results-*.log"))


async def test_a_put_survives_a_reopen_and_a_removed_one_does_not(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path)
    await spool.put(1, record(1))
    await spool.put(2, record(2))
    spool.remove(1)
    spool.close()
    again = ResultSpool(tmp_path)
    assert again.leases() == [2]
    assert again.load(2) == record(2)
    assert again.load(1) is None


async def test_put_returns_only_after_an_fsync_of_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = ResultSpool(tmp_path)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    await spool.put(7, record(7))
    size = sum(p.stat().st_size for p in tmp_path.glob("results-*.log"))
    assert synced and synced[-1] == size


async def test_results_that_finish_together_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = ResultSpool(tmp_path)
    calls = 0
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    await asyncio.gather(*(spool.put(n, record(n)) for n in range(100)))
    assert spool.leases() == list(range(100))
    assert calls <= 2  # the first put's own fsync, then one for the 99 written meanwhile


async def test_a_torn_last_line_is_ignored_and_the_rest_is_kept(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path)
    await spool.put(1, record(1))
    spool.close()
    [name] = segments(tmp_path)
    with (tmp_path / name).open("ab") as journal:
        journal.write(b'{"put":2,"record":{"ok":tr')  # killed in the middle of a write
    again = ResultSpool(tmp_path)
    assert again.leases() == [1]


async def test_an_acknowledged_segment_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 300)
    spool = ResultSpool(tmp_path)
    for n in range(10):
        await spool.put(n, record(n))
    assert len(segments(tmp_path)) > 2
    for n in range(10):
        spool.remove(n)
    assert len(segments(tmp_path)) == 1  # only the one being written
    spool.close()
    assert ResultSpool(tmp_path).leases() == []


async def test_a_record_outlives_the_segment_rollovers_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 300)
    spool = ResultSpool(tmp_path)
    await spool.put(0, record(0))
    for n in range(1, 20):
        await spool.put(n, record(n))
        spool.remove(n)
    spool.close()
    assert ResultSpool(tmp_path).leases() == [0]


async def test_files_of_an_earlier_version_are_taken_in(tmp_path: Path) -> None:
    (tmp_path / "5.json").write_text(json.dumps(record(5)), encoding="utf-8")
    spool = ResultSpool(tmp_path)
    assert spool.leases() == [5]
    assert not (tmp_path / "5.json").exists()
    spool.close()
    assert ResultSpool(tmp_path).load(5) == record(5)


async def test_outputs_without_a_record_are_swept(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path)
    await spool.put(1, record(1))
    spool.output_dir(1).mkdir()
    spool.output_dir(2).mkdir()
    spool.sweep()
    assert spool.output_dir(1).exists()
    assert not spool.output_dir(2).exists()


async def test_a_cancelled_put_does_not_stall_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = ResultSpool(tmp_path)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.05)
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", slow_fsync)
    for _ in range(5):
        first = asyncio.create_task(spool.put(1, record(1)))
        await asyncio.sleep(0.01)  # its fsync is in flight
        others = [asyncio.create_task(spool.put(n, record(n))) for n in range(2, 6)]
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.wait_for(asyncio.gather(*others), 5)
    assert spool.leases() == [1, 2, 3, 4, 5]


@pytest.mark.timeout(10)
async def test_a_put_that_arrives_as_an_fsync_ends_is_synced_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = ResultSpool(tmp_path)
    gates: list[asyncio.Future[None]] = []

    async def gated_fsync(fd: int) -> None:
        gate = asyncio.get_running_loop().create_future()
        gates.append(gate)
        await gate
        os.fsync(fd)

    monkeypatch.setattr(spool, "_fsync_off_loop", gated_fsync)
    first = asyncio.create_task(spool.put(1, record(1)))
    while not gates:
        await asyncio.sleep(0)
    gates[0].set_result(None)
    # Runs in the same turn as the end of that fsync, before the put that started it.
    second = asyncio.create_task(spool.put(2, record(2)))
    while not second.done():
        for gate in gates:
            if not gate.done():
                gate.set_result(None)
        await asyncio.sleep(0.01)
    await asyncio.gather(first, second)
    assert spool.leases() == [1, 2]
