"""Failpoints (hub/faults.py): the spec parser, each action, and the points in place.

A ``kill`` runs in a child process (it SIGKILLs whatever reaches it); the parent then
checks what the kill left: a batch whose commit was killed is not in the database, an
outbox export killed after its fsync is written again exactly once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub import faults
from hub.blobs import ContentStore, UploadArea
from hub.changes import Change, LeaseAccepted, LeaseEnded, LeaseOffered, TaskFinished
from hub.lifecycle import TaskState
from hub.outbox import Outbox
from hub.retry import is_disk_full
from hub.store import Store, TaskEntry
from issc.errors import ConfigError, StoreError
from issc.keys import public_key_string
from issc.manifest import Limits, Manifest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
T0 = 1_800_000_000.0
KEY = public_key_string(Ed25519PrivateKey.from_private_bytes(b"\x33" * 32).public_key())


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    faults.configure(None)
    yield
    faults.configure(None)


# ---- the spec ---------------------------------------------------------------------------


def test_a_spec_names_actions_per_point() -> None:
    spec = " store.before_commit=kill@40 , outbox.after_fsync=delay@0.5,"
    spec += "upload.after_fsync=enospc@3,outbox.after_fsync=kill@2"
    assert faults.parse(spec) == {
        "store.before_commit": (faults.Action("kill", nth=40),),
        "outbox.after_fsync": (
            faults.Action("delay", seconds=0.5),
            faults.Action("kill", nth=2),
        ),
        "upload.after_fsync": (faults.Action("enospc", nth=3),),
    }
    assert faults.parse("") == {}
    assert faults.parse(" , ") == {}


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("store.before_commit", "not point=action"),
        ("=kill@1", "not point=action"),
        ("store.before_commit=", "not point=action"),
        ("store.after_commit=kill@1", "unknown point 'store.after_commit'"),
        ("store.before_commit=kil@1", "unknown action 'kil@1'"),
        ("store.before_commit=kill", "unknown action 'kill'"),
        ("store.before_commit=kill@0", "N must be a whole number >= 1"),
        ("store.before_commit=kill@-1", "N must be a whole number >= 1"),
        ("store.before_commit=enospc@1.5", "N must be a whole number >= 1"),
        ("store.before_commit=enospc@x", "N must be a whole number >= 1"),
        ("store.before_commit=delay@-1", "SECONDS must be a number >= 0"),
        ("store.before_commit=delay@nan", "SECONDS must be a number >= 0"),
        ("store.before_commit=delay@inf", "SECONDS must be a number >= 0"),
        ("store.before_commit=delay@soon", "SECONDS must be a number >= 0"),
        ("runtime.after_commit=delay@1", "runtime.after_commit takes only kill"),
        ("runtime.after_commit=enospc@1", "runtime.after_commit takes only kill"),
        ("store.before_commit=kill@1,nonsense", "'nonsense': not point=action"),
    ],
)
def test_a_malformed_spec_is_a_config_error_naming_the_variable(spec: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        faults.configure_from_env({"ISSC_HUB_FAULTS": spec})
    assert str(caught.value).startswith("ISSC_HUB_FAULTS: ")
    assert why in str(caught.value)
    assert faults.armed() == {}, "a malformed spec armed something"


def test_without_the_variable_nothing_is_armed() -> None:
    faults.configure("store.before_commit=enospc@1")
    faults.configure_from_env({})  # a hub started without it
    assert faults.armed() == {}
    faults.point("store.before_commit")  # nothing happens


def test_the_hub_refuses_to_start_with_a_malformed_spec(tmp_path: Path) -> None:
    env = {**os.environ, "ISSC_HUB_FAULTS": "store.before_commit=explode@1"}
    done = subprocess.run(
        [sys.executable, "-m", "hub.cli", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("issc-hub: error: ISSC_HUB_FAULTS: "), done.stderr
    assert "unknown action 'explode@1'" in done.stderr
    assert "Traceback" not in done.stderr


# ---- the actions ------------------------------------------------------------------------


def test_enospc_is_raised_the_nth_time_only() -> None:
    faults.configure("outbox.after_fsync=enospc@2")
    faults.point("outbox.after_fsync")
    faults.point("upload.after_fsync")  # another point does not count
    with pytest.raises(OSError) as caught:
        faults.point("outbox.after_fsync")
    assert caught.value.errno == errno.ENOSPC
    assert "outbox.after_fsync" in str(caught.value)
    faults.point("outbox.after_fsync")  # and not again


def test_delay_sleeps_every_time() -> None:
    faults.configure("store.before_commit=delay@0.05")
    started = time.monotonic()
    for _ in range(3):
        faults.point("store.before_commit")
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    faults.point("upload.after_fsync")
    assert time.monotonic() - started < 0.05


def test_configure_counts_from_zero_again() -> None:
    faults.configure("upload.after_fsync=enospc@1")
    with pytest.raises(OSError):
        faults.point("upload.after_fsync")
    faults.configure("upload.after_fsync=enospc@1")
    with pytest.raises(OSError):
        faults.point("upload.after_fsync")


def _child(
    code: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    prelude = (
        "import logging, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "logging.basicConfig(level='INFO', format='%(levelname)s %(name)s: %(message)s')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def _critical(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("CRITICAL")]


def test_kill_logs_one_critical_line_then_sigkills_the_process_the_nth_time() -> None:
    done = _child(
        """
        from hub import faults
        faults.configure_from_env()
        for i in range(5):
            print(i, flush=True)
            faults.point("store.before_commit")
        print("survived", flush=True)
        """,
        env={"ISSC_HUB_FAULTS": "store.before_commit=kill@3"},
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.split() == ["0", "1", "2"]
    critical = _critical(done.stderr)
    assert len(critical) == 1, done.stderr
    assert "failpoint store.before_commit reached (kill@3" in critical[0]
    assert "failpoints armed (ISSC_HUB_FAULTS" in done.stderr


# ---- the points in place ------------------------------------------------------------------


def make_store(directory: Path) -> tuple[Store, str, list[int]]:
    """A SQLite store with one project, one node and two tasks (imported by the children)."""
    store = Store(f"sqlite:///{directory / 'hub.db'}")
    store.create_schema()
    made = directory / "made.json"
    if made.exists():
        node, pks = json.loads(made.read_text())
        return store, node, pks
    content = b"bundle"
    manifest = Manifest(
        name="primes",
        version=1,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=1,
        files=(),
        owner_key="ed25519:" + "A" * 43 + "=",
    )
    store.register_bundle(manifest, hashlib.sha256(content).hexdigest(), content, T0)
    node = store.enroll_node("alice", KEY, None, True, "127.0.0.1:1", 2, T0)
    entries = [TaskEntry(f"t-{i}", str(i), i + 1) for i in range(2)]
    _, pks = store.add_tasks("primes", entries, "f" * 64, "tasks.jsonl", T0)
    made.write_text(json.dumps([node, pks]))
    return store, node, pks


def offer(node: str, pks: list[int]) -> list[Change]:
    return [LeaseOffered(i + 1, pk, node, T0) for i, pk in enumerate(pks)]


def complete(node: str, pks: list[int]) -> list[Change]:
    changes: list[Change] = []
    for i, pk in enumerate(pks):
        lease = i + 1
        changes += [
            LeaseAccepted(lease, T0 + 1),
            LeaseEnded(lease, "completed", None, T0 + 2),
            TaskFinished(
                pk, TaskState.C, 1, lease, node, "alice", {"n": pk}, None, 0.1, 0.1, T0 + 2
            ),
        ]
    return changes


def test_a_commit_killed_before_it_ends_leaves_the_batch_out_whole(tmp_path: Path) -> None:
    done = _child(
        """
        from pathlib import Path
        from hub import faults
        from test_faults import complete, make_store, offer
        store, node, pks = make_store(Path(sys.argv[1]))
        faults.configure_from_env()
        store.apply(offer(node, pks))  # the first batch commits
        store.apply(complete(node, pks))  # the second dies inside its transaction
        print("survived", flush=True)
        """,
        str(tmp_path),
        env={"ISSC_HUB_FAULTS": "store.before_commit=kill@2"},
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "survived" not in done.stdout
    assert len(_critical(done.stderr)) == 1
    store, _node, _pks = make_store(tmp_path)
    try:
        assert store.state_counts()["C"] == 0  # nothing of the second batch
        assert store.state_counts()["NA"] == 2
        with store.engine.connect() as conn:
            leases = conn.exec_driver_sql("SELECT id, ended_at FROM leases ORDER BY id").all()
            results = conn.exec_driver_sql("SELECT count(*) FROM results").scalar()
            check = conn.exec_driver_sql("PRAGMA integrity_check").scalar()
        assert leases == [(1, None), (2, None)]  # the first batch, whole
        assert results == 0
        assert check == "ok"
    finally:
        store.close()


def test_a_commit_that_meets_enospc_is_rolled_back_as_a_full_disk(tmp_path: Path) -> None:
    store, node, pks = make_store(tmp_path)
    try:
        store.apply(offer(node, pks))
        faults.configure("store.before_commit=enospc@1")
        with pytest.raises(StoreError) as caught:
            store.apply(complete(node, pks))
        assert is_disk_full(caught.value)
        assert store.state_counts()["C"] == 0
        store.apply(complete(node, pks))  # the next try goes through
        assert store.state_counts()["C"] == 2
    finally:
        store.close()


def test_an_export_killed_after_its_fsync_is_written_again_exactly_once(tmp_path: Path) -> None:
    store, node, pks = make_store(tmp_path)
    store.apply(offer(node, pks) + complete(node, pks))
    store.close()
    done = _child(
        """
        from pathlib import Path
        from hub import faults
        from hub.blobs import ContentStore
        from hub.outbox import Outbox
        from test_faults import make_store
        root = Path(sys.argv[1])
        store, _node, _pks = make_store(root)
        faults.configure_from_env()
        Outbox(root / "outbox", store, ContentStore(root / "files")).export()
        print("survived", flush=True)
        """,
        str(tmp_path),
        env={"ISSC_HUB_FAULTS": "outbox.after_fsync=kill@1"},
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert len(_critical(done.stderr)) == 1
    path = tmp_path / "outbox" / "primes" / "results.jsonl"
    assert path.read_text().count("\n") == 2  # durable, but not recorded
    store, _node, _pks = make_store(tmp_path)
    try:
        assert store.outbox_sizes().get("primes", 0) == 0
        assert len(store.unexported(10)) == 2
        written = Outbox(tmp_path / "outbox", store, ContentStore(tmp_path / "files")).export()
        assert written == 2
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert sorted(ids) == ["t-0", "t-1"]
        assert store.unexported(10) == []
        assert store.outbox_sizes()["primes"] == path.stat().st_size
    finally:
        store.close()


def test_an_upload_chunk_that_meets_enospc_after_its_fsync_is_kept(tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads", ContentStore(tmp_path / "files"))
    data = os.urandom(3000)
    sha = hashlib.sha256(data).hexdigest()
    faults.configure("upload.after_fsync=enospc@2")
    assert area.write(5, "out.bin", sha, len(data), 0, data[:1000]) == 1000
    with pytest.raises(OSError) as caught:
        area.write(5, "out.bin", sha, len(data), 1000, data[1000:2000])
    assert caught.value.errno == errno.ENOSPC
    # Durable before the error: the hub holds it and says so when the node asks again.
    assert area.received(5, "out.bin", sha, len(data)) == 2000
    assert area.write(5, "out.bin", sha, len(data), 2000, data[2000:]) == len(data)
    assert area.store.size(sha) == len(data)
