"""Write a task file for the mandelbrot project: one task per tile of the picture.

    python3 make_tasks.py --width 512 --height 512 --tile 64 --max-iter 200 --out tiles.yaml
    python3 make_tasks.py ... --out tiles.jsonl --format jsonl

Task ids are ``t-<x0>-<y0>``, the tile's top-left pixel. Tiles on the right and bottom
edges are narrower when the picture is not a multiple of --tile.
Standard library only, like the rest of the example.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

PROJECT = "mandelbrot"


def tiles(
    width: int, height: int, tile: int, max_iter: int, view: tuple[float, float, float, float]
) -> list[dict[str, Any]]:
    re_min, re_max, im_min, im_max = view
    items = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            items.append(
                {
                    "id": f"t-{x0}-{y0}",
                    "input": {
                        "x0": x0,
                        "y0": y0,
                        "w": min(tile, width - x0),
                        "h": min(tile, height - y0),
                        "width": width,
                        "height": height,
                        "max_iter": max_iter,
                        "re_min": re_min,
                        "re_max": re_max,
                        "im_min": im_min,
                        "im_max": im_max,
                    },
                }
            )
    return items


def yaml_flow(value: Any) -> str:
    """A value as a one-line YAML flow node that is also JSON.

    Only floats need care: YAML 1.1 loaders (PyYAML) read ``1e-05`` as a *string*, because
    their float pattern wants a dot, so write such floats as ``1.0e-05``.
    """
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))}: {yaml_flow(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    return json.dumps(value)


def render_yaml(items: list[dict[str, Any]]) -> str:
    lines = [f"project: {PROJECT}", "tasks:"]
    lines += [f"  - {yaml_flow(item)}" for item in items]
    return "\n".join(lines) + "\n"


def render_jsonl(items: list[dict[str, Any]]) -> str:
    return "".join(json.dumps({"project": PROJECT, **item}) + "\n" for item in items)


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


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a mandelbrot task file.")
    parser.add_argument("--width", type=positive_int, default=512, help="picture width (px)")
    parser.add_argument("--height", type=positive_int, default=512, help="picture height (px)")
    parser.add_argument("--tile", type=positive_int, default=64, help="tile edge (px)")
    parser.add_argument(
        "--max-iter",
        type=positive_int,
        default=200,
        help="iterations before a point counts as inside",
    )
    # The default view frames the whole set in a square picture.
    parser.add_argument("--re-min", type=finite_float, default=-2.2)
    parser.add_argument("--re-max", type=finite_float, default=0.8)
    parser.add_argument("--im-min", type=finite_float, default=-1.5)
    parser.add_argument("--im-max", type=finite_float, default=1.5)
    parser.add_argument("--out", required=True, help="task file to write ('-' for stdout)")
    parser.add_argument(
        "--format", choices=["yaml", "jsonl"], help="default: jsonl for a .jsonl --out, else yaml"
    )
    args = parser.parse_args(argv)

    if not (args.re_min < args.re_max and args.im_min < args.im_max):
        parser.error("need --re-min < --re-max and --im-min < --im-max")
    fmt = args.format or ("jsonl" if args.out.endswith(".jsonl") else "yaml")
    view = (args.re_min, args.re_max, args.im_min, args.im_max)
    items = tiles(args.width, args.height, args.tile, args.max_iter, view)
    text = render_yaml(items) if fmt == "yaml" else render_jsonl(items)
    write_atomically(args.out, text)
    if args.out != "-":
        print(
            f"wrote {len(items)} tiles of a {args.width}x{args.height} picture "
            f"to {args.out} ({fmt})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
