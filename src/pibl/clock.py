"""Wall-clock time read once per turn of the event loop.

A cache hit needs the time three times: when its request arrives, for the cache's freshness
decision, and for the access log's duration. nginx reads the clock once per cycle of its event
loop (``ngx_time_update``) and everything handled in that cycle uses the same value.
``TurnClock`` does the same: the first ``now()`` of a turn reads ``time.time()`` and schedules
the value's expiry with ``call_soon``, which runs at the start of the next turn (a pending
callback also keeps the loop from sleeping in its poll). So a value is never older than the
turn in progress, and a busy turn answering many requests reads the clock once.
"""

from __future__ import annotations

import asyncio
import time


class TurnClock:
    """The wall clock of one event loop (one clock per ``ProxyApp``), read once per turn.

    Without a running loop (start-up, tools, tests) every ``now()`` reads the clock. It is
    meant for code running in the loop: a reading made in the turn in which the loop is stopped
    stays current until the loop runs again and its queued expiry runs.
    """

    __slots__ = ("_current", "_loop", "_now")

    def __init__(self) -> None:
        self._now = 0.0
        self._current = False  # _now was read in this turn
        self._loop: asyncio.AbstractEventLoop | None = None

    def now(self) -> float:
        """``time.time()`` as it was at the first call of this turn of the loop."""
        if self._current:
            return self._now
        now = time.time()
        loop = self._loop
        if loop is None or not loop.is_running():
            # Looked up only then: get_running_loop() calls getpid() each time.
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return now  # no turn to expire with
        loop.call_soon(self._expire)
        self._now = now
        self._current = True
        return now

    def _expire(self) -> None:
        self._current = False
