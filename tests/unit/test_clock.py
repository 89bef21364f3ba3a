"""TurnClock: the wall clock read once per event-loop turn (nginx's cached time)."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import uvloop

from pibl.clock import TurnClock


@pytest.fixture
def ticking(monkeypatch: pytest.MonkeyPatch) -> None:
    """time.time() advances by one second on every call."""
    seconds = itertools.count(1_000_000)
    monkeypatch.setattr(time, "time", lambda: float(next(seconds)))


@pytest.mark.usefixtures("ticking")
def test_without_a_running_loop_every_call_reads_the_clock() -> None:
    clock = TurnClock()
    assert [clock.now() for _ in range(3)] == [1_000_000.0, 1_000_001.0, 1_000_002.0]


@pytest.mark.usefixtures("ticking")
@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_one_reading_per_turn(new_loop: type[asyncio.AbstractEventLoop]) -> None:
    clock = TurnClock()
    seen: list[list[float]] = []

    async def main() -> None:
        for _ in range(3):
            seen.append([clock.now(), clock.now(), clock.now()])
            await asyncio.sleep(0)  # the next turn

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert [set(turn) for turn in seen] == [{1_000_000.0}, {1_000_001.0}, {1_000_002.0}]


@pytest.mark.usefixtures("ticking")
def test_callbacks_of_one_turn_share_the_reading_and_the_next_turn_reads_again() -> None:
    clock = TurnClock()
    readings: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        # Three callbacks queued together run in one turn; the fourth, queued by the last of
        # them, runs in the turn after.
        for _ in range(3):
            loop.call_soon(lambda: readings.append(clock.now()))
        loop.call_soon(lambda: loop.call_soon(lambda: done.set_result(clock.now())))
        readings.append(await done)

    uvloop.run(main())
    assert readings[:3] == [readings[0]] * 3
    assert readings[3] > readings[0]


@pytest.mark.usefixtures("ticking")
def test_a_finished_loop_leaves_no_stale_reading() -> None:
    clock = TurnClock()

    async def read() -> float:
        return clock.now()

    first = uvloop.run(read())
    # The loop that ran is closed; its expiry callback never ran. Outside a loop, and in a new
    # loop, the clock is read again.
    assert clock.now() > first
    assert uvloop.run(read()) > first
