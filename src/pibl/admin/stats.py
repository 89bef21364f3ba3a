"""Request statistics for the admin API and ``/metrics``, fed by the pipeline's record observers.

The observer runs once per finished request on the proxy's hot path, so it only bumps plain
ints in dicts, files a latency in a fixed-bucket histogram (one ``bisect``) and appends to a
bounded ring buffer. Everything expensive — percentiles, JSON, the Prometheus text — happens
when somebody asks (a scrape, the dashboard's poll).

Every figure is designed to be summed over several worker processes later: counters and
histogram buckets add up, and latency windows merge by pooling their samples
(:meth:`LatencyWindow.merged`). No module here touches a socket or reads a clock by itself.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeVar

from pibl.accesslog import AccessRecord

__all__ = [
    "LATENCY_BUCKETS",
    "Histogram",
    "LatencyWindow",
    "ProxyStats",
    "cache_result",
    "merged_stats",
    "stats_from_dict",
    "stats_to_dict",
    "status_class",
]

_K = TypeVar("_K")

# Upper bounds in seconds, Prometheus-style (``le``): 1 ms .. 60 s, roughly x2.5 per step, the
# spread of the client libraries' defaults stretched to cover read_timeout's 60 s default.
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# The last N upstream times per server for p50/p99: recent enough to follow a slowdown within
# seconds at modest rates, small enough (8 KiB of floats) to sort on every dashboard poll.
WINDOW_SIZE: Final = 1024
# Weight of the newest sample in the latency EWMA (about the last 10 requests dominate), the
# smoothing Finagle's and Envoy's peak-EWMA balancers use for the same signal.
EWMA_ALPHA: Final = 0.1
# Status classes as labels: "2xx" ..., and "other" for 0 (no response was produced).
_CLASSES: Final = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    """``"2xx"`` for 204; ``"other"`` for anything outside 100-599 (0: no response)."""
    return _CLASSES[status // 100] if 100 <= status <= 599 else "other"


def cache_result(cache_status: str) -> str | None:
    """What the cache did, from a ``Cache-Status`` value (RFC 9211); None when not cached.

    ``hit`` (fresh), ``stale`` (served stale: while-revalidate or if-error), ``revalidated``
    (a 304 refreshed the stored response), ``bypass`` (the method or the request's directives
    ruled the cache out) or ``miss``.
    """
    if not cache_status or cache_status == "-":
        return None
    params = [part.strip() for part in cache_status.split(";")[1:]]
    if "hit" in params:
        return "stale" if any(p.startswith("detail=stale") for p in params) else "hit"
    fwd = next((p[4:] for p in params if p.startswith("fwd=")), "")
    if fwd == "stale" and "fwd-status=304" in params:
        return "revalidated"
    if fwd in ("method", "request", "bypass"):
        return "bypass"
    return "miss"


class Histogram:
    """Counts per fixed bucket (``le`` upper bounds) plus sum and count; mergeable by adding."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, so a value equal to a bound counts in it (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of values <= le), ..., ("+Inf", count)]`` as Prometheus exposes it."""
        result: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            result.append(("+Inf" if bound == math.inf else repr(bound), running))
        return result

    def merge(self, other: Histogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum
        self.count += other.count


class LatencyWindow:
    """The last ``size`` latencies (ring buffer) and their EWMA, for p50/p99 on the dashboard."""

    __slots__ = ("ewma", "samples")

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        self.samples: deque[float] = deque(maxlen=size)
        self.ewma: float | None = None

    def observe(self, value: float) -> None:
        self.samples.append(value)
        ewma = self.ewma
        self.ewma = value if ewma is None else ewma + EWMA_ALPHA * (value - ewma)

    def percentiles(self, *quantiles: float) -> list[float | None]:
        """Nearest-rank percentiles (``0.5`` → p50) of the window; None while it is empty."""
        if not self.samples:
            return [None for _ in quantiles]
        ordered = sorted(self.samples)
        n = len(ordered)
        return [ordered[min(n, max(1, math.ceil(q * n))) - 1] for q in quantiles]

    @classmethod
    def merged(cls, windows: Iterable[LatencyWindow]) -> LatencyWindow:
        """One window holding every sample of ``windows`` (several workers' views of a server);
        the EWMA is the sample-weighted mean of theirs."""
        windows = list(windows)
        result = cls(sum(w.samples.maxlen or 0 for w in windows) or WINDOW_SIZE)
        weighted = 0.0
        weight = 0
        for window in windows:
            result.samples.extend(window.samples)
            if window.ewma is not None:
                weighted += window.ewma * len(window.samples)
                weight += len(window.samples)
        result.ewma = weighted / weight if weight else None
        return result


class RouteStats:
    """What the records of one route (= one upstream pool) add up to."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "cache",
        "duration",
        "requests",
        "retries",
        "servers",
    )

    def __init__(self) -> None:
        # (server address or "-", status class) → requests
        self.requests: dict[tuple[str, str], int] = {}
        self.duration = Histogram()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.retries = 0
        # cache_result() → requests
        self.cache: dict[str, int] = {}
        self.servers: dict[str, ServerStats] = {}


class ServerStats:
    """Upstream response times of one server of one pool, from the records that ended there."""

    __slots__ = ("duration", "responses", "window")

    def __init__(self) -> None:
        self.duration = Histogram()
        self.window = LatencyWindow()
        # status class → responses the record ended with while this server was the upstream
        self.responses: dict[str, int] = {}


class ProxyStats:
    """Totals of every finished request; ``observe`` is a ``Pipeline.record_observers`` entry."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.requests = 0

    def observe(self, record: AccessRecord) -> None:
        """File one finished request. Label values come from configuration (route names,
        server addresses) or small fixed sets, so the dicts stay bounded."""
        route = self.routes.get(record.route)
        if route is None:
            route = self.routes[record.route] = RouteStats()
        self.requests += 1
        klass = status_class(record.status)
        key = (record.upstream_addr, klass)
        route.requests[key] = route.requests.get(key, 0) + 1
        route.duration.observe(record.total_time)
        route.bytes_sent += record.bytes_sent
        route.bytes_received += record.bytes_received
        route.retries += record.retries
        if record.cache_status != "-":
            result = cache_result(record.cache_status)
            if result is not None:
                route.cache[result] = route.cache.get(result, 0) + 1
        if record.upstream_time is not None and record.upstream_addr != "-":
            server = route.servers.get(record.upstream_addr)
            if server is None:
                server = route.servers[record.upstream_addr] = ServerStats()
            server.duration.observe(record.upstream_time)
            server.window.observe(record.upstream_time)
            server.responses[klass] = server.responses.get(klass, 0) + 1

    def server(self, route: str, address: str) -> ServerStats | None:
        stats = self.routes.get(route)
        return None if stats is None else stats.servers.get(address)

    def cache_results(self) -> dict[str, int]:
        """Requests per cache result over every route."""
        totals: dict[str, int] = {}
        for route in self.routes.values():
            for result, count in route.cache.items():
                totals[result] = totals.get(result, 0) + count
        return totals


# --------------------------------------------------------------------------- across workers
# A worker's figures travel as JSON (``ProxyStats.to_dict``) to the process serving the admin
# API, which merges them with its own (``ProxyStats.merged``): see ``pibl.admin.cluster``.


def _histogram_to_dict(histogram: Histogram) -> dict[str, Any]:
    return {
        "bounds": list(histogram.bounds),
        "counts": list(histogram.counts),
        "sum": histogram.sum,
        "count": histogram.count,
    }


def _histogram_from_dict(data: dict[str, Any]) -> Histogram:
    histogram = Histogram(tuple(float(b) for b in data["bounds"]))
    histogram.counts = [int(c) for c in data["counts"]]
    histogram.sum = float(data["sum"])
    histogram.count = int(data["count"])
    return histogram


def stats_to_dict(stats: ProxyStats) -> dict[str, Any]:
    """``stats`` as JSON-ready data (:func:`stats_from_dict` reads it back)."""
    routes: dict[str, Any] = {}
    for name, route in stats.routes.items():
        routes[name] = {
            "requests": [[s, k, n] for (s, k), n in route.requests.items()],
            "duration": _histogram_to_dict(route.duration),
            "bytes_sent": route.bytes_sent,
            "bytes_received": route.bytes_received,
            "retries": route.retries,
            "cache": dict(route.cache),
            "servers": {
                address: {
                    "duration": _histogram_to_dict(server.duration),
                    "samples": list(server.window.samples),
                    "ewma": server.window.ewma,
                    "responses": dict(server.responses),
                }
                for address, server in route.servers.items()
            },
        }
    return {"requests": stats.requests, "routes": routes}


def stats_from_dict(data: dict[str, Any]) -> ProxyStats:
    stats = ProxyStats()
    stats.requests = int(data["requests"])
    for name, item in data["routes"].items():
        route = stats.routes[name] = RouteStats()
        route.requests = {(str(s), str(k)): int(n) for s, k, n in item["requests"]}
        route.duration = _histogram_from_dict(item["duration"])
        route.bytes_sent = int(item["bytes_sent"])
        route.bytes_received = int(item["bytes_received"])
        route.retries = int(item["retries"])
        route.cache = {str(k): int(n) for k, n in item["cache"].items()}
        for address, entry in item["servers"].items():
            server = route.servers[address] = ServerStats()
            server.duration = _histogram_from_dict(entry["duration"])
            server.window.samples.extend(float(v) for v in entry["samples"])
            server.window.ewma = None if entry["ewma"] is None else float(entry["ewma"])
            server.responses = {str(k): int(n) for k, n in entry["responses"].items()}
    return stats


def _add(into: dict[_K, int], other: dict[_K, int]) -> None:
    for key, count in other.items():
        into[key] = into.get(key, 0) + count


def merged_stats(parts: Iterable[ProxyStats]) -> ProxyStats:
    """One ProxyStats summing ``parts`` (several workers'); the parts are left as they are."""
    result = ProxyStats()
    for part in parts:
        result.requests += part.requests
        for name, other in part.routes.items():
            route = result.routes.get(name)
            if route is None:
                route = result.routes[name] = RouteStats()
            _add(route.requests, other.requests)
            route.duration.merge(other.duration)
            route.bytes_sent += other.bytes_sent
            route.bytes_received += other.bytes_received
            route.retries += other.retries
            _add(route.cache, other.cache)
            for address, theirs in other.servers.items():
                server = route.servers.get(address)
                if server is None:
                    server = route.servers[address] = ServerStats()
                    server.window = LatencyWindow.merged([theirs.window])
                else:
                    server.window = LatencyWindow.merged([server.window, theirs.window])
                server.duration.merge(theirs.duration)
                _add(server.responses, theirs.responses)
    return result
