"""Add up the primes project's results from the hub's outbox.

    python3 sum_results.py ISSC_DATA/outbox/primes/results.jsonl [--upto N] [--tasks FILE]

Prints e.g. ``primes below 10000000: 664579 (100 tasks completed, 0 failed)``.
Exit status 0 when every task completed; 1 when a task failed, is missing, or the total
disagrees with a direct count; 2 when the results file cannot be read.

A task counts as missing when --tasks FILE (the task file from make_tasks.py) names it and the
results do not, or, without --tasks, when the ``r-<k>`` numbering has a gap.
With --upto N (N <= 10^7) the total is also checked against an independent plain sieve.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

# Above this the independent check would cost more memory and time than it is worth.
DIRECT_CHECK_MAX = 10**7

TASK_ID = re.compile(r"r-(\d+)")


def direct_count(n: int) -> int:
    """pi(n-1): primes below n, by a plain (unsegmented) sieve.

    Deliberately not main.py's code: the point is to catch a bug there, not to repeat it.
    """
    if n < 3:
        return 0
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for p in range(2, math.isqrt(n - 1) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, n, p)))
    return sieve.count(1)


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
            if row["id"] in by_id:
                # The outbox promises one line per task; say so if that ever breaks, but the
                # last line is still a result, so this alone does not fail the run.
                print(
                    f"sum_results: warning: {path}:{lineno}: second result for task "
                    f"{row['id']}; using the last",
                    file=sys.stderr,
                )
            by_id[row["id"]] = row
    return by_id, problems


def read_task_ids(path: Path) -> tuple[list[str], int | None]:
    """Task ids of a make_tasks.py file (JSONL or its one-task-a-line YAML) and the largest hi."""
    ids: list[str] = []
    top: int | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("- "):
            text = text[2:].strip()
        if not text.startswith("{"):
            continue  # the YAML header lines: "project: primes", "tasks:"
        task = json.loads(text)
        ids.append(str(task["id"]))
        hi = task.get("input", {}).get("hi")
        if isinstance(hi, int):
            top = hi if top is None else max(top, hi)
    return ids, top


def numbering_gaps(ids: list[str]) -> list[str]:
    """Ids r-k missing from 0..max(k); the only check possible without the task file."""
    seen = {int(m.group(1)) for i in ids if (m := TASK_ID.fullmatch(i))}
    if not seen:
        return []
    return [f"r-{k}" for k in range(max(seen) + 1) if k not in seen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sum the primes project's results.")
    parser.add_argument("results", type=Path, help="<data_dir>/outbox/primes/results.jsonl")
    parser.add_argument("--upto", type=int, help="the --upto given to make_tasks.py")
    parser.add_argument("--tasks", type=Path, help="the task file, to name missing tasks")
    args = parser.parse_args(argv)

    try:
        by_id, problems = read_results(args.results)
        expected, top = read_task_ids(args.tasks) if args.tasks else (None, None)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        print(f"sum_results: {exc}", file=sys.stderr)
        return 2

    total = 0
    completed = failed = 0
    for task_id, row in sorted(by_id.items()):
        state = row.get("state")
        result = row.get("result")
        if state == "C" and isinstance(result, int) and not isinstance(result, bool):
            completed += 1
            total += result
        elif state == "C":
            failed += 1
            problems.append(f"task {task_id}: completed but result is not a count: {result!r}")
        else:
            failed += 1
            problems.append(f"task {task_id}: state {state}: {row.get('error')}")

    if expected is not None:
        missing = [i for i in expected if i not in by_id]
    else:
        missing = numbering_gaps(list(by_id))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        problems.append(f"{len(missing)} task(s) have no result: {shown}")

    upto = args.upto if args.upto is not None else top
    label = f"primes below {upto}" if upto is not None else "primes in the completed ranges"
    print(f"{label}: {total} ({completed} tasks completed, {failed} failed)")

    mismatch = False
    if args.upto is not None:
        if args.upto <= DIRECT_CHECK_MAX:
            expected_total = direct_count(args.upto)
            if expected_total == total:
                print(f"check: matches a direct count ({expected_total})")
            else:
                mismatch = True
                print(
                    f"*** MISMATCH: the results add up to {total}, "
                    f"a direct count of primes below {args.upto} gives {expected_total} ***",
                    file=sys.stderr,
                )
        else:
            print(f"check: skipped, --upto is above {DIRECT_CHECK_MAX}")

    for problem in problems:
        print(f"sum_results: {problem}", file=sys.stderr)
    return 1 if (failed or missing or mismatch or problems) else 0


if __name__ == "__main__":
    sys.exit(main())
