"""Count the words of one text: one task of the wordfreq sample project (process mode).

Runs on a volunteer's machine with a bare ``python3``, so it uses the standard library only.
The node puts the task's input files into the scratch directory (the cwd):

- ``in/text``: the text to count (UTF-8; a byte that is not UTF-8 reads as a word break);
- ``in/stopwords``: words to leave out, the same file for every task (``#`` starts a
  comment line).

A word is a run of letters, lowercased: ``Don't`` is the two words ``don`` and ``t``, and
digits and punctuation separate words. The stopwords file is split into words the same way.

Writes ``out/counts.json``, ``{word: count}`` with sorted keys (the same text gives the same
bytes on every machine), and prints ``{"words": N, "distinct": M, "stopped": K}`` to stdout
as the task's result: N words counted, M of them distinct, K stopwords left out. A missing
input file is a deterministic failure: a message on stderr and exit status 2.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

TEXT = Path("in/text")
STOPWORDS = Path("in/stopwords")
COUNTS = Path("out/counts.json")

# A letter is a word character that is neither a digit nor the underscore.
WORD = re.compile(r"[^\W\d_]+")


def words(text: str) -> list[str]:
    """The words of ``text``, lowercased, in order."""
    return WORD.findall(text.lower())


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def stopword_set(text: str) -> set[str]:
    lines = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return {word for line in lines for word in words(line)}


def count(text: str, stopwords: set[str]) -> tuple[Counter[str], int]:
    """Word counts without the stopwords, and how many stopword occurrences were left out."""
    counts: Counter[str] = Counter()
    stopped = 0
    for word in words(text):
        if word in stopwords:
            stopped += 1
        else:
            counts[word] += 1
    return counts, stopped


def main() -> int:
    # The task input (stdin and input.json) only says which text this is; the text itself
    # arrives as in/text. Drain stdin all the same, so the node's write never blocks.
    if sys.stdin is not None and not sys.stdin.isatty():
        sys.stdin.read()
    try:
        text = read_text(TEXT)
        stopwords = stopword_set(read_text(STOPWORDS))
    except OSError as exc:
        print(f"wordfreq: cannot read an input file: {exc}", file=sys.stderr)
        return 2
    counts, stopped = count(text, stopwords)
    # The node collects out/ only after a successful exit, so a plain write is enough.
    COUNTS.parent.mkdir(exist_ok=True)
    COUNTS.write_text(json.dumps(dict(counts), sort_keys=True, indent=0) + "\n", encoding="utf-8")
    total = sum(counts.values())
    print(json.dumps({"words": total, "distinct": len(counts), "stopped": stopped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
