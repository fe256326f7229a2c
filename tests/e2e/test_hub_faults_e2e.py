"""Hub faults it survives, with real processes: a full disk, a locked database.

* Disk full: the hub's data_dir is a small tmpfs. Mid-run the test fills it. The hub
  must stay up (process alive, control socket answering, ``status`` showing
  ``degraded``), take no new work, and, once the filler is gone, recover by itself and
  finish every task, each exactly once in results.jsonl.
* Database locked: the test holds SQLite's write lock for longer than the hub's busy
  timeout; the hub retries (logged once), keeps its nodes, and finishes everything.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_harness import (
    Cluster,
    Hub,
    OwnerKey,
    holds_for,
    pack,
    wait_until,
    write_project,
    write_tasks,
)

pytestmark = pytest.mark.e2e

# Each task sleeps a little and writes an output file, so a full disk meets the hub's
# database, its outbox and its uploads alike.
OUTPUT_PROGRAM = """\
import json, os, sys, time
task = json.load(sys.stdin)
time.sleep(task["sleep"])
os.makedirs("out", exist_ok=True)
with open("out/blob.bin", "wb") as f:
    f.write(os.urandom(task["bytes"]))
print(json.dumps(task["n"] * 2))
"""
TMPFS_MB = 64


def mount_tmpfs(directory: Path) -> None:
    """A small tmpfs at ``directory`` (mode 0755: the control socket's directory must not be
    writable by others), or a skip saying why not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {(done.stderr or done.stdout).strip()}")


def unmount(directory: Path) -> None:
    done = subprocess.run(["umount", str(directory)], capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


@pytest.fixture
def small_disk_hub(cluster: Cluster) -> Iterator[Hub]:
    """A hub (not started) whose data_dir is a 64 MiB tmpfs, unmounted after the test."""
    hub = cluster.hub(start=False, port=0, heartbeat_misses=6)
    mount_tmpfs(hub.data_dir)
    try:
        yield hub
    finally:
        cluster.sweep()  # nothing may hold the mount when it goes
        unmount(hub.data_dir)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no room left; its path."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12):
            block = b"\0" * size
            while True:
                try:
                    f.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return filler


def test_a_full_disk_degrades_the_hub_which_recovers_by_itself_and_loses_nothing(
    small_disk_hub: Hub, cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    tasks_total = 60
    hub = small_disk_hub.start()
    bundle = pack(
        write_project(tmp_path / "out-src", "blobs", OUTPUT_PROGRAM), owner_key, tmp_path / "b.issc"
    )
    hub.ingest(bundle)
    keys = {"blobs": owner_key.public}
    nodes = [cluster.node(hub, f"node{i}", trusted_keys=keys, slots=2) for i in (1, 2)]
    for node in nodes:
        node.wait_joined(hub)
    tasks = [(f"b-{n}", {"n": n, "sleep": 0.2, "bytes": 16384}) for n in range(tasks_total)]
    hub.ingest(write_tasks(tmp_path / "blobs.jsonl", "blobs", tasks))
    hub.wait_results("blobs", 10, timeout=60)

    filler = fill(hub.data_dir)
    filled = time.monotonic()
    status = wait_until(
        lambda: (s := hub.query("status"))["degraded"] and s, 60, 0.1, "the hub to degrade"
    )
    degraded_after = time.monotonic() - filled
    assert "disk full" in status["degraded"] or "database" in status["degraded"], status
    # Degraded, not dead: the process runs, the control socket answers reads, no node is
    # served, and it stays so while the disk is full.
    assert hub.alive
    assert hub.query("projects")[0]["name"] == "blobs"

    def degraded_and_serving_no_one() -> bool:
        return hub.alive and hub.query("status")["degraded"] is not None and not hub.query("nodes")

    wait_until(degraded_and_serving_no_one, 15, what="the node sessions to close")
    holds_for(degraded_and_serving_no_one, 3.0, 0.2, "degraded, no node served")
    during = hub.results("blobs")
    assert len({r["id"] for r in during}) == len(during)

    filler.unlink()
    freed = time.monotonic()
    wait_until(lambda: hub.query("status")["degraded"] is None, 60, 0.1, "the hub to recover")
    recovered_after = time.monotonic() - freed
    results = hub.wait_results("blobs", tasks_total, timeout=120)
    finished_after = time.monotonic() - freed
    print(
        f"\ndisk full: degraded {degraded_after:.2f} s after the disk filled "
        f"({len(during)}/{tasks_total} lines by then); recovered {recovered_after:.2f} s after "
        f"space returned; all {tasks_total} lines {finished_after:.2f} s after"
    )

    counts = collections.Counter(r["id"] for r in results)
    assert [i for i, n in counts.items() if n > 1] == []
    assert set(counts) == {f"b-{n}" for n in range(tasks_total)}
    assert len(results) == tasks_total
    assert {r["state"] for r in results} == {"C"}
    assert all(r["result"] == 2 * int(r["id"][2:]) for r in results)
    for r in results:
        [ref] = r["files"]
        landed = hub.outbox / "blobs" / "files" / r["id"] / "blob.bin"
        assert landed.stat().st_size == ref["size"] == 16384
    status = hub.query("status")
    assert status["tasks"]["C"] == tasks_total and status["outages"] >= 1
    log = hub.log_text()
    assert "HUB DEGRADED" in log and "HUB RECOVERED" in log
    assert hub.alive
    wait_until(lambda: not any(node.spooled() for node in nodes), 30, what="the spools to empty")


def test_a_locked_database_is_waited_out_without_a_crash(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    hub = cluster.hub()
    bundle = pack(
        write_project(tmp_path / "out-src", "blobs", OUTPUT_PROGRAM), owner_key, tmp_path / "b.issc"
    )
    hub.ingest(bundle)
    keys = {"blobs": owner_key.public}
    nodes = [cluster.node(hub, f"node{i}", trusted_keys=keys, slots=2) for i in (1, 2)]
    joined = {node.wait_joined(hub) for node in nodes}
    first = [(f"l-{n}", {"n": n, "sleep": 0.05, "bytes": 100}) for n in range(40)]
    second = [(f"l-{n}", {"n": n, "sleep": 0.05, "bytes": 100}) for n in range(40, 80)]
    hub.ingest(write_tasks(tmp_path / "first.jsonl", "blobs", first))
    hub.wait_results("blobs", 5, timeout=30)

    # Another process takes SQLite's write lock and keeps it longer than the hub's busy
    # timeout (5 s): the hub's commits fail with "database is locked" and are retried.
    held = 8.0
    locker = sqlite3.connect(hub.db_path, isolation_level=None, timeout=20)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        locked = time.monotonic()
        hub.submit(write_tasks(tmp_path / "second.jsonl", "blobs", second))
        holds_for(
            lambda: hub.alive and hub.connected_nodes() == joined,
            held - 1.0,
            0.2,
            "the hub up and its nodes connected while the database is locked",
        )
        while time.monotonic() - locked < held:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(sqlite3.Error):
            locker.execute("COMMIT")
        locker.close()
    released = time.monotonic()
    results = hub.wait_results("blobs", 80, timeout=60)
    print(f"\ndatabase locked {held:.0f} s; all 80 lines {time.monotonic() - released:.2f} s after")

    counts = collections.Counter(r["id"] for r in results)
    assert [i for i, n in counts.items() if n > 1] == []
    assert set(counts) == {f"l-{n}" for n in range(80)}
    assert {r["state"] for r in results} == {"C"}
    assert hub.alive and hub.connected_nodes() == joined
    log = hub.log_text()
    assert "retrying with backoff" in log, "the lock never made the hub retry"
    assert "available again" in log
    assert "HUB DEGRADED" not in log
    assert hub.query("status")["degraded"] is None
