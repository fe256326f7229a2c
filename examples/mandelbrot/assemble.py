"""Put the mandelbrot project's tiles together into one PNG picture.

    python3 assemble.py ISSC_DATA/outbox/mandelbrot/results.jsonl --out picture.png

Reads the completed (state C) result lines, places each tile, colours it and writes an RGB
PNG. Tiles with no completed result stay black and are named on stderr; the exit status is
then 1 (0 when the picture is whole, 2 when the results cannot be read or the PNG not written).

Standard library only: the PNG is written by hand with zlib and struct.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSIDE = 255
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Palette stops (position 0..1, RGB): deep blue through white to orange, a classic look.
STOPS = [
    (0.0, (0, 7, 100)),
    (0.16, (32, 107, 203)),
    (0.42, (237, 255, 255)),
    (0.64, (255, 170, 0)),
    (0.86, (0, 2, 0)),
    (1.0, (0, 7, 100)),
]


@dataclass
class Tile:
    task_id: str
    x0: int
    y0: int
    w: int
    h: int
    pixels: bytes
    width: int | None
    height: int | None


def palette() -> list[bytes]:
    """RGB for each pixel value: 0..254 escape speed, 255 (inside the set) black."""
    colours = []
    for value in range(INSIDE):
        # Most points escape within a few iterations; the square root spreads those low
        # values over more of the palette so the picture is not one flat colour.
        t = (value / (INSIDE - 1)) ** 0.5
        for (t0, c0), (t1, c1) in itertools.pairwise(STOPS):
            if t <= t1:
                f = (t - t0) / (t1 - t0)
                colours.append(bytes(round(a + (b - a) * f) for a, b in zip(c0, c1, strict=True)))
                break
    colours.append(b"\x00\x00\x00")
    return colours


def parse_tile(task_id: str, result: Any) -> Tile:
    """A completed result as a Tile; ValueError says what is wrong with it."""
    if not isinstance(result, dict):
        raise ValueError("result is not an object")
    numbers = {}
    for key in ("x0", "y0", "w", "h"):
        value = result.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"result key {key!r} is not a non-negative integer: {value!r}")
        numbers[key] = value
    try:
        pixels = zlib.decompress(base64.b64decode(result["pixels"], validate=True))
    except (KeyError, TypeError, binascii.Error, zlib.error) as exc:
        raise ValueError(f"pixels cannot be decoded: {exc}") from None
    if len(pixels) != numbers["w"] * numbers["h"]:
        raise ValueError(f"{len(pixels)} pixel bytes for a {numbers['w']}x{numbers['h']} tile")
    size = [result.get(k) if isinstance(result.get(k), int) else None for k in ("width", "height")]
    return Tile(task_id, pixels=pixels, width=size[0], height=size[1], **numbers)


def read_results(path: Path) -> tuple[list[Tile], list[str]]:
    """The completed tiles, and a line per result that is not one."""
    tiles: list[Tile] = []
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
            if not isinstance(row, dict):
                problems.append(f"{path}:{lineno}: not a result object")
                continue
            task_id = str(row.get("id"))
            if row.get("state") != "C":
                problems.append(f"task {task_id}: state {row.get('state')}: {row.get('error')}")
                continue
            try:
                tiles.append(parse_tile(task_id, row.get("result")))
            except ValueError as exc:
                problems.append(f"task {task_id}: {exc}")
    return tiles, problems


def png_chunk(kind: bytes, data: bytes) -> bytes:
    # length, type, data, then a CRC-32 over type and data (PNG spec, section 5.3).
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(width: int, height: int, rgb_rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG of the given rows (each 3*width bytes)."""
    # Bit depth 8, colour type 2 (RGB), deflate compression, filter method 0, no interlace.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # Each scanline starts with its filter type; 0 (None) keeps the writer simple.
    raw = b"".join(b"\x00" + row for row in rgb_rows)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def picture_size(tiles: list[Tile], width: int | None, height: int | None) -> tuple[int, int]:
    """The command line's size, else what the workers reported, else what the tiles cover."""
    if width is None:
        width = max((t.width for t in tiles if t.width), default=None)
        if width is None:
            width = max((t.x0 + t.w for t in tiles), default=0)
    if height is None:
        height = max((t.height for t in tiles if t.height), default=None)
        if height is None:
            height = max((t.y0 + t.h for t in tiles), default=0)
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Assemble mandelbrot tiles into a PNG.")
    parser.add_argument("results", type=Path, help="<data_dir>/outbox/mandelbrot/results.jsonl")
    parser.add_argument("--out", type=Path, default=Path("picture.png"), help="PNG to write")
    parser.add_argument("--width", type=int, help="picture width; default: from the results")
    parser.add_argument("--height", type=int, help="picture height; default: from the results")
    args = parser.parse_args(argv)

    try:
        tiles, problems = read_results(args.results)
    except OSError as exc:
        print(f"assemble: {exc}", file=sys.stderr)
        return 2
    width, height = picture_size(tiles, args.width, args.height)
    if width < 1 or height < 1:
        print(f"assemble: no completed tiles in {args.results}, nothing to draw", file=sys.stderr)
        for problem in problems:
            print(f"assemble: {problem}", file=sys.stderr)
        return 2

    # Unfilled pixels start as INSIDE, which the palette draws black.
    values = bytearray([INSIDE]) * (width * height)
    covered = bytearray(width * height)
    for tile in tiles:
        if tile.x0 + tile.w > width or tile.y0 + tile.h > height:
            problems.append(f"task {tile.task_id}: tile lies outside the {width}x{height} picture")
            continue
        for row in range(tile.h):
            start = (tile.y0 + row) * width + tile.x0
            values[start : start + tile.w] = tile.pixels[row * tile.w : (row + 1) * tile.w]
            covered[start : start + tile.w] = b"\x01" * tile.w

    # Name the missing tiles on the grid the completed ones suggest (make_tasks.py's tiles are
    # all the same size except at the right and bottom edges).
    tile_w = max((t.w for t in tiles), default=width)
    tile_h = max((t.h for t in tiles), default=height)
    missing = []
    for y0 in range(0, height, tile_h):
        for x0 in range(0, width, tile_w):
            w = min(tile_w, width - x0)
            if any(
                covered[(y0 + r) * width + x0 : (y0 + r) * width + x0 + w].count(0)
                for r in range(min(tile_h, height - y0))
            ):
                missing.append(f"t-{x0}-{y0}")

    colours = palette()
    rows = [
        b"".join([colours[v] for v in values[y * width : (y + 1) * width]]) for y in range(height)
    ]
    data = encode_png(width, height, rows)
    part = args.out.with_name(args.out.name + ".part")
    try:
        part.write_bytes(data)
        os.replace(part, args.out)  # never leave half a PNG under the real name
    except OSError as exc:
        print(f"assemble: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {width}x{height} PNG, {len(data)} bytes "
        f"({len(tiles)} tiles placed, {len(missing)} missing)"
    )

    for problem in problems:
        print(f"assemble: {problem}", file=sys.stderr)
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        print(f"assemble: {len(missing)} tile(s) missing, drawn black: {shown}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
