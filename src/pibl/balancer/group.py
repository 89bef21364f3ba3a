"""An upstream pool as the pipeline sees it: servers, their keep-alive pools, a strategy, and
the availability rules applied before the strategy sees any server.

For each attempt the candidates are, in this order:

1. the servers the operator has not switched off (``Upstream.is_available``);
2. of those, the *usable* ones: UP as far as active checks know and not ejected by passive
   detection (an ejection that has run its period ends lazily here, against ``clock``);
3. **panic mode**: when none is usable, all of step 1 instead (nginx tries every peer when
   all are marked failed; Envoy's panic threshold). Answering 503 until a checker notices a
   recovery would turn a blip into an outage; trying the servers lets a recovered one answer
   at once and failures still go to the retry rule. Logged once per episode;
4. minus the servers this request has tried already;
5. minus the servers at their ``max_connections`` cap (in flight plus slots handed to queued
   requests that have not resumed yet).

``select`` gives the strategy's pick among those, or None. ``choose`` (what the pipeline
awaits) does the same but, when step 5 removed every remaining server, waits in a bounded FIFO
queue for a slot: ``queue`` requests at most, each for ``queue_timeout`` at most, after which it
returns None and the pipeline answers 503. A slot freed by ``release`` goes to the oldest
queued request that can use it (a later one only when the older ones have tried that server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from pibl.balancer.health import (
    DEFAULT_FAIL_TIMEOUT,
    DEFAULT_MAX_FAILS,
    EjectionPolicy,
    OutlierState,
)
from pibl.balancer.strategies import Strategy
from pibl.balancer.upstream import Upstream
from pibl.http.head import RequestHead
from pibl.pool.pool import ConnectionPool

__all__ = ["DEFAULT_QUEUE", "DEFAULT_QUEUE_TIMEOUT", "UpstreamGroup"]

log: Final = logging.getLogger("pibl.balancer")

DEFAULT_QUEUE: Final = 100  # requests waiting for a slot per pool (HAProxy queues without bound)
DEFAULT_QUEUE_TIMEOUT: Final = (
    10.0  # seconds; HAProxy's "timeout queue" defaults to timeout connect
)
_MIN_WAIT: Final = 0.001  # seconds; never spin on a deadline that is due now


@dataclass(eq=False, slots=True)
class _Waiter:
    """A request queued for a connection slot; ``future`` receives its server (or None)."""

    request: RequestHead
    tried: Sequence[Upstream]
    future: asyncio.Future[Upstream | None]


class UpstreamGroup:
    def __init__(
        self,
        name: str,
        upstreams: Sequence[Upstream],
        strategy: Strategy,
        pools: dict[str, ConnectionPool],
        *,
        retries: int = 2,
        max_fails: int = DEFAULT_MAX_FAILS,
        fail_timeout: float = DEFAULT_FAIL_TIMEOUT,
        queue: int = DEFAULT_QUEUE,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.upstreams = list(upstreams)
        self.strategy = strategy
        self.pools = pools
        self.retries = retries
        self.ejection = EjectionPolicy(max_fails, fail_timeout)
        for upstream in self.upstreams:
            upstream.outlier = OutlierState(self.ejection)
        self.queue_size = queue
        self.queue_timeout = queue_timeout
        self.clock = clock
        self.wall_clock = wall_clock
        self.in_panic = False
        self.rejected = 0  # requests turned away by a full queue or an expired wait
        self._waiters: deque[_Waiter] = deque()
        self._reserved: dict[str, int] = {}  # slots handed to waiters that have not resumed

    # -- availability ---------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Requests waiting for a connection slot."""
        return len(self._waiters)

    def is_usable(self, upstream: Upstream) -> bool:
        """Switched on, UP and not ejected (after ending an ejection whose period is over)."""
        self._check_return(upstream, self.clock())
        return (
            upstream.is_available
            and not upstream.drained
            and upstream.health.is_up
            and not upstream.outlier.is_ejected
        )

    def refresh(self) -> None:
        """End the ejections whose period is over (``select`` does this lazily; the admin API
        calls it before showing the state)."""
        now = self.clock()
        for upstream in self.upstreams:
            self._check_return(upstream, now)

    def candidates(self, tried: Sequence[Upstream] = ()) -> list[Upstream]:
        """Steps 1 to 4 of the module docstring: who may serve the next attempt, caps aside."""
        now = self.clock()
        enabled: list[Upstream] = []
        usable: list[Upstream] = []
        for upstream in self.upstreams:
            if not upstream.is_available or upstream.drained:
                continue
            enabled.append(upstream)
            self._check_return(upstream, now)
            if upstream.health.is_up and upstream.outlier.ejected_until is None:
                usable.append(upstream)
        if usable:
            if self.in_panic:
                self.in_panic = False
                log.info("upstream pool %r has usable servers again; panic mode over", self.name)
            pool = usable
        elif enabled:
            if not self.in_panic:
                self.in_panic = True
                log.warning(
                    "every server of upstream pool %r is down or ejected; panic mode: "
                    "trying all %d of them",
                    self.name,
                    len(enabled),
                )
            pool = enabled
        else:
            return []
        if tried:
            pool = [u for u in pool if u not in tried]
        return pool

    def _has_slot(self, upstream: Upstream) -> bool:
        cap = upstream.max_connections
        return cap == 0 or upstream.in_flight + self._reserved.get(upstream.key, 0) < cap

    def _pick(
        self, request: RequestHead, tried: Sequence[Upstream]
    ) -> tuple[Upstream | None, bool]:
        """The strategy's pick, and whether the answer is None only because of the caps."""
        pool = self.candidates(tried)
        if not pool:
            return None, False
        with_slot = [u for u in pool if self._has_slot(u)]
        if not with_slot:
            return None, True
        return self.strategy.select(with_slot, request), False

    def select(self, request: RequestHead, tried: Sequence[Upstream] = ()) -> Upstream | None:
        """The strategy's pick among the candidates with a free slot, or None.

        Never an unavailable (down, ejected, switched off) server, except in panic mode when
        every server is unavailable; never one tried already or at its cap. Strategies only
        ever see this filtered list.
        """
        return self._pick(request, tried)[0]

    async def choose(self, request: RequestHead, tried: Sequence[Upstream] = ()) -> Upstream | None:
        """The upstream for the next attempt: ``select``, waiting in the queue when every
        remaining candidate is at its cap. None means 503 (nothing available, queue full or the
        wait ran out). The caller must count the attempt in ``in_flight`` before its next
        ``await`` and call ``release`` after it."""
        upstream, must_wait = self.choose_now(request, tried)
        if must_wait:
            return await self.wait_for_slot(request, tried)
        return upstream

    def choose_now(
        self, request: RequestHead, tried: Sequence[Upstream] = ()
    ) -> tuple[Upstream | None, bool]:
        """``choose`` without its wait: (the answer, False), or (None, True) when the request
        must queue for a slot (``wait_for_slot``). Nearly every request is answered here, with
        no coroutine to create."""
        if self._waiters:
            self._dispatch()  # freed slots go to those queued first
        upstream, full = self._pick(request, tried)
        if not full:
            return upstream, False
        if len(self._waiters) >= self.queue_size:
            self.rejected += 1
            log.debug("upstream pool %r: every server at its cap and the queue full", self.name)
            return None, False
        return None, True

    async def wait_for_slot(
        self, request: RequestHead, tried: Sequence[Upstream] = ()
    ) -> Upstream | None:
        """Queue until a candidate has a free slot (None: the wait ran out)."""
        return await self._wait(request, tried)

    # -- the queue ------------------------------------------------------------------------------
    async def _wait(self, request: RequestHead, tried: Sequence[Upstream]) -> Upstream | None:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(request, tried, loop.create_future())
        self._waiters.append(waiter)
        future = waiter.future
        deadline = loop.time() + self.queue_timeout
        try:
            while not future.done():
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                until_return = self._next_return_in()
                if until_return is not None:
                    # An ejected server coming back is a free slot that no release announces.
                    timeout = min(timeout, max(until_return, _MIN_WAIT))
                await asyncio.wait((future,), timeout=timeout)
                if not future.done():
                    self._dispatch()
        except BaseException:
            self._abandon(waiter)
            raise
        if not future.done():
            self._abandon(waiter)
            self.rejected += 1
            log.debug("upstream pool %r: no slot within %gs", self.name, self.queue_timeout)
            return None
        upstream = future.result()
        if upstream is not None:
            # The caller counts it in ``in_flight`` before yielding to the loop again.
            self._unreserve(upstream)
        return upstream

    def _abandon(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the queue; a slot it was handed goes to the next in line."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and (upstream := future.result()) is not None:
            self._unreserve(upstream)
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to queued requests, oldest first."""
        waiters = self._waiters
        for waiter in list(waiters):
            if waiter.future.done():
                waiters.remove(waiter)
                continue
            upstream, full = self._pick(waiter.request, waiter.tried)
            if full:
                if not waiter.tried:
                    break  # later waiters' candidates are a subset of this one's: all full
                continue
            waiters.remove(waiter)
            if upstream is not None:
                self._reserved[upstream.key] = self._reserved.get(upstream.key, 0) + 1
            waiter.future.set_result(upstream)

    def _unreserve(self, upstream: Upstream) -> None:
        left = self._reserved.get(upstream.key, 0) - 1
        if left > 0:
            self._reserved[upstream.key] = left
        else:
            self._reserved.pop(upstream.key, None)

    def _next_return_in(self) -> float | None:
        """Seconds until the next ejection ends, or None when nothing is ejected."""
        ends = [u.outlier.ejected_until for u in self.upstreams if u.outlier.is_ejected]
        return min(e for e in ends if e is not None) - self.clock() if ends else None

    def release(self, upstream: Upstream) -> None:
        """An attempt on ``upstream`` ended (after ``in_flight`` went down): wake a waiter."""
        if self._waiters and upstream.max_connections:
            self._dispatch()

    # -- passive and active health --------------------------------------------------------------
    def observe(self, upstream: Upstream, *, ok: bool, reason: str = "") -> None:
        """The outcome of one attempt on ``upstream``: passive health (outlier detection)."""
        now = self.clock()
        self._check_return(upstream, now)
        outlier = upstream.outlier
        if not outlier.observe(ok, now):
            return
        upstream.ejected_until_wall = self.wall_clock() + outlier.last_period
        log.warning(
            "upstream %s of pool %r ejected for %gs (ejection %d in a row): "
            "%d failed attempts in a row%s",
            upstream.key,
            self.name,
            outlier.last_period,
            outlier.ejections,
            self.ejection.max_fails,
            f", last: {reason}" if reason else "",
        )
        if self._waiters:
            self._dispatch()  # in panic mode the others may have slots for the queue

    def check_result(self, upstream: Upstream, *, ok: bool, reason: str) -> None:
        """The result of one active health check on ``upstream``."""
        health = upstream.health
        health.last_result = reason
        changed = health.observe(ok)
        if changed and health.is_up:
            log.info(
                "upstream %s of pool %r is UP: %d health checks passed in a row (%s)",
                upstream.key,
                self.name,
                health.successes,
                reason,
            )
        elif changed:
            log.warning(
                "upstream %s of pool %r is DOWN: %d health checks failed in a row (last: %s)",
                upstream.key,
                self.name,
                health.failures,
                reason,
            )
        if ok and upstream.outlier.reinstate(self.clock()):
            upstream.ejected_until_wall = None
            changed = True
            log.info(
                "upstream %s of pool %r returned before its ejection ended: health check passed",
                upstream.key,
                self.name,
            )
        if changed and self._waiters:
            self._dispatch()

    def _check_return(self, upstream: Upstream, now: float) -> None:
        if upstream.outlier.check_return(now):
            upstream.ejected_until_wall = None
            log.info(
                "upstream %s of pool %r returned: its %gs ejection is over",
                upstream.key,
                self.name,
                upstream.outlier.last_period,
            )

    # -- the rest -------------------------------------------------------------------------------
    def pool_for(self, upstream: Upstream) -> ConnectionPool:
        return self.pools[upstream.key]

    def close(self) -> None:
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_result(None)
        self._waiters.clear()
        for pool in self.pools.values():
            pool.close()

    def __repr__(self) -> str:
        return f"<UpstreamGroup {self.name} servers={len(self.upstreams)}>"
