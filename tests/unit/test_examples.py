"""The sample projects under examples/: run as real programs, the way nodes and owners run them.

The example programs are standard-library scripts, not an importable package, so most tests
start them with ``sys.executable`` as subprocesses; a few load a module from its file to test
a function directly (a loader per file, since both examples have a ``make_tasks.py``).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from hub.taskfile import parse_task_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PRIMES = EXAMPLES / "primes"
MANDEL = EXAMPLES / "mandelbrot"
WORDFREQ = EXAMPLES / "wordfreq"

pytestmark = pytest.mark.timeout(60)


def run(
    script: Path, *args: str | Path, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        check=False,
    )


def load(path: Path) -> ModuleType:
    name = f"example_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # No __pycache__ in the example directories: `issc-project pack DIR` signs every file there.
    saved = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def naive_prime_count(lo: int, hi: int) -> int:
    return sum(1 for n in range(max(lo, 2), hi) if all(n % d for d in range(2, int(n**0.5) + 1)))


# --- project.yaml ----------------------------------------------------------------------------


def test_project_files_declare_what_the_nodes_need() -> None:
    primes = yaml.safe_load((PRIMES / "project.yaml").read_text())
    assert primes == {
        "name": "primes",
        "version": 1,
        "entrypoint": ["python3", "main.py"],
        "mode": "process",
        "limits": {"wall_seconds": 60, "memory_mb": 256, "output_mb": 1},
        "quorum": 1,
    }
    mandel = yaml.safe_load((MANDEL / "project.yaml").read_text())
    assert mandel["name"] == "mandelbrot"
    assert mandel["version"] == 1
    assert mandel["entrypoint"] == ["python3", "worker.py"]
    assert mandel["mode"] == "persistent"
    assert mandel["limits"] == {"wall_seconds": 120, "memory_mb": 256, "output_mb": 8}
    for project in (primes, mandel):
        assert (EXAMPLES / project["name"] / project["entrypoint"][1]).is_file()


# --- primes: main.py -------------------------------------------------------------------------


def test_primes_below_100() -> None:
    proc = run(PRIMES / "main.py", stdin='{"lo": 0, "hi": 100}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == 25


def test_primes_below_a_million_in_two_chunks() -> None:
    counts = []
    for lo, hi in ((0, 500_000), (500_000, 1_000_000)):
        proc = run(PRIMES / "main.py", stdin=json.dumps({"lo": lo, "hi": hi}))
        assert proc.returncode == 0, proc.stderr
        counts.append(json.loads(proc.stdout))
    assert sum(counts) == 78_498


def test_primes_reads_input_json_when_stdin_is_empty(tmp_path: Path) -> None:
    (tmp_path / "input.json").write_text('{"lo": 10, "hi": 20}')
    proc = run(PRIMES / "main.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == 4  # 11 13 17 19


def test_primes_segmented_sieve_agrees_with_trial_division(monkeypatch: pytest.MonkeyPatch) -> None:
    main = load(PRIMES / "main.py")
    # A tiny window makes every range cross several window boundaries.
    monkeypatch.setattr(main, "SEGMENT", 7)
    ranges = [(0, 0), (0, 1), (0, 2), (0, 3), (2, 3), (3, 3), (4, 5), (0, 200), (89, 97)]
    ranges += [(lo, lo + width) for lo in (100, 961, 1000, 4093) for width in (1, 10, 97)]
    for lo, hi in ranges:
        assert main.count_primes(lo, hi) == naive_prime_count(lo, hi), (lo, hi)


@pytest.mark.parametrize(
    "stdin",
    [
        "not json",
        "[0, 100]",
        '{"lo": 0}',
        '{"lo": 0, "hi": "100"}',
        '{"lo": 0, "hi": 1.5}',
        '{"lo": false, "hi": 10}',
        '{"lo": -5, "hi": 10}',
        '{"lo": 10, "hi": 5}',
    ],
)
def test_primes_bad_input_fails_with_a_message(stdin: str) -> None:
    proc = run(PRIMES / "main.py", stdin=stdin)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "bad input" in proc.stderr


# --- primes: make_tasks.py -------------------------------------------------------------------


def assert_covers(tasks: list[dict[str, Any]], upto: int) -> None:
    """The ranges, in id order, tile [0, upto) with no gap and no overlap."""
    assert [t["id"] for t in tasks] == [f"r-{k}" for k in range(len(tasks))]
    edge = 0
    for task in tasks:
        assert task["input"]["lo"] == edge
        assert task["input"]["hi"] > edge
        edge = task["input"]["hi"]
    assert edge == upto


def test_primes_make_tasks_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "tasks.jsonl"
    proc = run(PRIMES / "make_tasks.py", "--upto", "1000", "--chunk", "300", "--out", out)
    assert proc.returncode == 0, proc.stderr
    tasks = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(t["project"] == "primes" for t in tasks)
    assert_covers(tasks, 1000)
    assert len(tasks) == 4
    assert not list(tmp_path.glob("*.part"))


def test_primes_make_tasks_yaml_matches_jsonl(tmp_path: Path) -> None:
    args = ["--upto", "10000000", "--chunk", "100000"]
    run(PRIMES / "make_tasks.py", *args, "--out", tmp_path / "t.jsonl")
    proc = run(PRIMES / "make_tasks.py", *args, "--out", tmp_path / "t.txt", "--format", "yaml")
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load((tmp_path / "t.txt").read_text())
    assert doc["project"] == "primes"
    assert len(doc["tasks"]) == 100
    assert_covers(doc["tasks"], 10_000_000)
    jsonl = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [{"project": "primes", **t} for t in doc["tasks"]] == jsonl


def test_primes_make_tasks_rejects_zero_chunk(tmp_path: Path) -> None:
    proc = run(PRIMES / "make_tasks.py", "--upto", "10", "--chunk", "0", "--out", tmp_path / "t")
    assert proc.returncode != 0
    assert "--chunk" in proc.stderr


# --- primes: sum_results.py ------------------------------------------------------------------

# pi(1000) = 168, split as make_tasks.py --upto 1000 --chunk 250 would.
CHUNK_COUNTS = [53, 42, 37, 36]


def result_row(
    task_id: str, result: Any, state: str = "C", error: str | None = None
) -> dict[str, Any]:
    return {
        "id": task_id,
        "state": state,
        "result": result,
        "error": error,
        "node": "n-1",
        "volunteer": "alice",
        "attempts": 1,
        "cpu_seconds": 0.01,
        "finished_at": "2026-11-28T07:00:00Z",
        "files": [],
    }


def test_primes_sum_results_all_completed(tmp_path: Path) -> None:
    results = write_jsonl(
        tmp_path / "results.jsonl",
        [result_row(f"r-{k}", n) for k, n in enumerate(CHUNK_COUNTS)],
    )
    proc = run(PRIMES / "sum_results.py", results, "--upto", "1000")
    assert proc.returncode == 0, proc.stderr
    assert "primes below 1000: 168 (4 tasks completed, 0 failed)" in proc.stdout
    assert "matches a direct count" in proc.stdout


def test_primes_sum_results_failed_task_exits_1(tmp_path: Path) -> None:
    rows = [result_row(f"r-{k}", n) for k, n in enumerate(CHUNK_COUNTS)]
    rows[2] = result_row("r-2", None, state="F", error="Killed: wall_seconds")
    results = write_jsonl(tmp_path / "results.jsonl", rows)
    proc = run(PRIMES / "sum_results.py", results)
    assert proc.returncode == 1
    assert "131 (3 tasks completed, 1 failed)" in proc.stdout
    assert "r-2" in proc.stderr
    assert "wall_seconds" in proc.stderr


def test_primes_sum_results_gap_in_numbering_exits_1(tmp_path: Path) -> None:
    rows = [result_row(f"r-{k}", n) for k, n in enumerate(CHUNK_COUNTS) if k != 1]
    proc = run(PRIMES / "sum_results.py", write_jsonl(tmp_path / "results.jsonl", rows))
    assert proc.returncode == 1
    assert "r-1" in proc.stderr


def test_primes_sum_results_task_file_names_missing_tail(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    run(PRIMES / "make_tasks.py", "--upto", "1000", "--chunk", "250", "--out", tasks)
    rows = [result_row(f"r-{k}", n) for k, n in enumerate(CHUNK_COUNTS[:3])]
    results = write_jsonl(tmp_path / "results.jsonl", rows)
    # Without the task file a missing last task is invisible to the numbering check...
    assert run(PRIMES / "sum_results.py", results).returncode == 0
    # ...with it, it is named.
    proc = run(PRIMES / "sum_results.py", results, "--tasks", tasks)
    assert proc.returncode == 1
    assert "primes below 1000: 132" in proc.stdout
    assert "r-3" in proc.stderr


def test_primes_sum_results_mismatch_is_loud(tmp_path: Path) -> None:
    rows = [result_row(f"r-{k}", n) for k, n in enumerate(CHUNK_COUNTS)]
    rows[0]["result"] += 1
    proc = run(PRIMES / "sum_results.py", write_jsonl(tmp_path / "r.jsonl", rows), "--upto", "1000")
    assert proc.returncode == 1
    assert "MISMATCH" in proc.stderr


def test_primes_sum_results_missing_file_exits_2(tmp_path: Path) -> None:
    proc = run(PRIMES / "sum_results.py", tmp_path / "nope.jsonl")
    assert proc.returncode == 2
    assert "nope.jsonl" in proc.stderr


# --- mandelbrot: worker.py -------------------------------------------------------------------


def tile_input(x0: int, y0: int, w: int, h: int, size: int = 64, **extra: Any) -> dict[str, Any]:
    return {
        "x0": x0,
        "y0": y0,
        "w": w,
        "h": h,
        "width": size,
        "height": size,
        "max_iter": 100,
        "re_min": -2.2,
        "re_max": 0.8,
        "im_min": -1.5,
        "im_max": 1.5,
        **extra,
    }


def decode_pixels(result: dict[str, Any]) -> bytes:
    return zlib.decompress(base64.b64decode(result["pixels"]))


def test_mandelbrot_worker_serves_several_tasks_in_one_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(MANDEL / "worker.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        replies = []
        requests: list[dict[str, Any]] = [
            {"id": "t-0-0", "input": tile_input(0, 0, 32, 32)},
            {"id": "t-32-16", "input": tile_input(32, 16, 32, 16)},
            {"id": 7, "input": tile_input(60, 0, 8, 8)},  # sticks out of the picture
        ]
        # One request, then its reply, before the next: the worker must answer each line
        # as it comes (and flush), not wait for end of input.
        for request in requests:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            replies.append(json.loads(proc.stdout.readline()))
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert [r["id"] for r in replies] == ["t-0-0", "t-32-16", 7]
    first, second, bad = replies
    assert "error" not in first and "error" not in second
    assert {k: first["result"][k] for k in ("x0", "y0", "w", "h", "max_iter")} == {
        "x0": 0,
        "y0": 0,
        "w": 32,
        "h": 32,
        "max_iter": 100,
    }
    assert len(decode_pixels(first["result"])) == 32 * 32
    pixels = decode_pixels(second["result"])
    assert len(pixels) == 32 * 16
    # Pixel (32, 31) of the picture is c ~ -0.68+0.02i, in the main cardioid; the tile's
    # top-right pixel (63, 16) is c ~ 0.78+0.73i, far outside.
    assert pixels[15 * 32 + 0] == 255
    assert pixels[0 * 32 + 31] < 255
    assert "result" not in bad
    assert "not inside" in bad["error"]


def test_mandelbrot_worker_reports_bad_lines_and_carries_on() -> None:
    lines = [
        "this is not json",
        json.dumps({"input": tile_input(0, 0, 4, 4)}),
        json.dumps({"id": "a", "input": tile_input(0, 0, 4, 4, max_iter=True)}),
        json.dumps({"id": "b", "input": tile_input(0, 0, 4, 4, re_min=1.0, re_max=0.0)}),
        json.dumps({"id": "c", "input": "tile please"}),
        "",
        json.dumps({"id": "d", "input": tile_input(0, 0, 4, 4)}),
    ]
    proc = run(MANDEL / "worker.py", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in replies] == [None, None, "a", "b", "c", "d"]
    assert all("error" in r for r in replies[:5])
    assert len(decode_pixels(replies[5]["result"])) == 16


def test_mandelbrot_tiles_agree_with_the_whole_picture() -> None:
    worker = load(MANDEL / "worker.py")
    whole = worker.render(worker.parse_input(tile_input(0, 0, 24, 24, size=24)))
    stitched = bytearray(24 * 24)
    for y0 in (0, 10, 20):
        for x0 in (0, 10, 20):
            w, h = min(10, 24 - x0), min(10, 24 - y0)
            tile = worker.render(worker.parse_input(tile_input(x0, y0, w, h, size=24)))
            for row in range(h):
                start = (y0 + row) * 24 + x0
                stitched[start : start + w] = tile[row * w : (row + 1) * w]
    assert stitched == whole
    assert 255 in whole and min(whole) < 10  # both inside and fast-escaping points


# --- mandelbrot: make_tasks.py ---------------------------------------------------------------


def test_mandelbrot_make_tasks_tiles_the_picture_once(tmp_path: Path) -> None:
    out = tmp_path / "tiles.yaml"
    proc = run(
        MANDEL / "make_tasks.py",
        *("--width", "100", "--height", "70", "--tile", "32", "--max-iter", "50"),
        *("--re-min", "1e-5", "--out", out),
    )
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["project"] == "mandelbrot"
    covered = [0] * (100 * 70)
    for task in doc["tasks"]:
        spec = task["input"]
        assert task["id"] == f"t-{spec['x0']}-{spec['y0']}"
        assert (spec["width"], spec["height"], spec["max_iter"]) == (100, 70, 50)
        # YAML 1.1 loaders read "1e-05" as a string; the writer must avoid that form.
        assert isinstance(spec["re_min"], float) and spec["re_min"] == 1e-5
        for y in range(spec["y0"], spec["y0"] + spec["h"]):
            for x in range(spec["x0"], spec["x0"] + spec["w"]):
                covered[y * 100 + x] += 1
    assert covered == [1] * (100 * 70)
    assert len(doc["tasks"]) == 4 * 3


def test_mandelbrot_make_tasks_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "tiles.txt"
    proc = run(MANDEL / "make_tasks.py", "--tile", "128", "--out", out, "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    tasks = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(tasks) == 16
    assert all(t["project"] == "mandelbrot" for t in tasks)
    assert len({t["id"] for t in tasks}) == 16


# --- mandelbrot: assemble.py -----------------------------------------------------------------


def read_png(path: Path) -> tuple[dict[str, Any], bytes]:
    """IHDR fields and the decompressed scanlines, checking the signature and every CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    ihdr = {"width": width, "height": height, "depth": depth, "colour": colour}
    assert interlace == 0
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    return ihdr, raw


def synthetic_tile(x0: int, y0: int, w: int, h: int, value: int) -> dict[str, Any]:
    pixels = bytes([value]) * (w * h)
    return {
        "x0": x0,
        "y0": y0,
        "w": w,
        "h": h,
        "width": 40,
        "height": 30,
        "max_iter": 100,
        "pixels": base64.b64encode(zlib.compress(pixels)).decode(),
    }


def picture_rows(skip: set[str]) -> list[dict[str, Any]]:
    """Results for a 40x30 picture in 16-px tiles (narrower at the edges), all pixels 0
    except tile t-16-0, which is inside the set (255, drawn black)."""
    rows = []
    for y0 in (0, 16):
        for x0 in (0, 16, 32):
            task_id = f"t-{x0}-{y0}"
            if task_id in skip:
                continue
            value = 255 if task_id == "t-16-0" else 0
            tile = synthetic_tile(x0, y0, min(16, 40 - x0), min(16, 30 - y0), value)
            rows.append(result_row(task_id, tile))
    return rows


def test_mandelbrot_assemble_writes_a_valid_png(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "results.jsonl", picture_rows(skip=set()))
    out = tmp_path / "picture.png"
    proc = run(MANDEL / "assemble.py", results, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert str(out.stat().st_size) in proc.stdout
    ihdr, raw = read_png(out)
    assert ihdr == {"width": 40, "height": 30, "depth": 8, "colour": 2}
    assert len(raw) == 30 * (1 + 3 * 40)
    stride = 1 + 3 * 40
    assert all(raw[y * stride] == 0 for y in range(30))  # filter type None on every line
    inside = raw[1 + 3 * 20 : 1 + 3 * 21]  # row 0, x=20: tile t-16-0
    outside = raw[1 : 1 + 3]  # row 0, x=0
    assert inside == b"\x00\x00\x00"
    assert outside != b"\x00\x00\x00"


def test_mandelbrot_assemble_reports_missing_tiles(tmp_path: Path) -> None:
    rows = picture_rows(skip={"t-32-16", "t-0-16"})
    rows.append(result_row("t-0-16", None, state="F", error="worker died"))
    results = write_jsonl(tmp_path / "results.jsonl", rows)
    out = tmp_path / "picture.png"
    proc = run(MANDEL / "assemble.py", results, "--out", out)
    assert proc.returncode == 1
    assert "t-32-16" in proc.stderr
    assert "t-0-16" in proc.stderr and "worker died" in proc.stderr
    ihdr, raw = read_png(out)  # the picture is still written, holes black
    assert (ihdr["width"], ihdr["height"]) == (40, 30)
    row20 = raw[20 * (1 + 3 * 40) + 1 :][: 3 * 40]
    assert row20[: 3 * 16] == b"\x00" * (3 * 16)  # t-0-16 missing
    assert row20[3 * 16 : 3 * 17] != b"\x00\x00\x00"  # t-16-16 present, value 0


def test_mandelbrot_end_to_end_without_a_hub(tmp_path: Path) -> None:
    """make_tasks -> worker -> (results as the outbox would hold them) -> assemble."""
    tasks = tmp_path / "tiles.jsonl"
    args = ("--width", "48", "--height", "40", "--tile", "16", "--max-iter", "50")
    assert run(MANDEL / "make_tasks.py", *args, "--out", tasks).returncode == 0
    replies = run(MANDEL / "worker.py", stdin=tasks.read_text())
    assert replies.returncode == 0, replies.stderr
    rows = [result_row(r["id"], r["result"]) for r in map(json.loads, replies.stdout.splitlines())]
    assert len(rows) == 9
    results = write_jsonl(tmp_path / "results.jsonl", rows)
    proc = run(MANDEL / "assemble.py", results, "--out", tmp_path / "p.png")
    assert proc.returncode == 0, proc.stderr
    ihdr, raw = read_png(tmp_path / "p.png")
    assert (ihdr["width"], ihdr["height"]) == (48, 40)
    assert len(raw) == 40 * (1 + 3 * 48)


# --- wordfreq: count.py ----------------------------------------------------------------------


def test_wordfreq_project_yaml() -> None:
    assert yaml.safe_load((WORDFREQ / "project.yaml").read_text()) == {
        "name": "wordfreq",
        "version": 1,
        "entrypoint": ["python3", "count.py"],
        "mode": "process",
        "limits": {"wall_seconds": 60, "memory_mb": 256, "output_mb": 4},
        "quorum": 1,
    }
    assert (WORDFREQ / "count.py").is_file()


def scratch_dir(tmp_path: Path, text: str | bytes, stopwords: str) -> Path:
    """A task's scratch directory as a node prepares it: in/text and in/stopwords."""
    scratch = tmp_path / "scratch"
    (scratch / "in").mkdir(parents=True)
    data = text.encode() if isinstance(text, str) else text
    (scratch / "in" / "text").write_bytes(data)
    (scratch / "in" / "stopwords").write_text(stopwords)
    (scratch / "input.json").write_text('{"text": "texts/sample.txt"}')
    return scratch


def test_wordfreq_count_writes_counts_and_prints_the_summary(tmp_path: Path) -> None:
    scratch = scratch_dir(
        tmp_path,
        "The cat and THE hat.\nA cat's 2nd hat, the café; cat-flap_cat 42x\n",
        "# the article\nthe a\nand\n",
    )
    proc = run(WORDFREQ / "count.py", stdin='{"text": "texts/sample.txt"}', cwd=scratch)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((scratch / "out" / "counts.json").read_text())
    # Lowercase, letters only (digits, punctuation and '_' split words), stopwords left out;
    # the stopwords file's comment line is not a list of stopwords ("article" counts).
    assert counts == {"cat": 4, "hat": 2, "s": 1, "nd": 1, "café": 1, "flap": 1, "x": 1}
    assert json.loads(proc.stdout) == {"words": 11, "distinct": 7, "stopped": 5}
    assert list(counts) == sorted(counts)  # sorted keys: the same bytes on every machine


def test_wordfreq_count_on_a_sample_text(tmp_path: Path) -> None:
    stopwords = (WORDFREQ / "stopwords.txt").read_text()
    scratch = scratch_dir(tmp_path, (WORDFREQ / "texts" / "river.txt").read_bytes(), stopwords)
    first = run(WORDFREQ / "count.py", cwd=scratch)  # stdin empty, as by hand
    assert first.returncode == 0, first.stderr
    data = (scratch / "out" / "counts.json").read_bytes()
    counts = json.loads(data)
    summary = json.loads(first.stdout)
    assert summary["words"] == sum(counts.values()) > 100
    assert summary["distinct"] == len(counts) > 50
    assert counts["river"] >= 8
    assert not {"the", "and", "in"} & set(counts)
    assert all(word.isalpha() and word == word.lower() for word in counts)
    again = run(WORDFREQ / "count.py", cwd=scratch)
    assert (again.stdout, (scratch / "out" / "counts.json").read_bytes()) == (first.stdout, data)


def test_wordfreq_count_missing_input_file_fails(tmp_path: Path) -> None:
    scratch = scratch_dir(tmp_path, "words", "the")
    (scratch / "in" / "stopwords").unlink()
    proc = run(WORDFREQ / "count.py", cwd=scratch)
    assert proc.returncode == 2
    assert "in/stopwords" in proc.stderr
    assert not (scratch / "out" / "counts.json").exists()


# --- wordfreq: make_tasks.py -----------------------------------------------------------------


def wordfreq_work_dir(tmp_path: Path) -> Path:
    """The owner's work directory of the README: the sample texts and the stopwords file."""
    work = tmp_path / "work"
    shutil.copytree(WORDFREQ / "texts", work / "texts")
    shutil.copy(WORDFREQ / "stopwords.txt", work / "stopwords.txt")
    return work


def test_wordfreq_make_tasks_one_task_per_text(tmp_path: Path) -> None:
    work = wordfreq_work_dir(tmp_path)
    (work / "texts" / ".notes.txt").write_text("hidden files are not texts")
    (work / "texts" / "two words.txt").write_text("a text with a space in its name")
    out = work / "tasks.yaml"
    proc = run(
        WORDFREQ / "make_tasks.py", "--texts", work / "texts", "--stopwords",
        work / "stopwords.txt", "--out", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 7 tasks" in proc.stdout
    doc = yaml.safe_load(out.read_text())
    assert doc["project"] == "wordfreq"
    names = [p.name for p in (WORDFREQ / "texts").iterdir()] + ["two words.txt"]
    assert [t["files"]["text"] for t in doc["tasks"]] == [f"texts/{n}" for n in sorted(names)]
    for task in doc["tasks"]:
        assert re.fullmatch(r"w-[A-Za-z0-9_.-]+", task["id"])
        assert task["files"]["stopwords"] == "stopwords.txt"
        assert task["input"] == {"text": task["files"]["text"]}
        for path in task["files"].values():  # relative to the task file
            assert (out.parent / path).is_file()
    assert "w-two_words" in [t["id"] for t in doc["tasks"]]
    # The hub's own parser takes it as it is.
    parsed = parse_task_file(out.name, out.read_bytes())
    assert parsed.project == "wordfreq"
    assert [dict(e.file_paths) for e in parsed.entries] == [t["files"] for t in doc["tasks"]]

    jsonl = work / "tasks.jsonl"
    args = ("--texts", work / "texts", "--stopwords", work / "stopwords.txt")
    assert run(WORDFREQ / "make_tasks.py", *args, "--out", jsonl).returncode == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert rows == [{"project": "wordfreq", **t} for t in doc["tasks"]]


def test_wordfreq_make_tasks_refuses_files_outside_the_task_files_directory(
    tmp_path: Path,
) -> None:
    work = wordfreq_work_dir(tmp_path)
    (work / "sub").mkdir()
    out = work / "sub" / "tasks.yaml"
    args = ("--texts", work / "texts", "--stopwords", work / "stopwords.txt")
    proc = run(WORDFREQ / "make_tasks.py", *args, "--out", out)
    assert proc.returncode == 2
    assert "is not under" in proc.stderr
    assert not out.exists()


def test_wordfreq_task_file_goes_through_submit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from issc.project_cli import main as project_main

    work = wordfreq_work_dir(tmp_path)
    tasks = work / "tasks.yaml"
    args = ("--texts", work / "texts", "--stopwords", work / "stopwords.txt")
    assert run(WORDFREQ / "make_tasks.py", *args, "--out", tasks).returncode == 0
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert project_main(["submit", str(tasks), "--inbox", str(inbox)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 + 1 + 1  # each text, the stopwords once, the task file last
    assert lines[-1].endswith("inbox/tasks.yaml")
    copied = sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*") if p.is_file())
    expected = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    assert copied == expected


# --- wordfreq: merge.py ----------------------------------------------------------------------


def wordfreq_outbox(tmp_path: Path, counts: dict[str, dict[str, int]]) -> Path:
    """outbox/wordfreq as the hub writes it: results.jsonl and files/<task id>/counts.json."""
    outbox = tmp_path / "outbox" / "wordfreq"
    rows = []
    for task_id, task_counts in counts.items():
        data = (json.dumps(task_counts, sort_keys=True, indent=0) + "\n").encode()
        (outbox / "files" / task_id).mkdir(parents=True)
        (outbox / "files" / task_id / "counts.json").write_bytes(data)
        summary = {"words": sum(task_counts.values()), "distinct": len(task_counts), "stopped": 0}
        row = result_row(task_id, summary)
        row["files"] = [
            {"name": "counts.json", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        ]
        rows.append(row)
    write_jsonl(outbox / "results.jsonl", rows)
    return outbox


SYNTHETIC_COUNTS = {
    "w-one": {"whale": 5, "sea": 3, "ship": 1},
    "w-two": {"sea": 4, "river": 2, "ship": 1},
}


def test_wordfreq_merge_adds_up_the_counts(tmp_path: Path) -> None:
    outbox = wordfreq_outbox(tmp_path, SYNTHETIC_COUNTS)
    merged = tmp_path / "merged.json"
    proc = run(WORDFREQ / "merge.py", outbox, "--top", "3", "--out", merged)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "wordfreq: 2 texts merged, 16 words, 4 distinct (0 failed, 0 missing)",
        "    1       7  sea",
        "    2       5  whale",
        "    3       2  river",  # ties (river, ship: 2 each) in word order
    ]
    assert json.loads(merged.read_text()) == {"river": 2, "sea": 7, "ship": 2, "whale": 5}
    assert proc.stderr == ""


def test_wordfreq_merge_digest_mismatch_exits_1(tmp_path: Path) -> None:
    outbox = wordfreq_outbox(tmp_path, SYNTHETIC_COUNTS)
    counts = outbox / "files" / "w-two" / "counts.json"
    counts.write_text(counts.read_text().replace("4", "9"))  # same size, other bytes
    proc = run(WORDFREQ / "merge.py", outbox)
    assert proc.returncode == 1
    assert "w-two" in proc.stderr and "does not match its result line" in proc.stderr
    assert "1 texts merged, 9 words" in proc.stdout  # the rest is still merged


def test_wordfreq_merge_failed_missing_and_absent_tasks_exit_1(tmp_path: Path) -> None:
    outbox = wordfreq_outbox(tmp_path, SYNTHETIC_COUNTS)
    (outbox / "files" / "w-one" / "counts.json").unlink()
    with (outbox / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(result_row("w-three", None, state="F", error="Killed")) + "\n")
    tasks = tmp_path / "tasks.jsonl"
    ids = ["w-one", "w-two", "w-three", "w-four"]
    write_jsonl(tasks, [{"project": "wordfreq", "id": i, "input": {}} for i in ids])
    proc = run(WORDFREQ / "merge.py", outbox, "--tasks", tasks)
    assert proc.returncode == 1
    assert "1 texts merged, 7 words, 3 distinct (2 failed, 1 missing)" in proc.stdout
    assert "task w-one: cannot read" in proc.stderr
    assert "task w-three: state F: Killed" in proc.stderr
    assert "task w-four: no result yet" in proc.stderr


def test_wordfreq_merge_unreadable_results_exit_2(tmp_path: Path) -> None:
    proc = run(WORDFREQ / "merge.py", tmp_path / "nowhere")
    assert proc.returncode == 2
    assert "results.jsonl" in proc.stderr


def test_wordfreq_end_to_end_without_a_hub(tmp_path: Path) -> None:
    """make_tasks -> count.py per task, in scratch dirs as a node makes them -> merge."""
    work = wordfreq_work_dir(tmp_path)
    tasks = work / "tasks.jsonl"
    args = ("--texts", work / "texts", "--stopwords", work / "stopwords.txt")
    assert run(WORDFREQ / "make_tasks.py", *args, "--out", tasks).returncode == 0
    outbox = tmp_path / "outbox" / "wordfreq"
    rows = []
    for line in tasks.read_text().splitlines():
        task = json.loads(line)
        scratch = tmp_path / "scratch" / task["id"]
        (scratch / "in").mkdir(parents=True)
        for name, path in task["files"].items():
            shutil.copy(work / path, scratch / "in" / name)
        proc = run(WORDFREQ / "count.py", stdin=json.dumps(task["input"]), cwd=scratch)
        assert proc.returncode == 0, proc.stderr
        (outbox / "files" / task["id"]).mkdir(parents=True)
        data = (scratch / "out" / "counts.json").read_bytes()
        (outbox / "files" / task["id"] / "counts.json").write_bytes(data)
        row = result_row(task["id"], json.loads(proc.stdout))
        digest = hashlib.sha256(data).hexdigest()
        row["files"] = [{"name": "counts.json", "size": len(data), "sha256": digest}]
        rows.append(row)
    write_jsonl(outbox / "results.jsonl", rows)

    proc = run(WORDFREQ / "merge.py", outbox, "--tasks", tasks, "--top", "5")
    assert proc.returncode == 0, proc.stderr
    count = load(WORDFREQ / "count.py")
    stop = count.stopword_set((WORDFREQ / "stopwords.txt").read_text())
    everything = "\n".join(p.read_text() for p in sorted((WORDFREQ / "texts").iterdir()))
    direct, _ = count.count(everything, stop)
    header = proc.stdout.splitlines()[0]
    assert header == (
        f"wordfreq: 6 texts merged, {sum(direct.values())} words, {len(direct)} distinct "
        "(0 failed, 0 missing)"
    )
    assert len(proc.stdout.splitlines()) == 1 + 5
