"""What the benchmarks share: a hub and its nodes as real processes in a work directory.

The scripts import this module as ``cluster``: run as ``python bench/<script>.py``, the
script's own directory is first on ``sys.path``. ``throughput.py`` also runs as
``python -m bench.throughput`` from the repository root (``bench`` is a namespace
package) and then imports it as ``bench.cluster``.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

BIN = Path(sys.executable).parent


class BenchError(Exception):
    """The benchmark could not run (a process died, a deadline passed)."""


def machine_info() -> dict[str, Any]:
    """The machine, for a benchmark's JSON: CPUs, RAM (GiB, None if unknown), platform,
    Python and the time (UTC, ISO 8601)."""
    memory: float | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory = round(int(line.split()[1]) / 1024**2, 1)
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_gib": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "time_utc": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}",
    }


def machine(extra: Sequence[str] = ()) -> str:
    """CPUs, RAM, platform, Python, then ``extra`` (e.g. a peer's version), and the time."""
    info = machine_info()
    memory = "?" if info["memory_gib"] is None else f"{info['memory_gib']:.1f} GiB"
    return ", ".join(
        [
            f"{info['cpus']} CPUs",
            f"{memory} RAM",
            info["platform"],
            f"Python {info['python']}",
            *extra,
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        ]
    )


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops what it started."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_in_workdir(name: str, parent: Path | None, keep: bool, body: Callable[[Path], None]) -> int:
    """Run ``body`` in a fresh directory ``issc-<name>-*`` under ``parent`` (default: the
    system's temporary directory); the exit status for the benchmark's ``main``.

    0 when ``body`` returns; 1 when it raises BenchError, whose message is printed and
    whose files are kept for the post-mortem; 130 on Ctrl-C or SIGTERM, after every
    ``finally`` inside ``body`` has stopped what it started. The directory is removed
    unless ``keep`` or the run failed.
    """
    work = Path(tempfile.mkdtemp(prefix=f"issc-{name}-", dir=parent))
    try:
        with terminate_as_interrupt():
            body(work)
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        keep = True
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every process started here is stopped", file=sys.stderr)
        return 130
    finally:
        if keep:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


class Cluster:
    """A hub and its nodes as processes in ``work``; ``stop`` ends them all."""

    wait_interval = 0.05  # seconds between looks in ``wait``

    def __init__(self, work: Path, timeout: float) -> None:
        self.work = work
        self.timeout = timeout
        self.hub_dir = work / "hub"
        self.inbox = self.hub_dir / "inbox"
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.public_key = ""
        self.address = ""

    # -- set-up

    def tool(self, *args: str | Path) -> str:
        command = [str(BIN / "issc-project"), *map(str, args)]
        done = subprocess.run(command, cwd=self.work, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command)} failed:\n{done.stderr}{done.stdout}")
        return done.stdout.strip()

    def start_hub(self, settings: str = "heartbeat_interval: 1\n") -> None:
        """A signing key (owner.key), then the hub with ``settings`` (YAML lines added to
        its config); waits for its address."""
        # The hub's data dir holds its control socket: not writable by group or others.
        self.hub_dir.mkdir(mode=0o755, parents=True)
        self.inbox.mkdir()
        self.public_key = self.tool("keygen", "--out", "owner.key").split()[-1]
        (self.work / "hub.yaml").write_text(
            "listen: 127.0.0.1:0\ndata_dir: ./hub\n" + settings, encoding="utf-8"
        )
        self.spawn("hub", "issc-hub", "hub.yaml")
        address_file = self.hub_dir / "hub.addr"
        self.wait(address_file.exists, "the hub's address file")
        self.address = address_file.read_text(encoding="utf-8").strip()

    def pack(
        self,
        name: str,
        directory: Path,
        entry: str,
        source: str,
        mode: str,
        wall_seconds: int,
        output_mb: int,
    ) -> Path:
        """Write a project into ``directory`` and sign it with owner.key; the bundle."""
        directory.mkdir()
        (directory / entry).write_text(source, encoding="utf-8")
        (directory / "project.yaml").write_text(
            f"name: {name}\nversion: 1\nentrypoint: [python3, {entry}]\nmode: {mode}\n"
            f"limits: {{wall_seconds: {wall_seconds}, memory_mb: 256, output_mb: {output_mb}}}\n"
            "quorum: 1\n",
            encoding="utf-8",
        )
        self.tool("pack", directory, "--key", "owner.key", "--out", f"{name}.issc")
        return self.work / f"{name}.issc"

    def register(self, name: str) -> None:
        """Submit the bundle ``<name>.issc``; wait until the hub has the project."""
        self.submit(self.work / f"{name}.issc")
        self.wait(
            lambda: any(p["name"] == name for p in self.control("projects")),
            f"project {name} registered",
        )

    def start_node(
        self,
        name: str,
        projects: Sequence[str],
        hub: str | None = None,
        slots: int = 2,
        volunteer: str = "bench",
    ) -> Path:
        """Start a node talking to ``hub`` (default: the hub), trusting owner.key for
        ``projects``; its data_dir."""
        keys = "".join(f'  {p}: "{self.public_key}"\n' for p in projects)
        config = self.work / f"{name}.yaml"
        config.write_text(
            f"hub: {hub or self.address}\nvolunteer: {volunteer}\ndata_dir: ./{name}\n"
            f"projects: [{', '.join(projects)}]\nslots: {slots}\ntrusted_keys:\n{keys}",
            encoding="utf-8",
        )
        self.spawn(name, "issc-node", config.name)
        return self.work / name

    def wait_nodes(self, count: int, what: str) -> None:
        self.wait(lambda: self.control("status")["nodes"]["connected"] == count, what)

    def spawn(self, name: str, program: str, config: str) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed after Popen
        try:
            process = subprocess.Popen(
                [str(BIN / program), "--config", config],
                cwd=self.work,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()  # the child holds its own descriptor
        self.processes.append((name, process))

    # -- while it runs

    def control(self, command: str, **args: Any) -> Any:
        from hub.ctl import request

        return request(self.hub_dir / "control.sock", command, args)

    def submit(self, *paths: Path) -> None:
        self.tool("submit", *paths, "--inbox", self.inbox)

    def wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            self.check_alive()
            try:
                if ready():
                    return
            except Exception as exc:  # the control socket is not up yet, say
                if time.monotonic() > deadline:
                    raise BenchError(f"waiting for {what}: {exc}") from exc
            if time.monotonic() > deadline:
                raise BenchError(f"no {what} after {self.timeout:.0f} s (logs in {self.work})")
            time.sleep(self.wait_interval)

    def check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                log = (self.work / f"{name}.log").read_text(errors="replace")
                raise BenchError(
                    f"{name} exited with status {process.returncode}; its log ends:\n"
                    + "\n".join(log.splitlines()[-20:])
                )

    # -- tear-down

    def stop(self) -> None:
        """Nodes first, then the hub: SIGTERM, and SIGKILL what does not stop in time."""
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
