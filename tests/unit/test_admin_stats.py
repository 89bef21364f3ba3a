"""Request statistics behind /api/status and /metrics: pure counting, no sockets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.accesslog import AccessRecord
from pibl.admin.stats import (
    LATENCY_BUCKETS,
    Histogram,
    LatencyWindow,
    ProxyStats,
    cache_result,
    status_class,
)


def record(
    route: str = "app",
    upstream: str = "127.0.0.1:9001",
    status: int = 200,
    upstream_time: float | None = 0.01,
    total_time: float = 0.02,
    cache_status: str = "-",
    sent: int = 10,
    received: int = 3,
) -> AccessRecord:
    rec = AccessRecord()
    rec.route = route
    rec.upstream_addr = upstream
    rec.status = status
    rec.upstream_time = upstream_time
    rec.total_time = total_time
    rec.cache_status = cache_status
    rec.bytes_sent = sent
    rec.bytes_received = received
    return rec


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0, "other"),
        (99, "other"),
        (100, "1xx"),
        (204, "2xx"),
        (304, "3xx"),
        (404, "4xx"),
        (499, "4xx"),
        (503, "5xx"),
        (599, "5xx"),
        (600, "other"),
    ],
)
def test_status_class(status: int, expected: str) -> None:
    assert status_class(status) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-", None),
        ("", None),
        ("pibl; hit; ttl=42", "hit"),
        ("pibl; hit; ttl=-3; detail=stale-while-revalidate", "stale"),
        ("pibl; hit; fwd=stale; detail=stale-if-error", "stale"),
        ("pibl; hit; fwd=stale; fwd-status=500; detail=stale-if-error", "stale"),
        ("pibl; fwd=stale; fwd-status=304", "revalidated"),
        ("pibl; fwd=stale; fwd-status=200; stored", "miss"),
        ("pibl; fwd=uri-miss; stored", "miss"),
        ("pibl; fwd=vary-miss", "miss"),
        ("pibl; fwd=method; fwd-status=200", "bypass"),
        ("pibl; fwd=request; stored", "bypass"),
    ],
)
def test_cache_result_reads_cache_status(value: str, expected: str | None) -> None:
    assert cache_result(value) == expected


def test_histogram_counts_values_on_a_bound_in_that_bucket() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1]
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert histogram.count == 5
    assert histogram.sum == pytest.approx(8.65)


def test_histograms_merge_by_adding_and_refuse_other_buckets() -> None:
    a, b = Histogram(), Histogram()
    a.observe(0.003)
    b.observe(0.003)
    b.observe(100.0)
    a.merge(b)
    assert a.count == 3
    assert a.cumulative()[-1] == ("+Inf", 3)
    assert a.cumulative()[0] == ("0.001", 0)
    with pytest.raises(ValueError, match="different buckets"):
        a.merge(Histogram((1.0,)))


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=50))
def test_histogram_cumulative_is_monotonic_and_ends_at_count(values: list[float]) -> None:
    histogram = Histogram()
    for value in values:
        histogram.observe(value)
    counts = [count for _, count in histogram.cumulative()]
    assert counts == sorted(counts)
    assert counts[-1] == len(values)
    assert len(counts) == len(LATENCY_BUCKETS) + 1


def test_latency_window_percentiles_are_nearest_rank() -> None:
    window = LatencyWindow()
    assert window.percentiles(0.5, 0.99) == [None, None]
    assert window.ewma is None
    for ms in range(1, 101):  # 1..100 ms, in order
        window.observe(ms / 1000)
    p50, p99, p100 = window.percentiles(0.5, 0.99, 1.0)
    assert (p50, p99, p100) == (0.05, 0.099, 0.1)
    assert window.percentiles(0.0) == [0.001]


def test_latency_window_is_bounded_and_keeps_the_newest() -> None:
    window = LatencyWindow(size=4)
    for value in (9.0, 9.0, 1.0, 2.0, 3.0, 4.0):
        window.observe(value)
    assert list(window.samples) == [1.0, 2.0, 3.0, 4.0]
    assert window.percentiles(1.0) == [4.0]


def test_latency_ewma_follows_recent_values() -> None:
    window = LatencyWindow()
    window.observe(1.0)
    assert window.ewma == 1.0
    for _ in range(100):
        window.observe(0.0)
    assert window.ewma is not None
    assert window.ewma < 0.001


def test_latency_windows_merge_for_several_workers() -> None:
    a, b = LatencyWindow(size=3), LatencyWindow(size=3)
    for value in (1.0, 2.0, 3.0):
        a.observe(value)
    b.observe(10.0)
    merged = LatencyWindow.merged([a, b])
    assert sorted(merged.samples) == [1.0, 2.0, 3.0, 10.0]
    assert merged.percentiles(1.0) == [10.0]
    assert a.ewma is not None
    assert b.ewma is not None
    assert merged.ewma == pytest.approx((a.ewma * 3 + b.ewma * 1) / 4)
    assert LatencyWindow.merged([]).ewma is None


def test_proxy_stats_counts_per_route_server_and_status_class() -> None:
    stats = ProxyStats()
    stats.observe(record())
    stats.observe(record(upstream_time=0.03))
    stats.observe(record(upstream="127.0.0.1:9002", status=502, upstream_time=0.5))
    stats.observe(record(upstream="-", status=503, upstream_time=None))
    stats.observe(record(route="", upstream="-", status=404, upstream_time=None, sent=0))
    assert stats.requests == 5
    app = stats.routes["app"]
    assert app.requests == {
        ("127.0.0.1:9001", "2xx"): 2,
        ("127.0.0.1:9002", "5xx"): 1,
        ("-", "5xx"): 1,
    }
    assert stats.routes[""].requests == {("-", "4xx"): 1}
    assert app.bytes_sent == 40
    assert app.bytes_received == 12
    assert app.duration.count == 4
    assert sorted(app.servers) == ["127.0.0.1:9001", "127.0.0.1:9002"]  # "-" has no latency
    first = stats.server("app", "127.0.0.1:9001")
    assert first is not None
    assert list(first.window.samples) == [0.01, 0.03]
    assert first.duration.count == 2
    assert first.responses == {"2xx": 2}
    assert stats.server("app", "nowhere") is None
    assert stats.server("nowhere", "127.0.0.1:9001") is None


def test_proxy_stats_counts_cache_results() -> None:
    stats = ProxyStats()
    for value in ("pibl; hit; ttl=5", "pibl; hit; ttl=1", "pibl; fwd=uri-miss; stored", "-"):
        stats.observe(record(cache_status=value))
    stats.observe(record(route="other", cache_status="pibl; fwd=stale; fwd-status=304"))
    assert stats.cache_results() == {"hit": 2, "miss": 1, "revalidated": 1}


def test_proxy_stats_sums_the_retries_of_records() -> None:
    stats = ProxyStats()
    rec = AccessRecord()
    rec.route = "app"
    rec.retries = 2
    stats.observe(rec)
    stats.observe(record())  # a record without retries adds none
    assert stats.routes["app"].retries == 2


def test_non_finite_times_do_not_break_the_histogram() -> None:
    histogram = Histogram()
    histogram.observe(math.inf)
    assert histogram.cumulative()[-1] == ("+Inf", 1)
