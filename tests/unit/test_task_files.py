"""Input files in ``in/`` and output files from ``out/``, in both modes, with real processes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import textwrap
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from issc.manifest import Limits
from node.executor import PersistentExecutor, ProcessExecutor, RunOutcome, RunRequest
from node.sandbox import fresh_scratch
from node.taskfiles import OutputFile, collect_outputs, reset_task_dirs

pytestmark = pytest.mark.timeout(30)

AS_ROOT = os.geteuid() == 0
LIMITS = Limits(wall_seconds=10, memory_mb=256, output_mb=1)
MIB = 1024 * 1024

# Reports what it finds in in/, tries to change its input, then writes what the input says:
# {"write": {NAME: TEXT}, "links": {NAME: TARGET}, "dirs": [NAME], "big": {NAME: BYTES}}.
TASK = """
import json, os, stat

def task(spec):
    seen = {}
    for name in sorted(os.listdir("in")):
        path = os.path.join("in", name)
        seen[name] = {"text": open(path).read(), "mode": oct(stat.S_IMODE(os.stat(path).st_mode))}
    try:
        open(os.path.join("in", "new.txt"), "w").close()
        in_writable = True
    except PermissionError:
        in_writable = False
    for name in spec.get("tamper", []):  # the copy may change; the node's cache must not
        os.chmod(os.path.join("in", name), 0o644)
        open(os.path.join("in", name), "w").write("tampered")
    stale = sorted(os.listdir("out"))
    for name, text in spec.get("write", {}).items():
        open(os.path.join("out", name), "w").write(text)
    for name, size in spec.get("big", {}).items():
        open(os.path.join("out", name), "wb").write(bytes(size))
    for name, target in spec.get("links", {}).items():
        os.symlink(target, os.path.join("out", name))
    for name in spec.get("dirs", []):
        os.mkdir(os.path.join("out", name))
    in_mode = oct(stat.S_IMODE(os.stat("in").st_mode))
    return {"in": seen, "in_writable": in_writable, "in_mode": in_mode, "stale_out": stale}
"""

PROCESS_MAIN = (
    TASK
    + """
import sys
print(json.dumps(task(json.load(sys.stdin))))
"""
)

PERSISTENT_MAIN = (
    TASK
    + """
import sys, time
for line in sys.stdin:
    message = json.loads(line)
    spec = message["input"]
    if spec.get("late"):  # answers first, writes after: out/ is no longer this task's
        reply = {"id": message["id"], "result": task(spec)}
        sys.stdout.write(json.dumps(reply) + "\\n")
        sys.stdout.flush()
        time.sleep(0.3)
        open(os.path.join("out", "late.txt"), "w").write("too late")
        continue
    if spec.get("fail"):
        open(os.path.join("out", "partial.txt"), "w").write("half")
        reply = {"id": message["id"], "error": "failed on purpose"}
    else:
        reply = {"id": message["id"], "result": task(spec)}
    sys.stdout.write(json.dumps(reply) + "\\n")
    sys.stdout.flush()
"""
)


def bundle(root: Path, source: str) -> Path:
    path = root / "bundle"
    path.mkdir(exist_ok=True)
    (path / "main.py").write_text(textwrap.dedent(source))
    return path


def cached_file(root: Path, name: str, text: str) -> Path:
    """A file standing in for one in the node's input-file cache."""
    path = root / "cache" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    path.chmod(0o444)
    return path


def request(
    bundle_dir: Path,
    spec: dict[str, Any],
    *,
    lease: int = 1,
    inputs: Mapping[str, Path] | None = None,
    output_dir: Path | None = None,
    limits: Limits = LIMITS,
) -> RunRequest:
    return RunRequest(
        lease=lease,
        task_id=f"t-{lease}",
        input=spec,
        bundle_dir=bundle_dir,
        entrypoint=("python3", "main.py"),
        limits=limits,
        input_files=inputs or {},
        output_dir=output_dir,
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def process(tmp_path: Path) -> AsyncIterator[ProcessExecutor]:
    executor = ProcessExecutor(tmp_path / "scratch")
    yield executor
    await executor.close()


@pytest.fixture
async def persistent(tmp_path: Path) -> AsyncIterator[PersistentExecutor]:
    executor = PersistentExecutor(tmp_path / "scratch", max_processes=1)
    yield executor
    await executor.close()


def failed(outcome: RunOutcome) -> str:
    assert not outcome.ok
    assert outcome.output_files == ()
    assert outcome.error is not None
    return outcome.error


# ---- process mode -----------------------------------------------------------------------


async def test_inputs_are_read_only_copies_in_in(tmp_path: Path, process: ProcessExecutor) -> None:
    source = cached_file(tmp_path, "abc", "the words")
    outcome = await process.run(
        request(
            bundle(tmp_path, PROCESS_MAIN),
            {"tamper": ["words.txt"]},
            inputs={"words.txt": source},
        )
    )
    assert outcome.ok, outcome.error
    assert outcome.result["in"] == {"words.txt": {"text": "the words", "mode": "0o444"}}
    assert outcome.result["in_writable"] is AS_ROOT  # in/ is 0555; root ignores that
    assert outcome.result["in_mode"] == "0o555"
    assert source.read_text() == "the words"  # a copy, not a link to the cache


async def test_outputs_are_checked_moved_and_reported(
    tmp_path: Path, process: ProcessExecutor
) -> None:
    spool = tmp_path / "spool" / "1.out"
    outcome = await process.run(
        request(
            bundle(tmp_path, PROCESS_MAIN),
            {"write": {"counts.json": '{"a": 1}', "b.txt": "bee"}},
            output_dir=spool,
        )
    )
    assert outcome.ok, outcome.error
    assert outcome.output_files == (
        OutputFile("b.txt", spool / "b.txt", 3, sha(b"bee")),
        OutputFile("counts.json", spool / "counts.json", 8, sha(b'{"a": 1}')),
    )
    assert (spool / "counts.json").read_text() == '{"a": 1}'
    assert not (tmp_path / "scratch" / "1").exists()


async def test_without_an_output_dir_out_is_not_collected(
    tmp_path: Path, process: ProcessExecutor
) -> None:
    outcome = await process.run(request(bundle(tmp_path, PROCESS_MAIN), {"links": {"x": "/"}}))
    assert outcome.ok, outcome.error
    assert outcome.output_files == ()


async def test_an_empty_out_gives_no_files(tmp_path: Path, process: ProcessExecutor) -> None:
    spool = tmp_path / "spool" / "1.out"
    outcome = await process.run(request(bundle(tmp_path, PROCESS_MAIN), {}, output_dir=spool))
    assert outcome.ok, outcome.error
    assert outcome.output_files == ()
    assert not spool.exists()


async def test_outputs_over_output_mb_together_fail_the_task(
    tmp_path: Path, process: ProcessExecutor
) -> None:
    # Each file is under RLIMIT_FSIZE (1 MiB); only their sum is over the limit.
    spool = tmp_path / "spool" / "1.out"
    spec = {"big": {"a.bin": 700 * 1024, "b.bin": 700 * 1024}}
    outcome = await process.run(request(bundle(tmp_path, PROCESS_MAIN), spec, output_dir=spool))
    assert failed(outcome) == (
        f"output files total {1400 * 1024} bytes, over the output_mb limit of 1 MiB"
    )
    assert not spool.exists()


async def test_one_output_file_over_output_mb_fails_naming_the_limit(
    tmp_path: Path, process: ProcessExecutor
) -> None:
    # RLIMIT_FSIZE stops the write at 1 MiB; Python ignores SIGXFSZ and dies of EFBIG
    # ("File too large"), so the node names the limit from what out/ holds.
    spool = tmp_path / "spool" / "1.out"
    spec = {"big": {"a.bin": 2 * MIB}}
    outcome = await process.run(request(bundle(tmp_path, PROCESS_MAIN), spec, output_dir=spool))
    error = failed(outcome)
    assert error.startswith("out/a.bin reached the output_mb limit of 1 MiB; exit status 1"), error
    assert "File too large" in error
    assert not spool.exists()


async def test_a_symlink_in_out_fails_the_task_and_is_not_followed(
    tmp_path: Path, process: ProcessExecutor
) -> None:
    secret = tmp_path / "identity.json"
    secret.write_text("node secret")
    spool = tmp_path / "spool" / "1.out"
    spec = {"write": {"fine.txt": "ok"}, "links": {"secret.txt": str(secret)}}
    outcome = await process.run(request(bundle(tmp_path, PROCESS_MAIN), spec, output_dir=spool))
    assert failed(outcome) == "out/secret.txt: output entries must be plain files"
    assert not spool.exists()


async def test_a_directory_in_out_fails_the_task(tmp_path: Path, process: ProcessExecutor) -> None:
    spool = tmp_path / "spool" / "1.out"
    outcome = await process.run(
        request(bundle(tmp_path, PROCESS_MAIN), {"dirs": ["sub"]}, output_dir=spool)
    )
    assert failed(outcome) == "out/sub: output entries must be plain files"


@pytest.mark.parametrize("name", [".hidden", "-dash", "sp ace", "x" * 129])
async def test_an_output_name_that_is_not_plain_fails_the_task(
    tmp_path: Path, process: ProcessExecutor, name: str
) -> None:
    spool = tmp_path / "spool" / "1.out"
    outcome = await process.run(
        request(bundle(tmp_path, PROCESS_MAIN), {"write": {name: "x"}}, output_dir=spool)
    )
    assert "output file names must be" in failed(outcome)


async def test_more_than_64_output_files_fail_the_task(
    tmp_path: Path, process: ProcessExecutor
) -> None:
    spool = tmp_path / "spool" / "1.out"
    spec = {"write": {f"f{n}.txt": "x" for n in range(65)}}
    outcome = await process.run(request(bundle(tmp_path, PROCESS_MAIN), spec, output_dir=spool))
    assert failed(outcome) == "out/ holds 65 entries; at most 64 output files"


def test_a_file_swapped_for_a_symlink_after_the_check_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A persistent worker keeps running while out/ is collected: it may swap a checked
    # file for a symlink. The copy opens with O_NOFOLLOW, so that is refused too.
    scratch = tmp_path / "scratch"
    fresh_scratch(scratch)
    (scratch / "out" / "a.txt").write_text("fine")
    secret = tmp_path / "secret"
    secret.write_text("node secret")
    import node.taskfiles as taskfiles

    real_copy = taskfiles._copy_out

    def swap_then_copy(source: Path, target: Path, size: int) -> OutputFile:
        source.unlink()
        source.symlink_to(secret)
        return real_copy(source, target, size)

    monkeypatch.setattr(taskfiles, "_copy_out", swap_then_copy)
    with pytest.raises(ValueError, match=r"out/a\.txt: output entries must be plain files"):
        collect_outputs(scratch, tmp_path / "dest", output_mb=1)
    assert not (tmp_path / "dest").exists()


# ---- persistent mode --------------------------------------------------------------------


async def test_persistent_in_and_out_belong_to_one_task_at_a_time(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    main = bundle(tmp_path, PERSISTENT_MAIN)
    first = await persistent.run(
        request(
            main,
            {"write": {"one.txt": "1"}},
            lease=1,
            inputs={"a.txt": cached_file(tmp_path, "a", "A")},
            output_dir=tmp_path / "spool" / "1.out",
        )
    )
    assert first.ok, first.error
    assert first.result["in"] == {"a.txt": {"text": "A", "mode": "0o444"}}
    assert (first.result["in_writable"], first.result["in_mode"]) == (AS_ROOT, "0o555")
    assert [f.name for f in first.output_files] == ["one.txt"]
    second = await persistent.run(
        request(
            main,
            {"write": {"two.txt": "2"}},
            lease=2,
            inputs={"b.txt": cached_file(tmp_path, "b", "B")},
            output_dir=tmp_path / "spool" / "2.out",
        )
    )
    assert second.ok, second.error
    assert second.result["in"] == {"b.txt": {"text": "B", "mode": "0o444"}}  # not a.txt
    assert second.result["stale_out"] == []  # one.txt went with the first task
    assert [f.name for f in second.output_files] == ["two.txt"]
    assert (tmp_path / "spool" / "2.out" / "two.txt").read_text() == "2"
    assert (tmp_path / "spool" / "1.out" / "one.txt").read_text() == "1"


async def test_persistent_failed_task_leaves_no_outputs_for_the_next(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    main = bundle(tmp_path, PERSISTENT_MAIN)
    spool = tmp_path / "spool" / "1.out"
    outcome = await persistent.run(request(main, {"fail": True}, lease=1, output_dir=spool))
    assert failed(outcome) == "failed on purpose"
    assert not spool.exists()
    after = await persistent.run(
        request(main, {}, lease=2, output_dir=tmp_path / "spool" / "2.out")
    )
    assert after.ok, after.error
    assert after.result["stale_out"] == []


async def test_persistent_outputs_over_the_limit_fail_but_keep_the_worker(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    main = bundle(tmp_path, PERSISTENT_MAIN)
    spec = {"big": {"a.bin": 700 * 1024, "b.bin": 700 * 1024}}
    spool = tmp_path / "spool" / "1.out"
    outcome = await persistent.run(request(main, spec, lease=1, output_dir=spool))
    assert "over the output_mb limit of 1 MiB" in failed(outcome)
    after = await persistent.run(
        request(main, {}, lease=2, output_dir=tmp_path / "spool" / "2.out")
    )
    assert after.ok, after.error
    assert after.result["stale_out"] == []


async def test_persistent_one_output_file_over_output_mb_names_the_limit(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    main = bundle(tmp_path, PERSISTENT_MAIN)
    spool = tmp_path / "spool" / "1.out"
    outcome = await persistent.run(request(main, {"big": {"a.bin": 2 * MIB}}, output_dir=spool))
    assert failed(outcome).startswith("out/a.bin reached the output_mb limit of 1 MiB; ")
    assert not spool.exists()


async def test_persistent_out_is_emptied_before_each_task_too(
    tmp_path: Path, persistent: PersistentExecutor
) -> None:
    main = bundle(tmp_path, PERSISTENT_MAIN)
    first = await persistent.run(
        request(main, {"late": True}, lease=1, output_dir=tmp_path / "spool" / "1.out")
    )
    assert first.ok, first.error
    await asyncio.sleep(0.6)  # the worker has written out/late.txt after answering
    second = await persistent.run(
        request(main, {}, lease=2, output_dir=tmp_path / "spool" / "2.out")
    )
    assert second.ok, second.error
    assert second.result["stale_out"] == []
    assert second.output_files == ()


def test_reset_empties_in_and_out_and_restores_their_mode(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir(mode=0o700)
    (tmp_path / "out").mkdir(mode=0o700)
    reset_task_dirs(tmp_path)
    kept = (tmp_path / "out").stat().st_ino
    reset_task_dirs(tmp_path)
    assert (tmp_path / "out").stat().st_ino == kept  # empty and as made: left alone
    (tmp_path / "out" / "left-over").write_text("x")
    (tmp_path / "in").chmod(0o555)  # as staged inputs leave it
    reset_task_dirs(tmp_path)
    for name in ("in", "out"):
        assert list((tmp_path / name).iterdir()) == []
        assert (tmp_path / name).stat().st_mode & 0o7777 == 0o700
    (tmp_path / "out").chmod(0o2777)  # a task may change its own directory's mode
    reset_task_dirs(tmp_path)
    assert (tmp_path / "out").stat().st_mode & 0o7777 == 0o700
    os.rmdir(tmp_path / "out")
    os.symlink("/etc", tmp_path / "out")  # or swap it for a link
    reset_task_dirs(tmp_path)
    assert not (tmp_path / "out").is_symlink() and list((tmp_path / "out").iterdir()) == []
