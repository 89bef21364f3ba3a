"""An upstream pool as the pipeline sees it: servers, their keep-alive pools and a strategy."""

from __future__ import annotations

from collections.abc import Sequence

from pibl.balancer.strategies import Strategy
from pibl.balancer.upstream import Upstream
from pibl.http.head import RequestHead
from pibl.pool.pool import ConnectionPool


class UpstreamGroup:
    def __init__(
        self,
        name: str,
        upstreams: Sequence[Upstream],
        strategy: Strategy,
        pools: dict[str, ConnectionPool],
        *,
        retries: int = 2,
    ) -> None:
        self.name = name
        self.upstreams = list(upstreams)
        self.strategy = strategy
        self.pools = pools
        self.retries = retries

    def select(self, request: RequestHead, tried: Sequence[Upstream] = ()) -> Upstream | None:
        """The strategy's pick among available servers not tried yet (strategies never see
        an unavailable one)."""
        candidates = [u for u in self.upstreams if u.is_available and u not in tried]
        if not candidates:
            return None
        return self.strategy.select(candidates, request)

    async def choose(self, request: RequestHead, tried: Sequence[Upstream] = ()) -> Upstream | None:
        """The upstream for the next attempt (``select``; waits when servers are at capacity)."""
        return self.select(request, tried)

    def observe(self, upstream: Upstream, *, ok: bool) -> None:
        """The outcome of one attempt on ``upstream``, for passive health checking."""

    def pool_for(self, upstream: Upstream) -> ConnectionPool:
        return self.pools[upstream.key]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def __repr__(self) -> str:
        return f"<UpstreamGroup {self.name} servers={len(self.upstreams)}>"
