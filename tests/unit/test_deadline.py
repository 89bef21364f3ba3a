"""Deadline: a timeout that moves without a loop timer per move, and still fires on time."""

from __future__ import annotations

import asyncio

from pibl.deadline import Deadline


async def test_fires_once_after_its_delay() -> None:
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    done = loop.create_future()
    deadline = Deadline(loop)
    start = loop.time()
    deadline.set(0.05, lambda: (calls.append(loop.time()), done.set_result(None)))
    await asyncio.wait_for(done, 5)
    assert calls[0] - start >= 0.05 - 0.002
    assert not deadline.is_set


async def test_moving_it_later_reuses_the_pending_timer_and_fires_at_the_new_time() -> None:
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop)
    fired = loop.create_future()
    start = loop.time()
    deadline.set(0.03, lambda: fired.set_result(loop.time()))
    handle = deadline._handle
    deadline.set(0.12, lambda: fired.set_result(loop.time()))
    assert deadline._handle is handle  # no new loop timer for a later deadline
    when = await asyncio.wait_for(fired, 5)
    assert when - start >= 0.12 - 0.002


async def test_moving_it_earlier_fires_at_the_earlier_time() -> None:
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop)
    fired = loop.create_future()
    start = loop.time()
    deadline.set(10.0, lambda: fired.set_result("late"))
    deadline.set(0.03, lambda: fired.set_result(loop.time()))
    when = await asyncio.wait_for(fired, 5)
    assert when != "late"
    assert 0.03 - 0.002 <= when - start < 5


async def test_cleared_or_closed_deadline_never_calls_back() -> None:
    loop = asyncio.get_running_loop()
    called: list[str] = []
    cleared = Deadline(loop)
    cleared.set(0.01, lambda: called.append("cleared"))
    cleared.clear()
    assert not cleared.is_set
    closed = Deadline(loop)
    closed.set(0.01, lambda: called.append("closed"))
    closed.close()
    assert closed._handle is None
    # A probe set later than both fires after either would have.
    probe = Deadline(loop)
    fired = loop.create_future()
    probe.set(0.05, lambda: fired.set_result(None))
    await asyncio.wait_for(fired, 5)
    assert called == []


async def test_horizon_keeps_a_shorter_timeout_of_another_kind_on_time() -> None:
    # The owner alternates a long timeout (keep-alive) and a short one (header): with the
    # horizon at the short one, setting the short one never needs a new loop timer, and it
    # still fires on time.
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, horizon=0.05)
    deadline.set(10.0, lambda: None)  # the long kind: the timer waits at most the horizon
    handle = deadline._handle
    fired = loop.create_future()
    start = loop.time()
    deadline.set(0.05, lambda: fired.set_result(loop.time()))
    assert deadline._handle is handle
    when = await asyncio.wait_for(fired, 5)
    assert 0.05 - 0.002 <= when - start < 1.0


async def test_long_deadline_behind_a_horizon_fires_at_its_time() -> None:
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, horizon=0.02)
    fired = loop.create_future()
    start = loop.time()
    deadline.set(0.09, lambda: fired.set_result(loop.time()))
    when = await asyncio.wait_for(fired, 5)
    assert when - start >= 0.09 - 0.002
