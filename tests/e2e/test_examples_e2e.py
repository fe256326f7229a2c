"""The two sample projects, end to end: owner -> inbox -> hub -> nodes -> outbox -> owner."""

from __future__ import annotations

import collections
import math
import time
from pathlib import Path

import pytest
from e2e_harness import Cluster, OwnerKey, run_example

pytestmark = pytest.mark.e2e


def primes_below(n: int) -> int:
    """A direct count, independent of the project's segmented sieve."""
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for p in range(2, math.isqrt(n - 1) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, n, p)))
    return sum(sieve)


def test_primes_on_two_nodes_every_task_once(
    cluster: Cluster, owner_key: OwnerKey, primes_bundle: Path, tmp_path: Path
) -> None:
    upto, chunk = 200_000, 10_000
    hub = cluster.hub()
    hub.ingest(primes_bundle)
    keys = {"primes": owner_key.public}
    nodes = [
        cluster.node(hub, f"node{i}", trusted_keys=keys, slots=2, sandbox="auto") for i in (1, 2)
    ]
    node_ids = {node.wait_joined(hub) for node in nodes}
    assert len(node_ids) == 2

    tasks_file = tmp_path / "primes-tasks.jsonl"
    made = run_example(
        "primes", "make_tasks.py", "--upto", str(upto), "--chunk", str(chunk), "--out", tasks_file
    )
    assert made.returncode == 0, made.stderr
    expected_ids = {f"r-{k}" for k in range(upto // chunk)}
    started = time.monotonic()
    hub.submit(tasks_file)
    results = hub.wait_results("primes", len(expected_ids))
    elapsed = time.monotonic() - started
    print(
        f"\nprimes: {len(results)} tasks on 2 nodes x 2 slots in {elapsed:.2f} s from submit "
        f"to the last results line: {len(results) / elapsed:.1f} tasks/s"
    )

    counts = collections.Counter(r["id"] for r in results)
    assert set(counts) == expected_ids
    assert all(n == 1 for n in counts.values()), counts.most_common(3)
    assert {r["state"] for r in results} == {"C"}
    assert all(r["attempts"] == 1 and r["error"] is None for r in results)
    assert sum(r["result"] for r in results) == primes_below(upto) == 17984
    by_node = collections.Counter(r["node"] for r in results)
    assert set(by_node) == node_ids, f"work was not spread: {by_node}"

    # The owner's own tool agrees (it checks gaps and re-counts independently).
    summed = run_example(
        "primes", "sum_results.py", hub.outbox / "primes" / "results.jsonl", "--upto", str(upto)
    )
    assert summed.returncode == 0, summed.stdout + summed.stderr
    assert "17984" in summed.stdout

    # The admin's view matches the owner's.
    tasks = hub.tasks("primes")
    assert len(tasks) == len(expected_ids)
    assert {t["state"] for t in tasks} == {"C"}
    assert hub.query("status")["tasks"]["C"] == len(expected_ids)

    # SIGTERM with nodes connected: a clean, prompt stop that takes its files with it.
    assert hub.stop(timeout=10) == 0
    assert not hub.addr_file.exists() and not hub.control_socket.exists()


def test_mandelbrot_persistent_mode_picture(
    cluster: Cluster, owner_key: OwnerKey, mandelbrot_bundle: Path, tmp_path: Path
) -> None:
    hub = cluster.hub()
    hub.ingest(mandelbrot_bundle)
    node = cluster.node(hub, trusted_keys={"mandelbrot": owner_key.public}, slots=2, sandbox="auto")
    node.wait_joined(hub)

    tasks_file = tmp_path / "tiles.yaml"
    made = run_example(
        "mandelbrot",
        "make_tasks.py",
        "--width",
        "128",
        "--height",
        "128",
        "--tile",
        "32",
        "--max-iter",
        "100",
        "--out",
        tasks_file,
    )
    assert made.returncode == 0, made.stderr
    expected = {f"t-{x}-{y}" for x in range(0, 128, 32) for y in range(0, 128, 32)}
    hub.submit(tasks_file)
    results = hub.wait_results("mandelbrot", len(expected))
    assert sorted(r["id"] for r in results) == sorted(expected)
    assert {r["state"] for r in results} == {"C"}, [r["error"] for r in results if r["error"]]

    picture = tmp_path / "picture.png"
    assembled = run_example(
        "mandelbrot", "assemble.py", hub.outbox / "mandelbrot" / "results.jsonl", "--out", picture
    )
    assert assembled.returncode == 0, assembled.stdout + assembled.stderr
    data = picture.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert int.from_bytes(data[16:20], "big") == 128  # IHDR width
    assert int.from_bytes(data[20:24], "big") == 128  # IHDR height
