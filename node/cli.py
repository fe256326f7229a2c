"""``issc-node --config FILE``: run a volunteer node in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from issc.config import load_node_config
from issc.errors import IsscError
from node.client import NodeClient
from node.sandbox import enable_orphan_reaping, sandbox_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="issc-node", description="Run an issc volunteer node.")
    parser.add_argument("--config", type=Path, required=True, help="node YAML config")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_node_config(args.config)
        # Detected once, here at start: the reduced-isolation warning comes first in the log.
        if sandbox_for(config.sandbox).bwrap is None:
            enable_orphan_reaping()  # catches what escapes a run's process group
        asyncio.run(_run(NodeClient(config)))
    except IsscError as exc:
        print(f"issc-node: error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run(client: NodeClient) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await client.run(stop)


if __name__ == "__main__":
    sys.exit(main())
