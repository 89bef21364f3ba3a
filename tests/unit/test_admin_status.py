"""The documents behind /api/status: server state, health fields read generically, totals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pibl.accesslog import AccessRecord
from pibl.admin.stats import ProxyStats
from pibl.admin.status import app_status, cache_stats, health_fields, upstream_state
from pibl.balancer.upstream import Address, Upstream
from pibl.server.app import ProxyApp
from tests.support import make_settings


class BareUpstream:
    """An upstream with only the fields PIBL started with: no health or ejection state."""

    __slots__ = ("address", "errors", "in_flight", "is_available", "key", "requests", "weight")

    def __init__(self) -> None:
        self.address = Address("127.0.0.1", 1)
        self.key = "127.0.0.1:1"
        self.weight = 1
        self.in_flight = self.requests = self.errors = 0
        self.is_available = True


@dataclass
class Checks:
    is_up: bool = True
    failures: int = 0
    last_result: str = "200 OK"
    history: tuple[int, ...] = ()  # not a scalar: left out


class RicherUpstream(BareUpstream):
    """Fields another balancer version might add, under names this module does not know."""

    __slots__ = ("drained", "flaps", "note")

    def __init__(self) -> None:
        super().__init__()
        self.key = "127.0.0.1:2"
        self.weight = 1
        self.in_flight = self.requests = self.errors = 0
        self.is_available = True
        self.drained = False
        self.flaps = 3
        self.note = "maintenance window"

    @property
    def score(self) -> float:
        return float("nan")  # not JSON: shown as null


def test_health_fields_of_an_upstream_without_health_state() -> None:
    bare: Any = BareUpstream()
    assert health_fields(bare) == {"is_available": True}
    assert upstream_state(bare) == "up"
    bare.is_available = False
    assert upstream_state(bare) == "down"


def test_health_fields_pick_up_new_attributes_and_state_objects() -> None:
    upstream = RicherUpstream()
    fields = health_fields(upstream)
    assert fields["is_available"] is True
    assert fields["flaps"] == 3
    assert fields["note"] == "maintenance window"
    assert fields["score"] is None
    for core in ("weight", "in_flight", "requests", "errors", "drained", "key", "address"):
        assert core not in fields


def test_health_fields_of_the_real_upstream_include_its_properties() -> None:
    # Upstream is compiled (mypyc): its attributes and properties are getset descriptors, not
    # slots or Python properties, and must still be found.
    upstream = Upstream(Address("127.0.0.1", 2))
    fields = health_fields(upstream)
    assert fields["is_ejected"] is False
    assert fields["ejected_until"] is None
    assert fields["consecutive_failures"] == 0
    assert fields["health"]["is_up"] is True
    for core in ("weight", "in_flight", "requests", "errors", "drained", "key", "address"):
        assert core not in fields


def test_health_fields_read_one_level_of_state_objects() -> None:
    class WithChecks:
        is_available = True
        health = Checks(is_up=False, failures=4)

    fields = health_fields(WithChecks())  # type: ignore[arg-type]
    assert fields == {
        "is_available": True,
        "health": {"is_up": False, "failures": 4, "last_result": "200 OK"},
    }


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "up"),
        ({"drained": True}, "drained"),
        ({"drained": True, "is_available": False}, "drained"),
        ({"is_available": False}, "down"),
    ],
)
def test_upstream_state(changes: dict[str, Any], expected: str) -> None:
    upstream = Upstream(Address("127.0.0.1", 1))
    for name, value in changes.items():
        setattr(upstream, name, value)
    assert upstream_state(upstream) == expected


def test_upstream_state_reads_health_and_ejection_when_present() -> None:
    class Checked:
        is_available = True
        drained = False
        is_healthy = False
        is_ejected = False

    assert upstream_state(Checked()) == "down"  # type: ignore[arg-type]
    Checked.is_healthy = True
    Checked.is_ejected = True
    assert upstream_state(Checked()) == "ejected"  # type: ignore[arg-type]


def test_app_status_totals() -> None:
    app = ProxyApp(make_settings([Address("127.0.0.1", 9001)], cache={"enabled": True}))
    stats = ProxyStats()
    for status in (200, 200, 502, 404):
        rec = AccessRecord()
        rec.route, rec.status, rec.bytes_sent, rec.bytes_received = "app", status, 10, 1
        stats.observe(rec)
    app.groups["app"].upstreams[0].in_flight = 2
    data = app_status(app, stats, uptime=3.0)
    assert (data["requests"], data["errors"]) == (4, 1)
    assert (data["bytes_sent"], data["bytes_received"]) == (40, 4)
    assert data["in_flight"] == 2
    assert data["connections"] == 0
    assert data["cache"]["hit_ratio"] is None  # no lookups yet


def test_cache_hit_ratio_counts_stale_answers_as_hits() -> None:
    app = ProxyApp(make_settings([Address("127.0.0.1", 9001)], cache={"enabled": True}))
    cache = app.cache
    assert cache is not None
    cache.hits, cache.stale, cache.misses = 2, 1, 1
    assert cache_stats(cache)["hit_ratio"] == 0.75
