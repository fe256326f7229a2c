"""Render Mandelbrot tiles: the long-lived worker of the mandelbrot sample project.

Persistent mode (see the execution contract): the node starts this once and writes one JSON
line per task to stdin, ``{"id": ..., "input": {...}}``; for each we write exactly one line to
stdout, ``{"id": ..., "result": {...}}`` or ``{"id": ..., "error": "..."}``, in order, flushed.
End of stdin means the node is done with us.

The input describes one tile of the full picture::

    {"x0": int, "y0": int, "w": int, "h": int,          # the tile, in pixels of the picture
     "width": int, "height": int, "max_iter": int,       # the picture
     "re_min": float, "re_max": float, "im_min": float, "im_max": float}   # its view

The result carries the tile back with one byte per pixel, row by row: the escape iteration
scaled linearly to 0..254, and 255 for points that never escaped (inside the set). The bytes
are zlib-compressed and base64-encoded so they fit in JSON.

Standard library only: it runs on volunteers' machines with a bare ``python3``.
"""

from __future__ import annotations

import base64
import json
import math
import sys
import zlib
from typing import Any, TextIO

INSIDE = 255
MAX_ITER = 100_000
# A tile larger than this would not fit the project's 256 MB / 8 MB limits comfortably.
MAX_TILE_PIXELS = 1 << 22

INT_KEYS = ("x0", "y0", "w", "h", "width", "height", "max_iter")
FLOAT_KEYS = ("re_min", "re_max", "im_min", "im_max")


class BadInput(ValueError):
    """The task input cannot be rendered; reported as the task's error, the worker lives on."""


def parse_input(data: Any) -> dict[str, Any]:
    """Check a task input and return it with the numbers typed."""
    if not isinstance(data, dict):
        raise BadInput(f"input must be an object, got {type(data).__name__}")
    params: dict[str, Any] = {}
    for key in INT_KEYS:
        value = data.get(key)
        # bool is an int subclass; true/false here is a task-file mistake, not a number.
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadInput(f"input key {key!r} must be an integer, got {value!r}")
        params[key] = value
    for key in FLOAT_KEYS:
        value = data.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BadInput(f"input key {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise BadInput(f"input key {key!r} must be finite, got {value!r}")
        params[key] = float(value)

    x0, y0, w, h = params["x0"], params["y0"], params["w"], params["h"]
    width, height = params["width"], params["height"]
    if width < 1 or height < 1 or w < 1 or h < 1:
        raise BadInput("width, height, w and h must be at least 1")
    if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
        raise BadInput(f"tile {w}x{h} at ({x0}, {y0}) is not inside the {width}x{height} picture")
    if w * h > MAX_TILE_PIXELS:
        raise BadInput(f"tile of {w * h} pixels is above the maximum {MAX_TILE_PIXELS}")
    if not 1 <= params["max_iter"] <= MAX_ITER:
        raise BadInput(f"max_iter must be in 1..{MAX_ITER}, got {params['max_iter']}")
    if not (params["re_min"] < params["re_max"] and params["im_min"] < params["im_max"]):
        raise BadInput("need re_min < re_max and im_min < im_max")
    return params


def render(params: dict[str, Any]) -> bytearray:
    """One byte per pixel of the tile, row by row from the top (im_max) down."""
    x0, y0, w, h = params["x0"], params["y0"], params["w"], params["h"]
    max_iter = params["max_iter"]
    re_min, im_max = params["re_min"], params["im_max"]
    # Sample each pixel at its centre, computed from its index in the whole picture (not by
    # stepping) so neighbouring tiles agree to the last bit where they meet.
    dre = (params["re_max"] - re_min) / params["width"]
    dim = (im_max - params["im_min"]) / params["height"]
    scale = 255 / max_iter
    out = bytearray(w * h)
    i = 0
    for py in range(y0, y0 + h):
        ci = im_max - (py + 0.5) * dim
        ci2 = ci * ci
        for px in range(x0, x0 + w):
            cr = re_min + (px + 0.5) * dre
            # Points in the main cardioid or the period-2 bulb never escape; spotting them in
            # closed form skips max_iter iterations each, most of the cost of the classic view.
            q = (cr - 0.25) ** 2 + ci2
            if q * (q + cr - 0.25) <= 0.25 * ci2 or (cr + 1.0) ** 2 + ci2 <= 0.0625:
                out[i] = INSIDE
                i += 1
                continue
            c = complex(cr, ci)
            z = 0j
            value = INSIDE
            # Complex arithmetic and abs() run in C: measurably faster than separate floats.
            for n in range(max_iter):
                z = z * z + c
                if abs(z) > 2.0:
                    value = min(int(n * scale), INSIDE - 1)
                    break
            out[i] = value
            i += 1
    return out


def handle(line: str) -> dict[str, Any]:
    """The reply line (as a dict) for one request line."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"id": None, "error": f"request is not JSON: {exc}"}
    if not isinstance(request, dict) or "id" not in request:
        return {"id": None, "error": 'request must be an object {"id": ..., "input": ...}'}
    task_id = request["id"]
    try:
        params = parse_input(request.get("input"))
        pixels = render(params)
    except BadInput as exc:
        return {"id": task_id, "error": f"bad input: {exc}"}
    except Exception as exc:  # a bug here must fail this task, not every later one
        return {"id": task_id, "error": f"{type(exc).__name__}: {exc}"}
    result = {key: params[key] for key in ("x0", "y0", "w", "h", "width", "height", "max_iter")}
    result["pixels"] = base64.b64encode(zlib.compress(bytes(pixels), 6)).decode("ascii")
    return {"id": task_id, "result": result}


def serve(stdin: TextIO, stdout: TextIO) -> None:
    # readline() rather than iterating the file: it returns as soon as a line is there, so
    # the node never waits on a read-ahead buffer for its reply.
    while line := stdin.readline():
        if not line.strip():
            continue
        stdout.write(json.dumps(handle(line)) + "\n")
        stdout.flush()


def main() -> int:
    replies = sys.stdout
    # Anything else that prints (a stray debug print, a library warning) must not corrupt
    # the reply stream the node parses, so send it to stderr.
    sys.stdout = sys.stderr
    try:
        serve(sys.stdin, replies)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0  # the node went away; nobody is left to tell
    return 0


if __name__ == "__main__":
    sys.exit(main())
