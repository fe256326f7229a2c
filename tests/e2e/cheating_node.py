"""``issc-node`` that lies: the cheater of test_quorum_e2e.

Usage: ``python cheating_node.py --config FILE``. The node runs every task honestly,
then replaces the value of each successful result before it authenticates and sends
it: a number becomes that number plus one, anything else ``{"cheat": true}``. The HMAC
is the node's own and checks, so only comparing results (a quorum, a known answer) can
catch it. Nothing here is part of issc.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from node import client
from node.cli import main
from node.executor import RunOutcome

honest_execute = client.NodeClient._execute


def lie(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value + 1
    return {"cheat": True}


async def cheating_execute(self: client.NodeClient, *args: Any, **kwargs: Any) -> RunOutcome:
    outcome = await honest_execute(self, *args, **kwargs)
    if outcome.ok:
        outcome = dataclasses.replace(outcome, result=lie(outcome.result))
    return outcome


client.NodeClient._execute = cheating_execute  # type: ignore[method-assign]

sys.exit(main())
