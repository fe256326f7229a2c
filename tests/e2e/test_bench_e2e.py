"""Every benchmark runs once, at a tiny size, to prove it works (issue 8): real hubs and
nodes as processes, exit status 0, and the figures it prints. Speed is not asserted here:
docs/benchmarks.md holds the figures of full-size runs. (The chaos harness has its own
short run in test_chaos_e2e.py.)"""

from __future__ import annotations

import importlib.util
import json
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


def test_throughput_runs_issc_dask_bare_spawns_and_latency(tmp_path: Path) -> None:
    """``python -m bench.throughput --json`` from the repository root, at a tiny size:
    every part of issue 8's benchmark runs and lands in the JSON object."""
    args = ["--tasks", "50", "--process-tasks", "10", "--latency-runs", "3", "--json"]
    # Each wait gives up after 45 s, so a stuck run fails on its own, stops its hub and
    # nodes and says why, well inside pytest's 120 s timeout (whose kill would orphan them).
    args += ["--timeout", "45"]
    if not HAVE_DASK:
        args.append("--skip-dask")
    done = subprocess.run(
        [sys.executable, "-m", "bench.throughput", *args],
        capture_output=True,
        text=True,
        timeout=115,
        cwd=BENCH.parent,
    )
    assert done.returncode == 0, f"exited {done.returncode}:\n{done.stderr}{done.stdout}"
    report = json.loads(done.stdout)  # stdout holds the JSON alone; progress is on stderr
    assert "issc persistent:" in done.stderr
    assert {"machine", "versions", "settings", "throughput", "latency", "ratios"} <= set(report)
    assert report["settings"]["nodes"] == 2 and report["settings"]["slots"] == 1
    throughput = report["throughput"]
    assert throughput["issc"]["persistent"]["tasks"] == 50
    assert throughput["issc"]["process"]["tasks"] == 10
    assert throughput["bare_spawn"]["process"]["tasks"] == 10
    systems = ["issc", "bare_spawn"]
    if HAVE_DASK:
        systems += ["dask_default", "dask_saturation_inf"]
        assert report["dask_configs"]["dask_saturation_inf"]["worker_saturation"] == "inf"
    for system in systems:
        for figure in throughput[system].values():
            assert {"tasks", "seconds", "tasks_per_s", "cpu"} <= set(figure)
            assert figure["tasks_per_s"] > 0 and "total" in figure["cpu"]
    latency = report["latency"]
    assert latency["issc"]["runs"] == 3
    assert 0 < latency["issc"]["p50_ms"] <= latency["issc"]["p90_ms"] <= latency["issc"]["max_ms"]
    ratios = report["ratios"]
    assert ratios["process_issc_over_bare_spawn"] > 0
    if HAVE_DASK:
        assert latency["dask_default"]["runs"] == 3
        for key in (
            "persistent_issc_over_dask_default",
            "persistent_issc_over_dask_saturation_inf",
            "persistent_issc_over_dask_fastest",
            "latency_p50_issc_over_dask_default",
        ):
            assert ratios[key] > 0, key


def test_throughput_still_runs_as_a_script(tmp_path: Path) -> None:
    """``python bench/throughput.py`` (the Makefile's ``bench`` target) imports as well."""
    out = bench("throughput.py", "--help", tmp_path=tmp_path, timeout=60)
    assert "--latency-runs" in out and "--json" in out


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
