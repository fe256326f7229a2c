"""Input and output files end to end: fetched once per node, verified, uploaded exactly once.

Real hub and node processes (see e2e_harness.py). What each test shows:

* the wordfreq sample project, as its README runs it, on two nodes: every counts.json in
  the outbox matches its results line, and the owner's merge.py agrees;
* tasks sharing one large input file: each node fetches it once, so the hub's
  ``transfers.file_bytes_sent`` is (nodes that ran) x shared size + the per-task files;
* the hub SIGKILLed while an output file is half uploaded: after a restart the node
  resumes from what the hub held durably, and the file lands in the outbox once, intact;
* output over ``limits.output_mb``: the task fails (twice, so F) with the limit named;
* an input file corrupted in the hub's content store: the node's digest check fails,
  the file is fetched once more, fails again, and the task fails naming the file
  without its program ever running.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import (
    EXAMPLES,
    Cluster,
    Hub,
    OwnerKey,
    free_port,
    pack,
    run_example,
    wait_until,
    write_project,
)

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def write_file_tasks(path: Path, project: str, tasks: list[dict[str, Any]]) -> Path:
    """A JSONL task file; each task ``{"id", "input", "files"?}``."""
    path.write_text("".join(json.dumps({"project": project, **t}) + "\n" for t in tasks))
    return path


def transfers(hub: Hub) -> dict[str, int]:
    """The hub's transfer counters (since it started)."""
    return dict(hub.ctl("status")["transfers"])


def cached_files(data_dir: Path) -> list[str]:
    """Names in a node's input-file cache (complete files and ``.part`` downloads)."""
    directory = data_dir / "files"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


# ---- 1. the wordfreq sample project ----------------------------------------------------


def test_wordfreq_on_two_nodes_outbox_files_match_and_merge(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    # As the example's README runs it: texts and stopwords in a work directory, the task
    # file written there, submitted with issc-project submit (which carries the files).
    work = tmp_path / "wordfreq-work"
    shutil.copytree(EXAMPLES / "wordfreq" / "texts", work / "texts")
    shutil.copyfile(EXAMPLES / "wordfreq" / "stopwords.txt", work / "stopwords.txt")
    task_file = work / "wordfreq-tasks.yaml"
    made = run_example(
        "wordfreq",
        "make_tasks.py",
        "--texts",
        work / "texts",
        "--stopwords",
        work / "stopwords.txt",
        "--out",
        task_file,
    )
    assert made.returncode == 0, made.stderr
    ids = {f"w-{p.stem}" for p in (work / "texts").iterdir()}
    assert len(ids) == 6

    hub = cluster.hub()
    hub.ingest(pack(EXAMPLES / "wordfreq", owner_key, tmp_path / "wordfreq-1.issc"))
    keys = {"wordfreq": owner_key.public}
    nodes = [
        cluster.node(hub, f"node{i}", trusted_keys=keys, slots=2, sandbox="auto") for i in (1, 2)
    ]
    node_ids = {node.wait_joined(hub) for node in nodes}
    hub.submit(task_file)
    results = hub.wait_results("wordfreq", len(ids))

    counts = collections.Counter(r["id"] for r in results)
    assert set(counts) == ids and set(counts.values()) == {1}
    assert {r["state"] for r in results} == {"C"}, [r["error"] for r in results]
    assert {r["node"] for r in results} == node_ids, "both nodes should have run tasks"
    outbox = hub.outbox / "wordfreq"
    for r in results:
        [listed] = r["files"]
        assert listed["name"] == "counts.json"
        directory = outbox / "files" / r["id"]
        assert sorted(p.name for p in directory.iterdir()) == ["counts.json"]
        path = directory / "counts.json"
        assert path.stat().st_size == listed["size"]
        assert sha256_of(path) == listed["sha256"]
        words = json.loads(path.read_text())
        assert sum(words.values()) == r["result"]["words"]

    merged = run_example("wordfreq", "merge.py", outbox, "--tasks", task_file, "--top", "5")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "wordfreq: 6 texts merged" in merged.stdout
    assert "(0 failed, 0 missing)" in merged.stdout


# ---- 2. a shared input file crosses the wire once per node -------------------------------

SHARED_PROGRAM = """\
import hashlib, json, sys, time
task = json.load(sys.stdin)
time.sleep(task["sleep"])
shared = hashlib.sha256(open("in/shared", "rb").read()).hexdigest()
print(json.dumps({"shared": shared, "own": open("in/own").read()}))
"""
SHARED_TASKS = 12
SHARED_SIZE = 3 * MIB


def test_shared_input_crosses_the_wire_once_per_node(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    bundle = pack(
        write_project(tmp_path / "shared-src", "shared", SHARED_PROGRAM),
        owner_key,
        tmp_path / "shared-1.issc",
    )
    work = tmp_path / "shared-work"
    (work / "own").mkdir(parents=True)
    shared = work / "shared.bin"
    shared.write_bytes(os.urandom(SHARED_SIZE))
    shared_sha = sha256_of(shared)
    own_texts = {}
    tasks = []
    for i in range(SHARED_TASKS):
        task_id = f"s-{i}"
        own_texts[task_id] = f"{task_id} says hello\n" * (i + 1)  # distinct content each
        (work / "own" / f"{task_id}.txt").write_text(own_texts[task_id])
        tasks.append(
            {
                "id": task_id,
                "input": {"sleep": 0.05},
                "files": {"shared": "shared.bin", "own": f"own/{task_id}.txt"},
            }
        )
    task_file = write_file_tasks(work / "shared-tasks.jsonl", "shared", tasks)
    own_bytes = sum(len(text.encode()) for text in own_texts.values())

    hub = cluster.hub()
    hub.ingest(bundle)
    keys = {"shared": owner_key.public}
    nodes = [
        cluster.node(hub, f"node{i}", trusted_keys=keys, slots=2, sandbox="auto") for i in (1, 2)
    ]
    node_ids = {node.wait_joined(hub) for node in nodes}
    hub.submit(task_file)
    results = hub.wait_results("shared", SHARED_TASKS)

    counts = collections.Counter(r["id"] for r in results)
    assert set(counts) == set(own_texts) and set(counts.values()) == {1}
    assert {r["state"] for r in results} == {"C"}, [r["error"] for r in results]
    assert all(r["attempts"] == 1 for r in results)
    for r in results:
        assert r["result"] == {"shared": shared_sha, "own": own_texts[r["id"]]}
    assert {r["node"] for r in results} == node_ids, "both nodes should have run tasks"

    # Each node fetched the shared file once and keeps one copy; every per-task file
    # crossed the wire once (to the node that ran the task).
    sent = transfers(hub)["file_bytes_sent"]
    assert sent == len(node_ids) * SHARED_SIZE + own_bytes, (
        f"{sent} file bytes sent; expected {len(node_ids)} x {SHARED_SIZE} + {own_bytes}"
    )
    for node in nodes:
        held = cached_files(node.data_dir)
        assert held.count(shared_sha) == 1 and not [n for n in held if n.endswith(".part")]
        ran = sum(1 for r in results if r["node"] == node.node_id)
        assert len(held) == 1 + ran, held  # the shared file and one file per task it ran
    naive = SHARED_TASKS * SHARED_SIZE + own_bytes
    print(
        f"\nbytes on the wire: {SHARED_TASKS} tasks sharing one {SHARED_SIZE} B input on "
        f"{len(node_ids)} nodes: {sent} file bytes sent ({sent / SHARED_SIZE:.2f} x the "
        f"shared file; {naive} = {naive / sent:.1f} x as much if each task fetched it)"
    )


# ---- 3. the hub killed in the middle of an upload ----------------------------------------

BIG_OUTPUT_PROGRAM = """\
import hashlib, json, os, sys
size = json.load(sys.stdin)["size"]
os.makedirs("out", exist_ok=True)
digest = hashlib.sha256()
with open("out/big.bin", "wb") as f:
    left = size
    while left:
        block = os.urandom(min(left, 1 << 20))
        digest.update(block)
        f.write(block)
        left -= len(block)
print(json.dumps({"sha256": digest.hexdigest(), "size": size}))
"""
BIG_SIZE = 24 * MIB


def test_hub_killed_during_upload_resumes_and_lands_once(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    bundle = pack(
        write_project(tmp_path / "big-src", "big", BIG_OUTPUT_PROGRAM, output_mb=32),
        owner_key,
        tmp_path / "big-1.issc",
    )
    # A fixed port, so the node finds the restarted hub; a long heartbeat window, so the
    # lease restored at the restart outlives the node's reconnect back-off.
    hub = cluster.hub(port=free_port(), heartbeat_misses=20)
    hub.ingest(bundle)
    node = cluster.node(
        hub, "node1", trusted_keys={"big": owner_key.public}, slots=1, sandbox="auto"
    )
    node.wait_joined(hub)
    task_file = write_file_tasks(
        tmp_path / "big.jsonl", "big", [{"id": "b-1", "input": {"size": BIG_SIZE}}]
    )
    hub.submit(task_file)

    uploads = hub.data_dir / "uploads"

    def partial_upload() -> tuple[Path, int] | None:
        for part in uploads.glob("*/big.bin.part"):
            try:
                size = part.stat().st_size
            except FileNotFoundError:
                continue
            if BIG_SIZE // 4 <= size < BIG_SIZE:  # well into the upload, not at its end
                return part, size
        return None

    part, _ = wait_until(partial_upload, 30, 0.001, "a partial upload of big.bin")
    hub.kill(signal.SIGKILL)
    held = part.stat().st_size  # what the killed hub holds: every chunk it acknowledged
    assert BIG_SIZE // 4 <= held < BIG_SIZE, f"not a partial upload when the hub died: {held}"
    assert hub.results("big") == []
    lease = int(part.parent.name)
    # The result waits in the node's spool with its file while the hub is down.
    wait_until(lambda: lease in node.spooled(), 10, what="the result in the node's spool")

    restarted = time.monotonic()
    hub.start()
    [result] = hub.wait_results("big", 1, timeout=30)
    resumed_after = time.monotonic() - restarted

    assert result["state"] == "C", result["error"]
    assert result["attempts"] == 1
    expected_sha = result["result"]["sha256"]
    assert result["files"] == [{"name": "big.bin", "size": BIG_SIZE, "sha256": expected_sha}]
    directory = hub.outbox / "big" / "files" / "b-1"
    assert [p.name for p in directory.iterdir()] == ["big.bin"]  # one copy, no temp file
    assert sha256_of(directory / "big.bin") == expected_sha  # byte-identical to the task's
    # The restarted hub took only what the killed one had not: the upload resumed at `held`.
    received = transfers(hub)["upload_bytes_received"]
    assert received == BIG_SIZE - held, f"received {received} after restart, held {held}"
    # Nothing left behind: the node's spool, the hub's partial upload.
    wait_until(lambda: not node.spooled(), 10, what="the node's spool to empty")
    wait_until(lambda: not any(uploads.iterdir()), 10, what="the upload area to empty")
    assert len(hub.results("big")) == 1
    print(
        f"\nhub SIGKILL with {held}/{BIG_SIZE} bytes of big.bin held; after the restart it "
        f"received {received} bytes and the result line came {resumed_after:.2f} s later"
    )


# ---- 4. output over limits.output_mb -----------------------------------------------------

OVER_CAP_PROGRAM = """\
import json, os, sys
task = json.load(sys.stdin)
os.makedirs("out", exist_ok=True)
for name, size in task["files"].items():
    with open(os.path.join("out", name), "wb") as f:
        f.write(b"x" * size)
print(json.dumps("written"))
"""


def test_output_over_the_cap_fails_naming_the_limit(
    cluster: Cluster, owner_key: OwnerKey, tmp_path: Path
) -> None:
    bundle = pack(
        write_project(tmp_path / "cap-src", "cap", OVER_CAP_PROGRAM, output_mb=1),
        owner_key,
        tmp_path / "cap-1.issc",
    )
    hub = cluster.hub()
    hub.ingest(bundle)
    node = cluster.node(
        hub, "node1", trusted_keys={"cap": owner_key.public}, slots=2, sandbox="auto"
    )
    node.wait_joined(hub)
    tasks = [
        # Two files, each under the per-file size limit, 2 MB together: over output_mb.
        {"id": "two-files", "input": {"files": {"a.bin": 1_000_000, "b.bin": 1_000_000}}},
        # One file of 2 MB: the file size limit stops the write at 1 MiB (EFBIG).
        {"id": "one-file", "input": {"files": {"big.bin": 2_000_000}}},
        # Within the cap: lands in the outbox.
        {"id": "fits", "input": {"files": {"small.bin": 500_000}}},
    ]
    hub.submit(write_file_tasks(tmp_path / "cap.jsonl", "cap", tasks))
    results = {r["id"]: r for r in hub.wait_results("cap", len(tasks))}

    two = results["two-files"]
    assert two["state"] == "F" and two["attempts"] == 2  # a code failure is tried twice
    assert "output files total 2000000 bytes, over the output_mb limit of 1 MiB" in two["error"]
    one = results["one-file"]
    assert one["state"] == "F" and one["attempts"] == 2
    assert one["error"].startswith("out/big.bin reached the output_mb limit of 1 MiB; "), one[
        "error"
    ]
    for failed in (two, one):
        assert failed["files"] == [] and failed["result"] is None
        assert not (hub.outbox / "cap" / "files" / failed["id"]).exists()
    fits = results["fits"]
    assert fits["state"] == "C" and [f["size"] for f in fits["files"]] == [500_000]
    assert (hub.outbox / "cap" / "files" / "fits" / "small.bin").stat().st_size == 500_000
    # Nothing of the refused output reached the hub.
    assert transfers(hub)["upload_bytes_received"] == 500_000


# ---- 5. an input file tampered with in the hub's store -----------------------------------

MARKER_PROGRAM = """\
import json, sys
task = json.load(sys.stdin)
open(task["marker"], "w").write("ran")
print(json.dumps(len(open("in/data", "rb").read())))
"""
TAMPERED_SIZE = 300_000


def test_tampered_input_never_runs(cluster: Cluster, owner_key: OwnerKey, tmp_path: Path) -> None:
    bundle = pack(
        write_project(tmp_path / "tamper-src", "tamper", MARKER_PROGRAM),
        owner_key,
        tmp_path / "tamper-1.issc",
    )
    work = tmp_path / "tamper-work"
    work.mkdir()
    data = work / "data.bin"
    data.write_bytes(os.urandom(TAMPERED_SIZE))
    sha = sha256_of(data)
    marker = tmp_path / "ran"
    task_file = write_file_tasks(
        work / "tamper.jsonl",
        "tamper",
        [{"id": "t-1", "input": {"marker": str(marker)}, "files": {"data": "data.bin"}}],
    )
    hub = cluster.hub()
    hub.ingest(bundle)
    hub.ingest(task_file)  # no node yet: nothing is fetched before the file is corrupted

    # Corrupt the stored copy in place, same size, so only its digest can tell.
    stored = hub.data_dir / "files" / sha[:2] / sha
    assert stored.stat().st_size == TAMPERED_SIZE
    stored.chmod(0o644)
    content = bytearray(stored.read_bytes())
    content[TAMPERED_SIZE // 2] ^= 0xFF
    stored.write_bytes(bytes(content))
    stored.chmod(0o444)

    node = cluster.node(
        hub, "node1", trusted_keys={"tamper": owner_key.public}, slots=1, sandbox="auto"
    )
    [result] = hub.wait_results("tamper", 1)
    assert result["state"] == "F" and result["attempts"] == 2
    assert "input file data" in result["error"] and "(twice)" in result["error"], result["error"]
    assert not marker.exists(), "the task program ran on a corrupt input"
    # Two attempts, each fetching the file and once more after the first mismatch.
    assert transfers(hub)["file_bytes_sent"] == 4 * TAMPERED_SIZE
    # Nothing of the bad data is kept on the node.
    assert [n for n in cached_files(node.data_dir) if n.startswith(sha)] == []
