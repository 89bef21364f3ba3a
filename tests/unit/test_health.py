"""Health state machines, outlier ejection, panic mode, connection caps and the slot queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.balancer.checker import HealthChecker, check_request
from pibl.balancer.group import UpstreamGroup
from pibl.balancer.health import (
    MAX_EJECTION,
    EjectionPolicy,
    HealthState,
    OutlierState,
)
from pibl.balancer.strategies import STRATEGIES, Strategy, make_strategy
from pibl.balancer.upstream import Address, Upstream
from pibl.config import HealthSettings, UpstreamSettings, parse_config, settings_to_dict
from pibl.errors import ConfigError
from pibl.http.head import RequestHead

REQ = RequestHead("GET", b"/", "1.1", [(b"Host", b"a")], client_ip="10.0.0.1")


class Clock:
    """A fake monotonic clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def servers(n: int, **kw: Any) -> list[Upstream]:
    return [Upstream(Address("127.0.0.1", 9000 + i), **kw) for i in range(n)]


def group_of(
    upstreams: Sequence[Upstream],
    clock: Clock | None = None,
    strategy: Strategy | None = None,
    **kw: Any,
) -> UpstreamGroup:
    return UpstreamGroup(
        "app",
        upstreams,
        strategy or make_strategy("round_robin"),
        {},
        clock=clock or Clock(),
        wall_clock=lambda: 1_700_000_000.0,
        **kw,
    )


# --------------------------------------------------------------------------- HealthState


def reference_flips(results: Sequence[bool], rise: int, fall: int) -> tuple[list[int], bool]:
    """Where the state flips, computed run by run: a run of failures at least ``fall`` long
    while UP flips at its ``fall``-th element, a run of passes at least ``rise`` long while
    DOWN at its ``rise``-th."""
    flips: list[int] = []
    up = True
    start = 0
    for ok, run in itertools.groupby(results):
        length = len(list(run))
        need = rise if ok else fall
        if ok != up and length >= need:
            flips.append(start + need - 1)
            up = ok
        start += length
    return flips, up


@pytest.mark.parametrize(("rise", "fall"), list(itertools.product(range(1, 5), repeat=2)))
def test_health_state_flips_exactly_at_rise_and_fall_for_every_sequence(
    rise: int, fall: int
) -> None:
    for length in range(9):
        for results in itertools.product((True, False), repeat=length):
            state = HealthState(rise=rise, fall=fall)
            flips = [i for i, ok in enumerate(results) if state.observe(ok)]
            expected_flips, expected_up = reference_flips(results, rise, fall)
            assert flips == expected_flips, (results, rise, fall)
            assert state.is_up is expected_up
            # The streak counters describe the tail of the sequence.
            tail = len(results) - len(list(itertools.takewhile(lambda x: x, results[::-1])))
            assert state.successes == len(results) - tail
            if results and not results[-1]:
                assert state.successes == 0
                assert state.failures >= 1


def test_health_state_starts_up_and_counts_streaks_past_the_flip() -> None:
    state = HealthState(rise=2, fall=3)
    assert state.is_up
    assert [state.observe(False) for _ in range(4)] == [False, False, True, False]
    assert (state.is_up, state.failures, state.successes) == (False, 4, 0)
    assert [state.observe(ok) for ok in (True, False, True, True, True)] == [
        False,
        False,
        False,
        True,
        False,
    ]
    assert (state.is_up, state.failures, state.successes) == (True, 0, 3)


def test_health_state_rejects_zero_thresholds() -> None:
    with pytest.raises(ValueError, match="rise and fall"):
        HealthState(rise=0)
    with pytest.raises(ValueError, match="rise and fall"):
        HealthState(fall=0)


# --------------------------------------------------------------------------- OutlierState


def eject(state: OutlierState, now: float) -> bool:
    """Fail until ejected; returns whether the last failure ejected."""
    flipped = False
    for _ in range(state.policy.max_fails):
        flipped = state.observe(False, now)
    return flipped


def test_ejection_needs_max_fails_in_a_row() -> None:
    state = OutlierState(EjectionPolicy(max_fails=3, base=10))
    assert not state.observe(False, 0)
    assert not state.observe(False, 0)
    assert not state.observe(True, 0)  # a success breaks the streak
    assert state.consecutive_failures == 0
    assert not state.observe(False, 1)
    assert not state.observe(False, 1)
    assert state.observe(False, 1)
    assert state.is_ejected
    assert (state.ejected_until, state.ejections, state.consecutive_failures) == (11, 1, 0)


def test_ejection_ends_when_its_period_is_over_and_ignores_outcomes_meanwhile() -> None:
    state = OutlierState(EjectionPolicy(max_fails=1, base=10))
    assert state.observe(False, 100)
    assert state.is_ejected_at(109.999)
    assert not state.check_return(109.999)
    for ok in (False, False, True):
        assert not state.observe(ok, 105)  # in flight before the ejection, or panic mode
    assert (state.ejections, state.consecutive_failures) == (1, 0)
    assert not state.is_ejected_at(110)
    assert state.check_return(110)
    assert not state.is_ejected
    assert state.returned_at == 110
    assert not state.check_return(111)


def test_ejection_period_grows_with_each_ejection_in_a_row_up_to_the_cap() -> None:
    state = OutlierState(EjectionPolicy(max_fails=2, base=10))
    now = 0.0
    periods = []
    for _ in range(35):
        assert eject(state, now)
        assert state.ejected_until is not None
        periods.append(state.ejected_until - now)
        now = state.ejected_until
        assert state.check_return(now)
        # Failing straight away: the record is not clean, the next ejection is longer.
    assert periods[:4] == [10, 20, 30, 40]
    assert periods[29:] == [MAX_EJECTION] * 6
    assert max(periods) == MAX_EJECTION


def test_cap_never_shortens_a_base_longer_than_it() -> None:
    policy = EjectionPolicy(max_fails=1, base=600)
    assert [policy.period(k) for k in (1, 2, 5)] == [600, 600, 600]


def test_ejection_count_resets_after_serving_well_for_the_last_period() -> None:
    state = OutlierState(EjectionPolicy(max_fails=1, base=10))
    assert eject(state, 0)
    assert state.check_return(10)
    assert eject(state, 10)  # second in a row: 20 s
    assert state.ejected_until == 30
    assert state.check_return(30)
    assert not state.observe(True, 49.9)  # back for 19.9 s < 20 s: still counted
    assert state.ejections == 2
    assert not state.observe(True, 50)  # back for a whole last period: forgotten
    assert state.ejections == 0
    assert eject(state, 60)
    assert state.ejected_until == 70  # base again


def test_a_failure_after_return_without_a_success_keeps_the_count() -> None:
    state = OutlierState(EjectionPolicy(max_fails=2, base=10))
    assert eject(state, 0)
    assert state.check_return(10)
    assert not state.observe(False, 500)  # long after, but no success in between
    assert state.observe(False, 500)
    assert state.ejected_until == 520


def test_max_fails_zero_never_ejects() -> None:
    state = OutlierState(EjectionPolicy(max_fails=0))
    for i in range(100):
        assert not state.observe(False, i)
    assert state.consecutive_failures == 100
    assert not state.is_ejected


def test_reinstate_ends_an_ejection_early() -> None:
    state = OutlierState(EjectionPolicy(max_fails=1, base=10))
    assert not state.reinstate(0)
    assert state.observe(False, 0)
    assert state.reinstate(3)
    assert not state.is_ejected
    assert state.returned_at == 3
    assert state.ejections == 1


def test_ejection_policy_validation() -> None:
    for kw in ({"max_fails": -1}, {"base": 0}, {"cap": 0}):
        with pytest.raises(ValueError, match="max_fails"):
            EjectionPolicy(**kw)


@settings(max_examples=300)
@given(
    max_fails=st.integers(0, 4),
    base=st.floats(0.01, 1000),
    steps=st.lists(st.tuples(st.booleans(), st.floats(0, 50)), max_size=60),
)
def test_outlier_invariants(max_fails: int, base: float, steps: list[tuple[bool, float]]) -> None:
    policy = EjectionPolicy(max_fails=max_fails, base=base)
    state = OutlierState(policy)
    now = 0.0
    for ok, dt in steps:
        now += dt
        state.check_return(now)
        was_ejected = state.is_ejected
        if state.observe(ok, now):
            assert not ok
            assert not was_ejected
            assert max_fails > 0
            assert state.ejected_until is not None
            period = state.ejected_until - now
            assert period == pytest.approx(state.last_period)
            assert base * 0.999 <= period <= max(MAX_EJECTION, base) * 1.001
        if max_fails:
            assert state.consecutive_failures < max_fails
        assert (state.ejected_until is not None) == state.is_ejected


# --------------------------------------------------------------------------- the group


def test_down_and_ejected_servers_are_never_selected() -> None:
    clock = Clock()
    ups = servers(3)
    group = group_of(ups, clock, max_fails=1, fail_timeout=10)
    ups[0].health.is_up = False
    group.observe(ups[1], ok=False, reason="status 502")
    assert ups[1].is_ejected
    for _ in range(10):
        assert group.select(REQ) is ups[2]
    assert not group.in_panic


def test_ejection_is_logged_with_reason_and_return_is_lazy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pibl.balancer")
    clock = Clock(500.0)
    a, b = servers(2)
    group = group_of([a, b], clock, max_fails=2, fail_timeout=5)
    group.observe(a, ok=False, reason="connect failed: refused")
    assert not a.is_ejected
    group.observe(a, ok=False, reason="connect failed: refused")
    assert a.is_ejected
    assert (a.ejected_until, a.ejected_until_wall, a.ejections) == (505.0, 1_700_000_005.0, 1)
    [record] = [r for r in caplog.records if "ejected" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "127.0.0.1:9000" in record.getMessage()
    assert "connect failed: refused" in record.getMessage()
    clock.now = 504.9
    assert {id(group.select(REQ)) for _ in range(4)} == {id(b)}
    clock.now = 505.0
    assert {group.select(REQ) for _ in range(4)} == {a, b}
    assert not a.is_ejected
    assert a.ejected_until_wall is None
    returned = [r for r in caplog.records if "returned" in r.getMessage()]
    assert len(returned) == 1
    assert returned[0].levelno == logging.INFO


def test_passive_detection_can_be_disabled() -> None:
    a, b = servers(2)
    group = group_of([a, b], max_fails=0)
    for _ in range(50):
        group.observe(a, ok=False)
    assert not a.is_ejected


def test_panic_mode_tries_every_server_and_logs_once_per_episode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pibl.balancer")
    clock = Clock()
    ups = servers(3)
    group = group_of(ups, clock, max_fails=1, fail_timeout=60)
    ups[0].health.is_up = False
    group.observe(ups[1], ok=False)
    group.observe(ups[2], ok=False)
    chosen = [group.select(REQ) for _ in range(9)]
    assert set(chosen) == set(ups)
    assert group.in_panic
    # A retry still skips what this request tried.
    assert group.select(REQ, tried=[ups[0], ups[1]]) is ups[2]
    assert group.select(REQ, tried=ups) is None
    panics = [r for r in caplog.records if "panic mode:" in r.getMessage()]
    assert len(panics) == 1
    assert panics[0].levelno == logging.WARNING
    # Over when one server is usable again; a new episode logs again.
    ups[0].health.is_up = True
    assert group.select(REQ) is ups[0]
    assert not group.in_panic
    assert any("panic mode over" in r.getMessage() for r in caplog.records)
    ups[0].health.is_up = False
    group.select(REQ)
    assert len([r for r in caplog.records if "panic mode:" in r.getMessage()]) == 2


def test_switched_off_servers_are_left_out_even_in_panic() -> None:
    ups = servers(2)
    group = group_of(ups)
    ups[0].is_available = False
    ups[1].health.is_up = False
    assert [group.select(REQ) for _ in range(3)] == [ups[1]] * 3  # panic among the enabled
    ups[1].is_available = False
    assert group.select(REQ) is None


def test_a_server_at_its_cap_is_not_a_candidate() -> None:
    a, b = servers(2, max_connections=2)
    group = group_of([a, b])
    a.in_flight = 2
    assert [group.select(REQ) for _ in range(3)] == [b, b, b]
    b.in_flight = 2
    assert group.select(REQ) is None
    a.in_flight = 1
    assert group.select(REQ) is a
    assert a.has_capacity
    assert not b.has_capacity


def test_active_results_flip_health_log_and_reinstate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pibl.balancer")
    a, b = servers(2)
    a.health = HealthState(rise=2, fall=2)
    group = group_of([a, b], max_fails=1)
    group.check_result(a, ok=False, reason="status 500")
    assert a.is_healthy
    group.check_result(a, ok=False, reason="status 503")
    assert not a.is_healthy
    assert a.health.last_result == "status 503"
    down = [r for r in caplog.records if "is DOWN" in r.getMessage()]
    assert len(down) == 1
    assert down[0].levelno == logging.WARNING
    assert "127.0.0.1:9000" in down[0].getMessage()
    assert "status 503" in down[0].getMessage()
    group.check_result(a, ok=True, reason="status 200")
    group.check_result(a, ok=True, reason="status 200")
    assert a.is_healthy
    up = [r for r in caplog.records if "is UP" in r.getMessage()]
    assert len(up) == 1
    assert up[0].levelno == logging.INFO
    # A passed check ends an ejection (Envoy's successful_active_health_check_uneject_host).
    group.observe(b, ok=False)
    assert b.is_ejected
    group.check_result(b, ok=True, reason="status 200")
    assert not b.is_ejected
    assert b.ejected_until_wall is None


def test_upstream_repr_and_admin_fields() -> None:
    (a,) = servers(1)
    group = group_of([a], max_fails=1, fail_timeout=3)
    a.health.is_up = False
    group.observe(a, ok=False)
    assert repr(a) == "<Upstream 127.0.0.1:9000 weight=1 in_flight=0 down ejected>"
    assert (a.consecutive_failures, a.ejections, a.is_ejected) == (0, 1, True)
    with pytest.raises(ValueError, match="max_connections"):
        Upstream(Address("a", 1), max_connections=-1)


class Recording:
    """Wraps a strategy and records every candidate list it was given."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.seen: list[list[Upstream]] = []

    def select(self, candidates: Sequence[Upstream], request: RequestHead) -> Upstream | None:
        self.seen.append(list(candidates))
        return self.inner.select(candidates, request)


server_state = st.tuples(
    st.booleans(),  # switched on
    st.booleans(),  # health up
    st.sampled_from([None, -1.0, 0.0, 5.0]),  # ejected until now + this
    st.integers(0, 3),  # max_connections
    st.integers(0, 3),  # in flight
    st.booleans(),  # tried
)


@settings(max_examples=400)
@given(
    name=st.sampled_from(sorted(STRATEGIES)),
    states=st.lists(server_state, min_size=1, max_size=6),
    rounds=st.integers(1, 4),
)
def test_a_strategy_never_gets_an_unavailable_server(
    name: str, states: list[tuple[bool, bool, float | None, int, int, bool]], rounds: int
) -> None:
    clock = Clock(100.0)
    ups = servers(len(states))
    recording = Recording(make_strategy(name))
    group = group_of(ups, clock, recording)
    tried = []
    for upstream, (on, up, ejected, cap, in_flight, was_tried) in zip(ups, states, strict=True):
        upstream.is_available = on
        upstream.health.is_up = up
        if ejected is not None:
            upstream.outlier.ejected_until = clock.now + ejected
        upstream.max_connections = cap
        upstream.in_flight = in_flight
        if was_tried:
            tried.append(upstream)
    for _ in range(rounds):
        chosen = group.select(REQ, tried)
        enabled = [u for u in ups if u.is_available]
        usable = [u for u in enabled if u.is_healthy and not u.outlier.is_ejected_at(clock.now)]
        allowed = usable or enabled  # panic mode only when nothing is usable
        eligible = [u for u in allowed if u not in tried and u.has_capacity]
        for candidates in recording.seen:
            assert candidates, "a strategy is never asked to choose from nothing"
            assert all(u in eligible for u in candidates)
            assert set(candidates) == set(eligible)
        recording.seen.clear()
        if eligible:
            assert chosen in eligible
        else:
            assert chosen is None
        assert group.in_panic == (not usable and bool(enabled))


# --------------------------------------------------------------------------- the queue


class Attempts:
    """What the pipeline does around ``choose``: count in flight, then release."""

    def __init__(self, group: UpstreamGroup) -> None:
        self.group = group

    async def acquire(self, tried: Sequence[Upstream] = ()) -> Upstream | None:
        upstream = await self.group.choose(REQ, tried)
        if upstream is not None:
            upstream.in_flight += 1
        return upstream

    def release(self, upstream: Upstream) -> None:
        upstream.in_flight -= 1
        self.group.release(upstream)


async def test_queued_requests_get_freed_slots_in_order() -> None:
    (a,) = servers(1, max_connections=1)
    group = group_of([a], queue=10, queue_timeout=10)
    attempts = Attempts(group)
    assert await attempts.acquire() is a
    order: list[int] = []

    async def queued(i: int) -> None:
        upstream = await attempts.acquire()
        assert upstream is a
        order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(queued(i)))
        await asyncio.sleep(0)
    assert group.queued == 5
    for i in range(5):
        attempts.release(a)
        await tasks[i]
        assert a.in_flight == 1  # never over the cap
        # A newcomer does not jump the queue.
        assert group.select(REQ) is None
    assert order == [0, 1, 2, 3, 4]
    assert group.queued == 0


async def test_full_queue_and_expired_wait_give_none() -> None:
    (a,) = servers(1, max_connections=1)
    group = group_of([a], queue=1, queue_timeout=0.05)
    attempts = Attempts(group)
    assert await attempts.acquire() is a
    waiting = asyncio.create_task(attempts.acquire())
    await asyncio.sleep(0)
    assert group.queued == 1
    assert await attempts.acquire() is None  # the queue is full: at once
    assert group.rejected == 1
    assert await waiting is None  # the wait ran out
    assert group.rejected == 2
    assert group.queued == 0
    assert a.in_flight == 1


async def test_no_queue_means_none_at_once() -> None:
    (a,) = servers(1, max_connections=1)
    group = group_of([a], queue=0)
    a.in_flight = 1
    assert await group.choose(REQ) is None


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    (a,) = servers(1, max_connections=1)
    group = group_of([a])
    attempts = Attempts(group)
    assert await attempts.acquire() is a
    first = asyncio.create_task(attempts.acquire())
    await asyncio.sleep(0)
    second = asyncio.create_task(attempts.acquire())
    await asyncio.sleep(0)
    attempts.release(a)  # handed to ``first``...
    first.cancel()  # ...which goes away before it resumes
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is a
    assert a.in_flight == 1
    assert group.queued == 0


async def test_a_freed_slot_skips_a_waiter_that_tried_that_server() -> None:
    a, b = servers(2, max_connections=1)
    group = group_of([a, b])
    attempts = Attempts(group)
    assert {await attempts.acquire(), await attempts.acquire()} == {a, b}
    retry = asyncio.create_task(attempts.acquire(tried=[a]))  # only b will do
    await asyncio.sleep(0)
    fresh = asyncio.create_task(attempts.acquire())
    await asyncio.sleep(0)
    attempts.release(a)
    assert await fresh is a
    assert not retry.done()
    attempts.release(b)
    assert await retry is b


async def test_waiters_get_a_server_coming_back_from_ejection() -> None:
    a, b = servers(2, max_connections=1)
    group = UpstreamGroup(
        "app", [a, b], make_strategy("round_robin"), {}, max_fails=1, fail_timeout=0.05
    )
    group.observe(b, ok=False)
    assert b.is_ejected
    attempts = Attempts(group)
    assert await attempts.acquire() is a
    assert await attempts.acquire() is b  # the period ends with nobody releasing anything


async def test_close_answers_the_queue() -> None:
    (a,) = servers(1, max_connections=1)
    group = group_of([a])
    a.in_flight = 1
    waiting = asyncio.create_task(group.choose(REQ))
    await asyncio.sleep(0)
    group.close()
    assert await waiting is None


async def test_choose_without_caps_never_waits() -> None:
    ups = servers(2)
    group = group_of(ups, queue=0)
    for u in ups:
        u.in_flight = 1000
    assert await group.choose(REQ) in ups
    for u in ups:
        u.health.is_up = False
        u.is_available = False
    assert await group.choose(REQ) is None


# --------------------------------------------------------------------------- checker bits


def test_check_request_bytes() -> None:
    assert check_request(Upstream(Address("::1", 8080)), "/healthz") == (
        b"GET /healthz HTTP/1.1\r\nHost: [::1]:8080\r\nUser-Agent: pibl-health-check\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n"
    )


async def test_checker_installs_thresholds_and_closes_without_start() -> None:
    ups = servers(2)
    group = group_of(ups)
    checker = HealthChecker(group, HealthSettings(rise=4, fall=7))
    assert [(u.health.rise, u.health.fall) for u in ups] == [(4, 7), (4, 7)]
    await checker.aclose()  # before start
    await checker.aclose()
    assert repr(checker) == "<HealthChecker app servers=2>"


# --------------------------------------------------------------------------- config


def upstream_config(**keys: Any) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:8080"},
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"], **keys}},
    }


def test_config_defaults_for_passive_checks_and_queue() -> None:
    app = parse_config(upstream_config()).upstreams["app"]
    assert (app.max_fails, app.fail_timeout, app.queue, app.queue_timeout) == (5, 10.0, 100, 10.0)
    assert UpstreamSettings().max_fails == 5


def test_config_reads_passive_checks_and_queue() -> None:
    settings = parse_config(
        upstream_config(
            max_fails=0,
            fail_timeout="1m30s",
            queue=0,
            queue_timeout="250ms",
            servers=[{"address": "127.0.0.1:9001", "max_connections": 4}],
        )
    )
    app = settings.upstreams["app"]
    assert (app.max_fails, app.fail_timeout, app.queue, app.queue_timeout) == (0, 90.0, 0, 0.25)
    assert app.servers[0].max_connections == 4
    assert parse_config(settings_to_dict(settings)) == settings


@pytest.mark.parametrize(
    ("keys", "path", "fragment"),
    [
        ({"max_fails": -1}, "max_fails", "expected a non-negative integer, got -1"),
        ({"max_fails": "5"}, "max_fails", 'expected a non-negative integer, got "5"'),
        ({"fail_timeout": "0s"}, "fail_timeout", "expected a positive duration"),
        ({"fail_timeout": "10x"}, "fail_timeout", 'unknown unit "x"'),
        ({"queue": -1}, "queue", "expected a non-negative integer"),
        ({"queue": True}, "queue", "expected a non-negative integer, got true"),
        ({"queue_timeout": 0}, "queue_timeout", "expected a positive duration"),
        ({"max_fail": 3}, "max_fail", 'unknown key; did you mean "max_fails"?'),
    ],
)
def test_config_errors_for_passive_checks_and_queue(
    keys: dict[str, Any], path: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(upstream_config(**keys), "pibl.toml")
    message = str(info.value)
    assert message.startswith(f"pibl.toml: upstreams.app.{path}: "), message
    assert fragment in message, message
