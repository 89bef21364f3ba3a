"""A connection's pending timeout, cheap to move.

Connections re-arm a timeout on every request: the client's header and keep-alive timeouts,
its body timeout on every chunk, the upstream read timeout. One loop timer per re-arm
(``call_later`` then ``cancel``) was a measurable share of a proxied request. Here the deadline
is a number: moving it later costs a store, and the loop timer behind it is replaced only when
the deadline moves earlier than that timer. nginx keeps its timers the same way (a timer is not
re-inserted when it would move by less than a small margin).

The loop timer is never set further than ``horizon`` ahead (the owner's shortest timeout). A
deadline set later, whatever its kind, is then never earlier than the timer already pending: the
timer fires early, finds the deadline still ahead and waits again, at most once per ``horizon``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from pibl.errors import caused_by

T = TypeVar("T")

# A timer may fire this much before its time (the loop's clock resolution); closer than this
# to the deadline counts as reached.
SLACK: Final = 0.001


class Deadline:
    __slots__ = ("_callback", "_handle", "_horizon", "_loop", "_time", "_when", "deadline")

    def __init__(self, loop: asyncio.AbstractEventLoop, horizon: float = 0.0) -> None:
        self._loop = loop
        self._time = loop.time  # bound once: a call by name looks the method up each time
        self._horizon = horizon  # 0: the timer goes straight to the deadline
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self._callback: Callable[[], None] | None = None
        self.deadline = 0.0

    @property
    def is_set(self) -> bool:
        return self._callback is not None

    def set(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` in ``delay`` seconds, unless set again or cleared before then."""
        deadline = self._time() + delay
        self.deadline = deadline
        self._callback = callback
        handle = self._handle
        if handle is None or deadline < self._when:
            if handle is not None:
                handle.cancel()
            self._schedule(deadline)

    def clear(self) -> None:
        """No deadline: a pending timer stays and finds nothing to do when it fires."""
        self._callback = None

    def close(self) -> None:
        """Clear, and release the pending timer (the owner is going away)."""
        self._callback = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, deadline: float) -> None:
        when = deadline
        if self._horizon > 0:
            when = min(deadline, self._time() + self._horizon)
        self._when = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        callback = self._callback
        if callback is None:
            return
        if self.deadline - self._time() > SLACK:
            self._schedule(self.deadline)
            return
        self._callback = None
        callback()


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """Await ``awaitable`` for at most ``timeout`` seconds; past that it is cancelled and
    ``TimeoutError`` raised.

    ``asyncio.timeout`` (and ``wait_for`` since Python 3.12, which is built on it) needs a
    current task; requests run without one (``DownstreamConnection._start_serving``), so the
    pool's connect and the cache's coalescing wait time themselves with this instead.
    """
    loop = asyncio.get_running_loop()
    inner = asyncio.ensure_future(awaitable)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        inner.cancel()

    handle = loop.call_later(timeout, expire)
    try:
        return await inner
    except asyncio.CancelledError:
        if expired:
            raise caused_by(TimeoutError(f"timed out after {timeout:g}s"), None)  # noqa: B904
        raise  # the caller itself was cancelled (it cancels what it waits on: inner)
    finally:
        handle.cancel()
