"""Write a task file for the primes project: one task per range [lo, hi) below --upto.

    python3 make_tasks.py --upto 10000000 --chunk 100000 --out primes-tasks.jsonl
    python3 make_tasks.py --upto 10000000 --chunk 100000 --out primes-tasks.yaml --format yaml

Task ids are ``r-<k>``, k counting chunks from 0, so sum_results.py can spot gaps.
Standard library only, like the rest of the example.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROJECT = "primes"


def ranges(upto: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Consecutive half-open ranges covering [0, upto) without gaps or overlap."""
    for lo in range(0, upto, chunk):
        yield lo, min(lo + chunk, upto)


def tasks(upto: int, chunk: int) -> list[dict[str, Any]]:
    return [
        {"id": f"r-{k}", "input": {"lo": lo, "hi": hi}}
        for k, (lo, hi) in enumerate(ranges(upto, chunk))
    ]


def render_jsonl(items: list[dict[str, Any]]) -> str:
    return "".join(json.dumps({"project": PROJECT, **item}) + "\n" for item in items)


def render_yaml(items: list[dict[str, Any]]) -> str:
    # Each task is a one-line YAML flow mapping written as JSON (JSON is valid YAML for ints
    # and strings): readable, parsed by any YAML loader, and greppable line by line.
    lines = [f"project: {PROJECT}", "tasks:"]
    lines += [f"  - {json.dumps(item)}" for item in items]
    return "\n".join(lines) + "\n"


def write_atomically(path: str, text: str) -> None:
    """Write via a ``.part`` name, then rename: a hub inbox ignores ``*.part`` files, so even
    writing straight into an inbox never lets the hub read half a file."""
    if path == "-":
        sys.stdout.write(text)
        return
    part = Path(path + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a primes task file.")
    parser.add_argument(
        "--upto", type=positive_int, required=True, help="count primes below this number"
    )
    parser.add_argument("--chunk", type=positive_int, required=True, help="numbers per task")
    parser.add_argument("--out", required=True, help="task file to write ('-' for stdout)")
    parser.add_argument(
        "--format",
        choices=["jsonl", "yaml"],
        help="default: yaml for a .yaml/.yml --out, else jsonl",
    )
    args = parser.parse_args(argv)

    fmt = args.format
    if fmt is None:
        fmt = "yaml" if args.out.endswith((".yaml", ".yml")) else "jsonl"
    items = tasks(args.upto, args.chunk)
    text = render_yaml(items) if fmt == "yaml" else render_jsonl(items)
    write_atomically(args.out, text)
    if args.out != "-":
        print(f"wrote {len(items)} tasks covering [0, {args.upto}) to {args.out} ({fmt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
