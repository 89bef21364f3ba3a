"""Serving (a request coroutine driven by the futures it waits on, with no asyncio Task) and
``within`` (a timeout that needs no current task)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import pytest

from pibl.deadline import within
from pibl.server.downstream import PARK, Serving


class Crashes:
    """The ``on_crash`` hook: counts its calls and logs, as DownstreamConnection's does."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        logging.getLogger("test").exception("crash")


async def drive(coro: Coroutine[Any, Any, None], crashes: Crashes | None = None) -> Serving:
    """Start ``coro`` from a loop callback, as a request starts from ``data_received``: outside
    any task. Returns once its first step has run."""
    loop = asyncio.get_running_loop()
    serving = Serving(coro, loop, crashes or Crashes())
    started = loop.create_future()
    loop.call_soon(lambda: (serving.step(), started.set_result(None)))
    await started
    return serving


async def test_runs_to_the_end_without_waiting_when_nothing_waits() -> None:
    seen: list[str] = []

    async def body() -> None:
        seen.append("ran")

    serving = await drive(body())
    assert seen == ["ran"]
    assert serving.done()
    await asyncio.wait_for(serving.idle(), 5)


async def test_resumes_from_the_future_it_waits_on_with_its_result_or_error() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[int] = loop.create_future()
    second: asyncio.Future[int] = loop.create_future()
    seen: list[object] = []

    async def body() -> None:
        seen.append(asyncio.current_task())  # none: that is the point
        seen.append(await first)
        try:
            await second
        except KeyError as error:
            seen.append(error)

    serving = await drive(body())
    assert seen == [None]
    assert not serving.done()
    first.set_result(7)
    error = KeyError("x")
    loop.call_soon(second.set_exception, error)
    await asyncio.wait_for(serving.idle(), 5)
    assert seen == [None, 7, error]
    assert serving.done()


async def test_a_bare_yield_waits_one_turn_of_the_loop() -> None:
    loop = asyncio.get_running_loop()
    seen: list[object] = []

    async def body() -> None:
        seen.append(1)
        await asyncio.sleep(0)
        seen.append(2)

    serving = Serving(body(), loop, Crashes())
    assert serving.step()  # still running: it asked for a turn of the loop
    seen.append("step returned")
    await asyncio.wait_for(serving.idle(), 5)
    assert seen == [1, "step returned", 2]


async def test_cancel_raises_cancelled_error_where_it_waits_and_runs_its_cleanup() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    cleaned = loop.create_future()

    async def body() -> None:
        try:
            await never
        finally:
            cleaned.set_result(True)

    serving = await drive(body())
    assert serving.cancel()
    assert never.cancelled()  # as Task.cancel does with the future its task waits on
    await asyncio.wait_for(serving.idle(), 5)
    assert cleaned.result()
    assert serving.done()
    assert not serving.cancel()  # over: nothing left to cancel


async def test_cancel_after_the_wait_ended_is_thrown_in_at_the_next_step() -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    outcome: list[str] = []

    async def body() -> None:
        try:
            await ready
            outcome.append("resumed")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    serving = await drive(body())
    ready.set_result(None)  # its wake-up is scheduled; the future can no longer be cancelled
    assert serving.cancel()
    await asyncio.wait_for(serving.idle(), 5)
    assert outcome == ["cancelled"]


async def test_an_exception_out_of_the_coroutine_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    async def body() -> None:
        await ready
        raise ValueError("bug")

    crashes = Crashes()
    serving = await drive(body(), crashes)
    with caplog.at_level(logging.ERROR, logger="test"):
        ready.set_result(None)
        await asyncio.wait_for(serving.idle(), 5)
    assert crashes.calls == 1
    [record] = caplog.records
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


async def test_yielding_something_other_than_a_future_is_raised_inside() -> None:
    class Odd:
        def __await__(self) -> Any:
            yield "not a future"

    caught: list[BaseException] = []

    async def body() -> None:
        try:
            await Odd()
        except RuntimeError as error:
            caught.append(error)

    serving = await drive(body())
    await asyncio.wait_for(serving.idle(), 5)
    assert "not a future" in str(caught[0])


async def test_a_parked_coroutine_waits_for_the_next_step_and_idle_completes() -> None:
    loop = asyncio.get_running_loop()
    rounds: list[int] = []

    async def body() -> None:
        for number in range(3):
            rounds.append(number)
            await PARK

    serving = await drive(body())
    assert rounds == [0]
    assert serving.parked
    await asyncio.wait_for(serving.idle(), 5)  # already parked: completes at once
    loop.call_soon(serving.step)
    await asyncio.wait_for(serving.idle(), 5)  # completes at the next park
    assert rounds == [0, 1]
    assert serving.parked
    assert not serving.done()


async def test_closing_a_parked_coroutine_runs_its_cleanup() -> None:
    cleaned: list[bool] = []

    async def body() -> None:
        try:
            await PARK
        finally:
            cleaned.append(True)

    serving = await drive(body())
    serving.close()
    assert cleaned == [True]
    assert serving.done()
    assert not serving.parked


async def test_cancelling_a_parked_coroutine_ends_it_at_once() -> None:
    outcome: list[str] = []

    async def body() -> None:
        try:
            await PARK
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    serving = await drive(body())
    assert serving.cancel()
    assert outcome == ["cancelled"]
    assert serving.done()


# -- within --------------------------------------------------------------------------------


async def test_within_returns_the_result_in_time() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 5

    assert await within(quick(), 5) == 5


async def test_within_times_out_and_cancels_what_it_waited_on() -> None:
    loop = asyncio.get_running_loop()
    cancelled = loop.create_future()

    async def slow() -> None:
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            cancelled.set_result(True)
            raise

    start = loop.time()
    with pytest.raises(TimeoutError):
        await within(slow(), 0.05)
    assert loop.time() - start >= 0.05 - 0.002
    assert await asyncio.wait_for(cancelled, 5)


async def test_within_needs_no_current_task() -> None:
    loop = asyncio.get_running_loop()
    outcome: list[object] = []

    async def body() -> None:
        assert asyncio.current_task() is None
        try:
            await within(loop.create_future(), 0.02)
        except TimeoutError as error:
            outcome.append(error)

    serving = await drive(body())
    await asyncio.wait_for(serving.idle(), 5)
    assert isinstance(outcome[0], TimeoutError)


async def test_within_passes_the_callers_own_cancellation_through() -> None:
    loop = asyncio.get_running_loop()
    outcome: list[str] = []

    async def body() -> None:
        try:
            await within(loop.create_future(), 30)
        except TimeoutError:
            outcome.append("timeout")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    serving = await drive(body())
    serving.cancel()
    await asyncio.wait_for(serving.idle(), 5)
    assert outcome == ["cancelled"]
