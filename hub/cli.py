"""``issc-hub [--config FILE]``: run the hub in the foreground until SIGINT/SIGTERM.

``issc-hub --config FILE --fingerprint`` prints the fingerprint of the hub's TLS
certificate (making a self-signed one first under ``tls.self_signed``) and exits: the
line volunteers put in their node's ``tls.fingerprint``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from hub import faults
from hub.app import Hub, prepare_tls
from issc.config import HubConfig, load_hub_config
from issc.errors import IsscError
from issc.tls import certificate_fingerprint

GC_THRESHOLD = 50_000  # allocations between young collections (Python's default: 700)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="issc-hub", description="Run the issc hub.")
    parser.add_argument("--config", type=Path, help="hub YAML config (default: built-in defaults)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--fingerprint",
        action="store_true",
        help="print the TLS certificate's fingerprint for nodes to pin, and exit",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        faults.configure_from_env()  # ISSC_HUB_FAULTS: failpoints for fault tests only
        config = load_hub_config(args.config)
        if args.fingerprint:
            return _print_fingerprint(config)
        # Thousands of sessions are long-lived objects; with the default thresholds the
        # collector walks them all every few thousand allocations, and each walk stalls
        # every node's heartbeat (bench/swarm.py: p99 from ~700 to ~100 ms at 10,000).
        gc.set_threshold(GC_THRESHOLD, 20, 100)
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


def _print_fingerprint(config: HubConfig) -> int:
    if config.tls is None:
        print("issc-hub: error: tls: not set in the config; nothing to pin", file=sys.stderr)
        return 1
    prepare_tls(config)
    print(certificate_fingerprint(config.tls.cert))
    return 0


async def _run(hub: Hub) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await hub.run(stop)


if __name__ == "__main__":
    sys.exit(main())
