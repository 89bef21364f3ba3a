"""The Prometheus collector: families, names and values read from the proxy at scrape time."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pibl import __version__
from pibl.accesslog import AccessRecord
from pibl.admin.metrics import METRIC_NAMES, PiblCollector, make_registry, render
from pibl.admin.stats import LATENCY_BUCKETS, ProxyStats
from pibl.balancer.upstream import Address
from pibl.config import Settings
from pibl.server.app import ProxyApp
from tests.support import make_settings

SERVERS = [Address("127.0.0.1", 9001), Address("127.0.0.1", 9002)]
A, B = (str(s) for s in SERVERS)


def scrape(app: ProxyApp, stats: ProxyStats) -> dict[str, list[Sample]]:
    registry = make_registry(PiblCollector(app, stats, lambda: 42.0))
    text = render(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def record(
    upstream: str, status: int, upstream_time: float | None, cache: str = "-"
) -> AccessRecord:
    rec = AccessRecord()
    rec.route = "app"
    rec.upstream_addr = upstream
    rec.status = status
    rec.upstream_time = upstream_time
    rec.total_time = (upstream_time or 0) + 0.001
    rec.bytes_sent = 100
    rec.bytes_received = 7
    rec.cache_status = cache
    return rec


def proxy(settings: Settings | None = None) -> tuple[ProxyApp, ProxyStats]:
    return ProxyApp(settings or make_settings(SERVERS)), ProxyStats()


def test_every_family_is_named_pibl_and_listed() -> None:
    app, stats = proxy(make_settings(SERVERS, cache={"enabled": True}))
    stats.observe(record(A, 200, 0.002, "pibl; hit; ttl=3"))
    families = scrape(app, stats)
    assert all(name.startswith("pibl_") for name in families)
    assert set(families) == set(METRIC_NAMES)


def test_request_counters_and_histograms() -> None:
    app, stats = proxy()
    for _ in range(3):
        stats.observe(record(A, 200, 0.002))
    stats.observe(record(B, 502, 0.3))
    stats.observe(record("-", 503, None))
    families = scrape(app, stats)
    requests = families["pibl_requests"]
    total = "pibl_requests_total"
    assert value(requests, total, route="app", server=A, status_class="2xx") == 3
    assert value(requests, total, route="app", server=B, status_class="5xx") == 1
    assert value(requests, total, route="app", server="-", status_class="5xx") == 1
    assert value(families["pibl_sent_bytes"], "pibl_sent_bytes_total", route="app") == 500
    assert value(families["pibl_received_bytes"], "pibl_received_bytes_total", route="app") == 35
    duration = families["pibl_request_duration_seconds"]
    count = "pibl_request_duration_seconds_count"
    assert value(duration, count, route="app") == 5
    buckets = [s for s in duration if s.name.endswith("_bucket")]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    upstream = families["pibl_upstream_response_duration_seconds"]
    bucket = "pibl_upstream_response_duration_seconds_bucket"
    assert value(upstream, bucket, pool="app", server=A, le="0.0025") == 3
    assert value(upstream, bucket, pool="app", server=B, le="0.25") == 0
    assert value(upstream, bucket, pool="app", server=B, le="0.5") == 1
    assert value(upstream, bucket, pool="app", server=B, le="+Inf") == 1


def test_upstream_state_is_read_live() -> None:
    app, stats = proxy()
    first, second = app.groups["app"].upstreams
    first.drained = True
    first.weight = 7
    first.in_flight = 2
    first.requests, first.errors = 10, 4
    second.is_available = False
    families = scrape(app, stats)
    for name, expected_a, expected_b in [
        ("pibl_upstream_up", 0, 0),
        ("pibl_upstream_drained", 1, 0),
        ("pibl_upstream_healthy", 1, 0),
        ("pibl_upstream_weight", 7, 1),
        ("pibl_upstream_in_flight", 2, 0),
        ("pibl_upstream_ejected", 0, 0),
    ]:
        assert value(families[name], name, pool="app", server=A) == expected_a, name
        assert value(families[name], name, pool="app", server=B) == expected_b, name
    attempts = families["pibl_upstream_attempts"]
    assert value(attempts, "pibl_upstream_attempts_total", pool="app", server=A) == 10
    failures = families["pibl_upstream_failures"]
    assert value(failures, "pibl_upstream_failures_total", pool="app", server=A) == 4
    connections = families["pibl_upstream_connections"]
    for state in ("active", "idle"):
        name = "pibl_upstream_connections"
        assert value(connections, name, pool="app", server=A, state=state) == 0
    assert value(families["pibl_upstream_queued"], "pibl_upstream_queued", pool="app") == 0
    assert value(families["pibl_uptime_seconds"], "pibl_uptime_seconds") == 42.0
    assert value(families["pibl_build_info"], "pibl_build_info", version=__version__) == 1


def test_cache_families_follow_the_cache_counters() -> None:
    app, stats = proxy(make_settings(SERVERS, cache={"enabled": True}))
    cache = app.cache
    assert cache is not None
    cache.hits, cache.misses, cache.stale, cache.revalidations = 5, 4, 3, 2
    for status in ("pibl; hit; ttl=1", "pibl; hit; ttl=1", "pibl; fwd=uri-miss; stored"):
        stats.observe(record(A, 200, 0.001, status))
    families = scrape(app, stats)
    for name, expected in [
        ("pibl_cache_hits", 5),
        ("pibl_cache_misses", 4),
        ("pibl_cache_stale", 3),
        ("pibl_cache_revalidations", 2),
        ("pibl_cache_evictions", 0),
    ]:
        assert value(families[name], name + "_total") == expected
    assert value(families["pibl_cache_entries"], "pibl_cache_entries") == 0
    assert value(families["pibl_cache_stored_bytes"], "pibl_cache_stored_bytes") == 0
    results = families["pibl_cache_requests"]
    assert value(results, "pibl_cache_requests_total", result="hit") == 2
    assert value(results, "pibl_cache_requests_total", result="miss") == 1


def test_without_a_cache_only_record_based_cache_results_remain() -> None:
    app, stats = proxy()
    families = scrape(app, stats)
    assert "pibl_cache_hits" not in families
    assert families["pibl_cache_requests"] == []


def test_an_idle_proxy_still_exposes_its_servers() -> None:
    app, stats = proxy()
    families = scrape(app, stats)
    assert families["pibl_requests"] == []
    up = families["pibl_upstream_up"]
    assert {s.labels["server"] for s in up} == {A, B}
