"""Write a task file for the wordfreq project: one task per text file.

    python3 make_tasks.py --texts work/texts --stopwords work/stopwords.txt --out work/tasks.yaml
    python3 make_tasks.py ... --out work/tasks.jsonl          # the JSONL form

Each task carries two input files, ``files: {text: <path>, stopwords: <path>}``, with paths
relative to the task file, as ``issc-project submit`` wants them: it copies each file into
the hub's inbox at the same relative place, the stopwords file once for all tasks. So the
texts and the stopwords file must lie in the task file's directory or below it.

Every regular file in --texts whose name does not start with ``.`` is a text, in name order.
Task ids are ``w-<name>``, ``<name>`` the file name without its suffix, with any character a
task id cannot hold replaced by ``_``; the input is ``{"text": <the text's path>}``, which
only names the text (count.py reads the text itself from ``in/text``).
Standard library only, like the rest of the example.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any

PROJECT = "wordfreq"
ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
MAX_ID = 128


def texts_in(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and not p.is_symlink() and p.name[0] != "."
    )


def relative_to_task_file(path: Path, task_file: Path) -> str:
    """``path`` relative to the task file's directory, in POSIX form.

    Raises:
        ValueError: ``path`` is not in that directory or below it.
    """
    rel = os.path.relpath(path.resolve(), task_file.resolve().parent)
    posix = PurePosixPath(Path(rel).as_posix())
    if ".." in posix.parts:
        raise ValueError(
            f"{path} is not under {task_file.parent}: issc-project submit carries input "
            "files only from the task file's directory and below; write the task file higher up"
        )
    return str(posix)


def task_id(text: Path, taken: set[str]) -> str:
    base = "w-" + ID_CHARS.sub("_", text.stem)
    base = base[: MAX_ID - 8]
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate


def tasks(texts: list[Path], stopwords: Path, task_file: Path) -> list[dict[str, Any]]:
    stop = relative_to_task_file(stopwords, task_file)
    taken: set[str] = set()
    items = []
    for text in texts:
        rel = relative_to_task_file(text, task_file)
        items.append(
            {
                "id": task_id(text, taken),
                "input": {"text": rel},
                "files": {"text": rel, "stopwords": stop},
            }
        )
    return items


def render_jsonl(items: list[dict[str, Any]]) -> str:
    return "".join(json.dumps({"project": PROJECT, **item}) + "\n" for item in items)


def render_yaml(items: list[dict[str, Any]]) -> str:
    # One task a line, as a JSON flow mapping (JSON strings are valid YAML): greppable.
    lines = [f"project: {PROJECT}", "tasks:"]
    lines += [f"  - {json.dumps(item)}" for item in items]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write via a ``.part`` name, then rename: a hub inbox ignores ``*.part`` files."""
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a wordfreq task file.")
    parser.add_argument("--texts", type=Path, required=True, help="directory of text files")
    parser.add_argument("--stopwords", type=Path, required=True, help="the stopwords file")
    parser.add_argument("--out", type=Path, required=True, help="task file to write")
    parser.add_argument(
        "--format", choices=["yaml", "jsonl"], help="default: jsonl for a .jsonl --out, else yaml"
    )
    args = parser.parse_args(argv)

    if not args.texts.is_dir():
        parser.error(f"--texts {args.texts}: not a directory")
    if not args.stopwords.is_file():
        parser.error(f"--stopwords {args.stopwords}: not a file")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: {args.out.parent} is not a directory")
    texts = texts_in(args.texts)
    if not texts:
        parser.error(f"--texts {args.texts}: no text files in it")
    try:
        items = tasks(texts, args.stopwords, args.out)
    except ValueError as exc:
        print(f"make_tasks: {exc}", file=sys.stderr)
        return 2
    fmt = args.format or ("jsonl" if args.out.suffix == ".jsonl" else "yaml")
    write_atomically(args.out, render_yaml(items) if fmt == "yaml" else render_jsonl(items))
    print(f"wrote {len(items)} tasks to {args.out} ({fmt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
