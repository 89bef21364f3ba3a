"""``GET /metrics``: PIBL's own counters in the Prometheus text format, read at scrape time.

A custom collector on a private ``CollectorRegistry`` (so nothing else a process imports leaks
into the page, and two proxies in one process — tests — stay apart). Nothing is counted through
``prometheus_client`` on the hot path: the pipeline's observer bumps plain ints
(:class:`~pibl.admin.stats.ProxyStats`), and ``collect()`` turns those and the live upstream,
pool and cache objects into metric families when Prometheus asks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pibl import __version__
from pibl.admin.stats import Histogram, ProxyStats
from pibl.admin.status import Peers, is_selectable

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from pibl.server.app import ProxyApp

__all__ = ["CONTENT_TYPE", "METRIC_NAMES", "PiblCollector", "make_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every family this collector exposes (counters without their ``_total`` suffix), for the docs.
METRIC_NAMES = (
    "pibl_build_info",
    "pibl_uptime_seconds",
    "pibl_workers",
    "pibl_downstream_connections",
    "pibl_tunnels_open",
    "pibl_tunnels",
    "pibl_requests",
    "pibl_request_duration_seconds",
    "pibl_sent_bytes",
    "pibl_received_bytes",
    "pibl_retries",
    "pibl_upstream_response_duration_seconds",
    "pibl_upstream_in_flight",
    "pibl_upstream_up",
    "pibl_upstream_healthy",
    "pibl_upstream_drained",
    "pibl_upstream_weight",
    "pibl_upstream_attempts",
    "pibl_upstream_failures",
    "pibl_upstream_ejected",
    "pibl_upstream_ejections",
    "pibl_upstream_connections",
    "pibl_upstream_connects",
    "pibl_upstream_connection_reuses",
    "pibl_upstream_queued",
    "pibl_upstream_queue_rejections",
    "pibl_upstream_panic",
    "pibl_cache_requests",
    "pibl_cache_hits",
    "pibl_cache_misses",
    "pibl_cache_stale",
    "pibl_cache_revalidations",
    "pibl_cache_entries",
    "pibl_cache_stored_bytes",
    "pibl_cache_evictions",
)


def _histogram(
    name: str, doc: str, labels: list[str], items: list[tuple[list[str], Histogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, histogram in items:
        family.add_metric(values, histogram.cumulative(), histogram.sum)
    return family


class PiblCollector(Collector):
    """Reads ``app`` and ``stats`` on every scrape; ``uptime`` gives seconds since start.

    With several workers the admin API sets ``stats`` to every worker's statistics merged and
    ``peers`` to the other workers' live figures before each scrape: counters and gauges sum.
    """

    def __init__(self, app: ProxyApp, stats: ProxyStats, uptime: Callable[[], float]) -> None:
        self.app = app
        self.stats = stats
        self.uptime = uptime
        self.peers = Peers()

    def collect(self) -> Iterator[Metric]:
        yield from self._process()
        yield from self._requests()
        yield from self._upstreams()
        yield from self._cache()

    def _process(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("pibl_build_info", "PIBL version (always 1)", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "pibl_uptime_seconds", "Seconds since the proxy started", value=self.uptime()
        )
        yield GaugeMetricFamily(
            "pibl_workers", "Worker processes serving requests", value=self.peers.workers
        )
        yield GaugeMetricFamily(
            "pibl_downstream_connections",
            "Open client connections",
            value=len(self.app.connections) + self.peers.connections,
        )
        yield GaugeMetricFamily(
            "pibl_tunnels_open",
            "Open tunnels after 101 Switching Protocols (WebSocket and other upgrades)",
            value=self.app.tunnels_open + self.peers.tunnels_open,
        )
        yield CounterMetricFamily(
            "pibl_tunnels",
            "Tunnels opened after 101 Switching Protocols",
            value=self.app.tunnels_total + self.peers.tunnels_total,
        )

    def _requests(self) -> Iterator[Metric]:
        routes = sorted(self.stats.routes.items())
        requests = CounterMetricFamily(
            "pibl_requests",
            "Finished requests by route, upstream server ('-' when none) and status class",
            labels=["route", "server", "status_class"],
        )
        sent = CounterMetricFamily(
            "pibl_sent_bytes", "Response body bytes sent to clients", labels=["route"]
        )
        received = CounterMetricFamily(
            "pibl_received_bytes", "Request body bytes received from clients", labels=["route"]
        )
        retries = CounterMetricFamily(
            "pibl_retries",
            "Requests sent again to another server (as reported on access records)",
            labels=["route"],
        )
        for name, route in routes:
            for (server, klass), count in sorted(route.requests.items()):
                requests.add_metric([name, server, klass], count)
            sent.add_metric([name], route.bytes_sent)
            received.add_metric([name], route.bytes_received)
            retries.add_metric([name], route.retries)
        yield requests
        yield _histogram(
            "pibl_request_duration_seconds",
            "Time from the request head to the end of the response",
            ["route"],
            [([name], route.duration) for name, route in routes],
        )
        yield sent
        yield received
        yield retries
        yield _histogram(
            "pibl_upstream_response_duration_seconds",
            "Time from choosing an upstream server to the end of its response",
            ["pool", "server"],
            [
                ([name, address], server.duration)
                for name, route in routes
                for address, server in sorted(route.servers.items())
            ],
        )

    def _upstreams(self) -> Iterator[Metric]:
        labels = ["pool", "server"]
        gauges = {
            "in_flight": GaugeMetricFamily(
                "pibl_upstream_in_flight", "Requests in flight to the server", labels=labels
            ),
            "up": GaugeMetricFamily(
                "pibl_upstream_up",
                "1 when the server takes new requests (healthy, not ejected, not drained)",
                labels=labels,
            ),
            "healthy": GaugeMetricFamily(
                "pibl_upstream_healthy", "1 unless health checks marked it down", labels=labels
            ),
            "drained": GaugeMetricFamily(
                "pibl_upstream_drained", "1 when an operator drained the server", labels=labels
            ),
            "weight": GaugeMetricFamily(
                "pibl_upstream_weight", "Current balancing weight", labels=labels
            ),
            "ejected": GaugeMetricFamily(
                "pibl_upstream_ejected",
                "1 while passive health checking keeps the server out",
                labels=labels,
            ),
            "ejections": GaugeMetricFamily(
                "pibl_upstream_ejections",
                "Ejections in a row (sets the next ejection's length; 0 after a good period)",
                labels=labels,
            ),
        }
        counters = {
            "attempts": CounterMetricFamily(
                "pibl_upstream_attempts",
                "Attempts sent to the server, retries included",
                labels=labels,
            ),
            "failures": CounterMetricFamily(
                "pibl_upstream_failures",
                "Attempts that failed: refused, reset, timed out, invalid response",
                labels=labels,
            ),
            "connects": CounterMetricFamily(
                "pibl_upstream_connects", "New connections opened to the server", labels=labels
            ),
            "reuses": CounterMetricFamily(
                "pibl_upstream_connection_reuses",
                "Requests sent on a pooled keep-alive connection",
                labels=labels,
            ),
        }
        connections = GaugeMetricFamily(
            "pibl_upstream_connections",
            "Connections to the server by state (active: in use, idle: pooled)",
            labels=[*labels, "state"],
        )
        for group in self.app.groups.values():
            for upstream in group.upstreams:
                values = [group.name, upstream.key]
                extra = self.peers.server(group.name, upstream.key)
                drained = bool(getattr(upstream, "drained", False))
                healthy = bool(upstream.is_available) and bool(
                    getattr(upstream, "is_healthy", True)
                )
                gauges["in_flight"].add_metric(
                    values, upstream.in_flight + extra.get("in_flight", 0)
                )
                gauges["up"].add_metric(values, int(is_selectable(upstream)))
                gauges["healthy"].add_metric(values, int(healthy))
                gauges["drained"].add_metric(values, int(drained))
                gauges["weight"].add_metric(values, upstream.weight)
                counters["attempts"].add_metric(
                    values, upstream.requests + extra.get("requests", 0)
                )
                counters["failures"].add_metric(values, upstream.errors + extra.get("errors", 0))
                gauges["ejected"].add_metric(values, int(bool(getattr(upstream, "is_ejected", 0))))
                gauges["ejections"].add_metric(values, getattr(upstream, "ejections", 0) or 0)
                pool = group.pools.get(upstream.key)
                if pool is not None:
                    active = pool.active + extra.get("active", 0)
                    connections.add_metric([*values, "active"], active)
                    connections.add_metric([*values, "idle"], pool.idle + extra.get("idle", 0))
                    connects = pool.connects + extra.get("connects", 0)
                    counters["connects"].add_metric(values, connects)
                    counters["reuses"].add_metric(values, pool.reuses + extra.get("reuses", 0))
        queued = GaugeMetricFamily(
            "pibl_upstream_queued", "Requests waiting for a connection slot", labels=["pool"]
        )
        rejected = CounterMetricFamily(
            "pibl_upstream_queue_rejections",
            "Requests answered 503 because the queue was full or the wait ran out",
            labels=["pool"],
        )
        panic = GaugeMetricFamily(
            "pibl_upstream_panic",
            "1 while no server of the pool is usable and all of them are tried",
            labels=["pool"],
        )
        for group in self.app.groups.values():
            extra = self.peers.pool(group.name)
            queued.add_metric([group.name], getattr(group, "queued", 0) + extra.get("queued", 0))
            rejected.add_metric(
                [group.name], getattr(group, "rejected", 0) + extra.get("rejected", 0)
            )
            panic.add_metric([group.name], int(bool(getattr(group, "in_panic", False))))
        yield from gauges.values()
        yield from counters.values()
        yield connections
        yield queued
        yield rejected
        yield panic

    def _cache(self) -> Iterator[Metric]:
        results = CounterMetricFamily(
            "pibl_cache_requests",
            "Requests on cached routes by what the cache did "
            "(hit, stale, revalidated, miss, bypass)",
            labels=["result"],
        )
        for result, count in sorted(self.stats.cache_results().items()):
            results.add_metric([result], count)
        yield results
        cache = self.app.cache
        if cache is None:
            return
        extra = self.peers.cache
        yield CounterMetricFamily(
            "pibl_cache_hits", "Fresh cache hits", value=cache.hits + extra.get("hits", 0)
        )
        yield CounterMetricFamily(
            "pibl_cache_misses", "Cache lookups forwarded", cache.misses + extra.get("misses", 0)
        )
        yield CounterMetricFamily(
            "pibl_cache_stale", "Stale responses served", cache.stale + extra.get("stale", 0)
        )
        yield CounterMetricFamily(
            "pibl_cache_revalidations",
            "Stored responses refreshed by a 304",
            cache.revalidations + extra.get("revalidations", 0),
        )
        storage = {
            what: cache.storage.stats().get(what, 0) + extra.get(what, 0)
            for what in ("entries", "bytes", "evictions")
        }
        yield GaugeMetricFamily(
            "pibl_cache_entries", "Responses stored", value=storage.get("entries", 0)
        )
        yield GaugeMetricFamily(
            "pibl_cache_stored_bytes", "Bytes stored in the cache", value=storage.get("bytes", 0)
        )
        yield CounterMetricFamily(
            "pibl_cache_evictions", "Entries evicted to make room", storage.get("evictions", 0)
        )


def make_registry(collector: PiblCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The exposition text (format 0.0.4) of ``registry``."""
    return generate_latest(registry)
