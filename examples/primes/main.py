"""Count the primes p with lo <= p < hi: one task of the primes sample project.

Runs on a volunteer's machine with a bare ``python3``, so it uses the standard library only.
The task input arrives as JSON on stdin (``{"lo": int, "hi": int}``); the count goes to stdout
as JSON. Bad input is a deterministic failure: a message on stderr and exit status 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# Sieve the range in windows of this many numbers so memory stays bounded (well under the
# project's 256 MB limit) however wide a range an owner hands out.
SEGMENT = 1 << 20

# sqrt(hi) bounds the base primes we must hold; 10^14 keeps that sieve near 10 MB.
MAX_HI = 10**14


class BadInput(ValueError):
    """The task input is not something this program can count."""


def base_primes(limit: int) -> list[int]:
    """All primes <= limit, by a plain sieve of Eratosthenes."""
    if limit < 2:
        return []
    sieve = bytearray([1]) * (limit + 1)
    sieve[0] = sieve[1] = 0
    for p in range(2, math.isqrt(limit) + 1):
        if sieve[p]:
            # Slice assignment runs in C; a Python loop over the multiples would be ~50x slower.
            sieve[p * p :: p] = bytes(len(range(p * p, limit + 1, p)))
    return [i for i, flag in enumerate(sieve) if flag]


def count_primes(lo: int, hi: int) -> int:
    """Number of primes p with lo <= p < hi (a segmented sieve)."""
    lo = max(lo, 2)
    if hi <= lo:
        return 0
    primes = base_primes(math.isqrt(hi - 1))
    total = 0
    for seg_lo in range(lo, hi, SEGMENT):
        seg_hi = min(seg_lo + SEGMENT, hi)
        size = seg_hi - seg_lo
        seg = bytearray([1]) * size
        for p in primes:
            if p * p >= seg_hi:
                break
            # First multiple of p in the window, never p itself (p*p is the first composite
            # that p alone is responsible for).
            start = max(p * p, -(-seg_lo // p) * p) - seg_lo
            if start < size:
                seg[start::p] = bytes(len(range(start, size, p)))
        total += seg.count(1)
    return total


def parse_input(text: str) -> tuple[int, int]:
    """Validate the task input and return (lo, hi)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"input is not JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise BadInput(f'input must be an object {{"lo": int, "hi": int}}, got {kind}')
    bounds = []
    for key in ("lo", "hi"):
        value = data.get(key)
        # bool is an int subclass in Python; true/false in the input is an owner's mistake.
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadInput(f"input key {key!r} must be an integer, got {value!r}")
        bounds.append(value)
    lo, hi = bounds
    if lo < 0 or hi < lo:
        raise BadInput(f"need 0 <= lo <= hi, got lo={lo} hi={hi}")
    if hi > MAX_HI:
        raise BadInput(f"hi={hi} is above the supported maximum {MAX_HI}")
    return lo, hi


def read_input() -> str:
    """The task input: stdin, or input.json in the cwd when stdin is empty or a terminal.

    The execution contract provides both; falling back keeps the program usable by hand.
    """
    text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    if not text.strip() and Path("input.json").is_file():
        text = Path("input.json").read_text(encoding="utf-8")
    return text


def main() -> int:
    try:
        lo, hi = parse_input(read_input())
    except BadInput as exc:
        print(f"primes: bad input: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(count_primes(lo, hi)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
