"""Every benchmark runs once, at a tiny size, to prove it works (issue 8): real hubs and
nodes as processes, exit status 0, and the figures it prints. Speed is not asserted here:
docs/benchmarks.md holds the figures of full-size runs. (The chaos harness has its own
short run in test_chaos_e2e.py.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
HAVE_DASK = importlib.util.find_spec("distributed") is not None


def bench(script: str, *args: str, tmp_path: Path, timeout: float = 240) -> str:
    """Run ``bench/<script>`` with ``args``; its output, after checking it exited 0.

    Work directories go to the system's temporary directory, as by default: under
    pytest's tmp_path a hub's control socket path can be longer than AF_UNIX allows.
    """
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr}{done.stdout}"
    return done.stdout


def test_throughput_runs_issc_and_dask_side_by_side(tmp_path: Path) -> None:
    args = ["--nodes", "1", "--slots", "1", "--tasks", "20", "--process-tasks", "4"]
    if not HAVE_DASK:
        args.append("--skip-dask")
    out = bench("throughput.py", *args, tmp_path=tmp_path)
    assert "issc persistent:" in out and "issc process:" in out
    if HAVE_DASK:
        assert "dask" in out.split("system", 1)[1]  # Dask's rows in the same table


def test_swarm_holds_simulated_nodes_and_they_do_tasks(tmp_path: Path) -> None:
    out = bench(
        "swarm.py",
        *("--nodes", "20", "--hold", "3", "--heartbeat", "0.5", "--task-seconds", "0.1"),
        tmp_path=tmp_path,
    )
    held, failed, tasks = _swarm_row(out)
    assert (held, failed, tasks) == (20, 0, 20)


def _swarm_row(out: str) -> tuple[int, int, int]:
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["nodes", "held"])
    fields = lines[header + 1].split()
    return int(fields[1]), int(fields[2]), int(fields[7])


def test_transfer_runs(tmp_path: Path) -> None:
    out = bench(
        "transfer.py",
        *("--size-mb", "2", "--runs", "1", "--tasks", "4", "--shared-mb", "0.1"),
        *("--nodes", "1"),
        tmp_path=tmp_path,
    )
    assert "issc download" in out and "issc upload" in out


def test_relay_runs(tmp_path: Path) -> None:
    out = bench(
        "relay.py",
        *("--peers", "2", "--payload-mb", "0.1", "--shared-mb", "0.1"),
        *("--tasks-per-node", "1", "--task-seconds", "0.05"),
        tmp_path=tmp_path,
    )
    assert "relayed" in out and "direct" in out


def test_store_commit_runs(tmp_path: Path) -> None:
    out = bench("store_commit.py", "-n", "100", "--batch", "1", "50", "--dir", str(tmp_path),
                tmp_path=tmp_path)  # fmt: skip
    assert "50" in out
