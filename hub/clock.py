"""The hub's clock: wall-clock-like seconds that never jump while the hub runs.

Leases and offers are timed by the runtime's clock (``now`` inside every scheduler
event). Read from the wall clock, a step of the system time (an NTP correction, an admin
setting the date, a VM resumed from a snapshot) would expire every lease at once (a step
forward) or keep dead ones alive (a step back). So the clock is anchored: the wall time
read once at start-up, plus the monotonic time elapsed since. Stored timestamps stay UNIX
seconds, as the wall clock gave them at start-up; a wall-clock step during the run moves
nothing. After a restart the clock is anchored afresh, and leases restored from the store
are judged from the restart moment (the scheduler gives each one heartbeat window from
then, and each restored offer a fresh offer_timeout), never from stored deadlines that the
new anchor might place in the past or far in the future.

``time.monotonic`` does not count time the machine spent suspended: after a suspend the
anchored clock is behind the wall clock by that time (until the next restart), which
affects timestamps only, never lease timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class AnchoredClock:
    """``start_wall + (monotonic() - start_mono)``: callable like ``time.time``."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self.start_mono = monotonic()
        self.start_wall = wall()

    def __call__(self) -> float:
        return self.start_wall + (self._monotonic() - self.start_mono)
