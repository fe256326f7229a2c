"""``issc-hub [--config FILE]``: run the hub in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from hub.app import Hub
from issc.config import load_hub_config
from issc.errors import IsscError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="issc-hub", description="Run the issc hub.")
    parser.add_argument("--config", type=Path, help="hub YAML config (default: built-in defaults)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_hub_config(args.config)
        asyncio.run(_run(Hub(config)))
    except IsscError as exc:
        print(f"issc-hub: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the data_dir cannot be made or written: a full disk, say
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"issc-hub: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _run(hub: Hub) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await hub.run(stop)


if __name__ == "__main__":
    sys.exit(main())
