"""``make demo``: a hub, two volunteer nodes, two signed projects, results in front of you.

Everything happens in ./demo-run (made afresh): the owner makes a key, signs the
primes and mandelbrot bundles, and drops them with their task files into the hub's
inbox; two nodes (slots: 2 each) fetch, verify and run the work; progress is read
from the hub's control socket; at the end the prime count is checked and the
Mandelbrot tiles are assembled into a PNG. Every process started here is stopped
before the script exits. Exit status 0 means everything was computed and checked.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from issc.errors import ExecutionError
from node.sandbox import sandbox_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN = ROOT / "demo-run"
PRIMES_UPTO = 10_000_000
PRIMES_CHUNK = 250_000
TIMEOUT = 300.0


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str | Path, cwd: Path = RUN) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo: {' '.join(map(str, args))} failed:\n{done.stderr}{done.stdout}")
    return done.stdout.strip()


def wait_for(path: Path, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {what} did not appear in {timeout:.0f} s")
        time.sleep(0.05)


def control(command: str, **args: Any) -> Any:
    from hub.ctl import request  # the demo runs in the project's venv

    return request(RUN / "hub" / "control.sock", command, args)


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def main() -> int:
    shutil.rmtree(RUN, ignore_errors=True)
    # The hub's data dir holds its control socket: not writable by group or others.
    (RUN / "hub").mkdir(mode=0o755, parents=True)
    (RUN / "hub" / "inbox").mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        step("project owner: a signing key and two signed bundles")
        public_key = run(BIN / "issc-project", "keygen", "--out", "owner.key")
        print(f"public key: {public_key}")
        for project in ("primes", "mandelbrot"):
            print(
                run(
                    BIN / "issc-project",
                    "pack",
                    ROOT / "examples" / project,
                    "--key",
                    "owner.key",
                    "--out",
                    f"{project}.issc",
                )
            )
        print(run(BIN / "issc-project", "verify", "primes.issc", "--pubkey", "owner.key.pub"))
        print(
            run(
                sys.executable,
                ROOT / "examples/primes/make_tasks.py",
                "--upto",
                str(PRIMES_UPTO),
                "--chunk",
                str(PRIMES_CHUNK),
                "--out",
                "primes.jsonl",
            )
        )
        print(
            run(
                sys.executable,
                ROOT / "examples/mandelbrot/make_tasks.py",
                "--width",
                "512",
                "--height",
                "512",
                "--tile",
                "64",
                "--out",
                "mandelbrot.yaml",
            )
        )

        step("operator: the hub (embedded SQLite)")
        (RUN / "hub.yaml").write_text(
            "listen: 127.0.0.1:0\ndata_dir: ./hub\nheartbeat_interval: 1\n", encoding="utf-8"
        )
        hub_log = open(RUN / "hub.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(
            subprocess.Popen(
                [BIN / "issc-hub", "--config", "hub.yaml"],
                cwd=RUN,
                stdout=hub_log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(RUN / "hub" / "hub.addr", "the hub's address file")
        address = (RUN / "hub" / "hub.addr").read_text().strip()
        print(f"hub listening on {address}; log in {RUN / 'hub.log'}")

        step("volunteers: two nodes, two slots each")
        sandbox = "auto"
        try:
            sandbox_for("auto")  # the node's own check at start
        except ExecutionError as exc:
            # As root without bubblewrap, task code would run as nobody, who may not reach
            # an interpreter under /root; the demo then runs it unconfined, and says so.
            print(f"{exc}\nso the demo's nodes run tasks with sandbox: none")
            sandbox = "none"
        for name in ("alice", "bob"):
            (RUN / f"{name}.yaml").write_text(
                f"hub: {address}\nvolunteer: {name}\ndata_dir: ./node-{name}\n"
                f"projects: [primes, mandelbrot]\nslots: 2\nsandbox: {sandbox}\ntrusted_keys:\n"
                f'  primes: "{public_key}"\n  mandelbrot: "{public_key}"\n',
                encoding="utf-8",
            )
            log = open(RUN / f"node-{name}.log", "wb")  # noqa: SIM115
            processes.append(
                subprocess.Popen(
                    [BIN / "issc-node", "--config", f"{name}.yaml"],
                    cwd=RUN,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            print(f"node of {name} started; log in {RUN / f'node-{name}.log'}")

        step("project owner: submit bundles, then task files, into the inbox")
        print(
            run(
                BIN / "issc-project",
                "submit",
                "primes.issc",
                "mandelbrot.issc",
                "primes.jsonl",
                "mandelbrot.yaml",
                "--inbox",
                "hub/inbox",
            )
        )

        step("progress (from the hub's control socket)")
        expected = PRIMES_UPTO // PRIMES_CHUNK + 64
        deadline = time.monotonic() + TIMEOUT
        while True:
            status = control("status")
            tasks = status["tasks"]
            finished = tasks["C"] + tasks["F"] + tasks["X"]
            total = sum(tasks.values())
            print(
                f"\r{progress_bar(finished, expected)} {finished}/{expected} finished  "
                f"running {tasks['A']}  offered {tasks['TA']}  waiting {tasks['NA']}  "
                f"nodes {status['nodes']['connected']}  ",
                end="",
                flush=True,
            )
            if total == expected and finished == expected:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"\ndemo: not finished after {TIMEOUT:.0f} s (see the logs)")
            time.sleep(0.3)
        print()
        outbox = RUN / "hub" / "outbox"
        deadline = time.monotonic() + 20
        while (
            _lines(outbox / "primes" / "results.jsonl")
            + _lines(outbox / "mandelbrot" / "results.jsonl")
            < expected
        ):
            if time.monotonic() > deadline:
                raise SystemExit("demo: the outbox did not receive every result")
            time.sleep(0.1)
        for row in control("nodes"):
            print(f"node {row['node']} of {row['volunteer']}: {row['slots']} slots")

        step("results")
        print(
            run(
                sys.executable,
                ROOT / "examples/primes/sum_results.py",
                outbox / "primes" / "results.jsonl",
                "--upto",
                str(PRIMES_UPTO),
                "--tasks",
                "primes.jsonl",
            )
        )
        print(
            run(
                sys.executable,
                ROOT / "examples/mandelbrot/assemble.py",
                outbox / "mandelbrot" / "results.jsonl",
                "--out",
                RUN / "mandelbrot.png",
            )
        )
        print(f"\npicture: {RUN / 'mandelbrot.png'}")
        print(f"results: {outbox}/<project>/results.jsonl")
        print(f"demo finished in {time.monotonic() - started:.1f} s")
        return 0
    finally:
        _stop(processes)


def _lines(path: Path) -> int:
    try:
        return sum(1 for _ in path.open(encoding="utf-8"))
    except FileNotFoundError:
        return 0


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Stop nodes first, then the hub; kill whatever does not stop in time."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())
