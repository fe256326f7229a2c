"""Merge the wordfreq project's word counts from the hub's outbox.

    python3 merge.py ISSC_DATA/outbox/wordfreq [--top 20] [--tasks FILE] [--out merged.json]

Reads ``results.jsonl`` and, for each completed task, ``files/<task id>/counts.json``. Each
counts file must have the size and SHA-256 that its result line lists, and agree with the
task's inline result (``words``, ``distinct``). Prints the totals and the --top most frequent
words; --out also writes the merged counts as JSON.

Exit status 0 when every task completed and checked out; 1 when a task failed (state F or
X), has no result (with --tasks, the task file from make_tasks.py, which names every task),
or its counts file is missing, does not match its digest, or is not a word count; 2 when
``results.jsonl`` cannot be read. Problems are listed on stderr; the counts that did check
out are still merged and printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

COUNTS_NAME = "counts.json"
TASK_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # as the hub checks them


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_results(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Result lines by task id (the last line wins), and complaints about the file."""
    by_id: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: not JSON: {exc}")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                problems.append(f"{path}:{lineno}: not a result line (no string 'id')")
                continue
            by_id[row["id"]] = row
    return by_id, problems


def read_task_ids(path: Path) -> list[str]:
    """Task ids of a make_tasks.py file: JSONL, or its one-task-a-line YAML."""
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text.startswith("{"):
            ids.append(str(json.loads(text)["id"]))
    return ids


def task_counts(outbox: Path, row: dict[str, Any]) -> Counter[str]:
    """The checked word counts of one completed task. Raises ValueError saying what is wrong."""
    task_id = row["id"]
    if not TASK_ID.fullmatch(task_id):
        raise ValueError("the id cannot be a directory name in the outbox")
    listed = [f for f in row.get("files") or [] if isinstance(f, dict)]
    entry = next((f for f in listed if f.get("name") == COUNTS_NAME), None)
    if entry is None:
        raise ValueError(f"its result lists no {COUNTS_NAME}")
    path = outbox / "files" / task_id / COUNTS_NAME
    try:
        size = path.stat().st_size
        digest = sha256_of(path)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size != entry.get("size") or digest != entry.get("sha256"):
        raise ValueError(
            f"{path} does not match its result line: size {size}, sha256 {digest}; "
            f"listed size {entry.get('size')}, sha256 {entry.get('sha256')}"
        )
    try:
        counts = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(counts, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts.values()
    ):
        raise ValueError(f"{path} is not an object of positive word counts")
    result = row.get("result")
    if isinstance(result, dict):
        expected = (result.get("words"), result.get("distinct"))
        found = (sum(counts.values()), len(counts))
        if expected != found:
            raise ValueError(
                f"{path} holds {found[0]} words, {found[1]} distinct, but the result says "
                f"{expected[0]} words, {expected[1]} distinct"
            )
    return Counter(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge the wordfreq project's word counts.")
    parser.add_argument("outbox", type=Path, help="<data_dir>/outbox/wordfreq")
    parser.add_argument("--top", type=int, default=20, help="how many words to list (20)")
    parser.add_argument("--tasks", type=Path, help="the task file, to name missing tasks")
    parser.add_argument("--out", type=Path, help="also write the merged counts here (JSON)")
    args = parser.parse_args(argv)

    results = args.outbox / "results.jsonl"
    try:
        by_id, problems = read_results(results)
        expected = read_task_ids(args.tasks) if args.tasks else []
    except (OSError, ValueError, KeyError) as exc:
        print(f"merge: {exc}", file=sys.stderr)
        return 2

    merged: Counter[str] = Counter()
    merged_tasks = failed = 0
    for task_id, row in sorted(by_id.items()):
        if row.get("state") != "C":
            failed += 1
            problems.append(f"task {task_id}: state {row.get('state')}: {row.get('error')}")
            continue
        try:
            merged.update(task_counts(args.outbox, row))
        except ValueError as exc:
            failed += 1
            problems.append(f"task {task_id}: {exc}")
            continue
        merged_tasks += 1
    missing = [t for t in expected if t not in by_id]
    problems += [f"task {t}: no result yet" for t in missing]

    print(
        f"wordfreq: {merged_tasks} texts merged, {sum(merged.values())} words, "
        f"{len(merged)} distinct ({failed} failed, {len(missing)} missing)"
    )
    # Ties in order of the word, so the listing is the same on every run.
    top = sorted(merged.items(), key=lambda item: (-item[1], item[0]))[: max(args.top, 0)]
    for rank, (word, n) in enumerate(top, 1):
        print(f"{rank:5d} {n:7d}  {word}")
    if args.out:
        part = args.out.with_name(args.out.name + ".part")
        part.write_text(json.dumps(dict(merged), sort_keys=True, indent=0) + "\n", encoding="utf-8")
        os.replace(part, args.out)
    for problem in problems:
        print(f"merge: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
