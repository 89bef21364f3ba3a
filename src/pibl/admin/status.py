"""The admin API's documents, built from the live proxy: status, cache stats, redacted config.

Plain functions from the proxy's objects to JSON-ready dicts; no I/O, ``now`` passed in.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pibl import __version__
from pibl.admin.stats import ProxyStats
from pibl.balancer.upstream import Upstream
from pibl.config import settings_to_dict

if TYPE_CHECKING:
    from pibl.balancer.group import UpstreamGroup
    from pibl.proxy.caching import HttpCache
    from pibl.server.app import ProxyApp

__all__ = [
    "REDACTED",
    "Peers",
    "app_status",
    "cache_stats",
    "health_fields",
    "is_selectable",
    "pool_status",
    "redact",
    "redacted_config",
    "server_status",
    "upstream_state",
]

REDACTED: Final = "<redacted>"
# Keys whose values are secrets wherever they appear in the config.
_SECRET_KEYS: Final = frozenset({"token", "password", "secret", "api_key"})
# scheme://user:password@host → the password part (redis://:pw@host, rediss://u:pw@host).
_URL_PASSWORD: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:)([^/@]*)(@)")
# Upstream attributes shown as their own fields; any other attribute (health checks, outlier
# ejection, connection caps, ...) is listed under "health" as it is.
_CORE_FIELDS: Final = frozenset(
    {"address", "key", "weight", "in_flight", "requests", "errors", "is_available", "drained"}
)


@dataclass
class Peers:
    """The other workers' figures, summed, for the admin documents (empty with one worker)."""

    workers: int = 1
    processes: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    tunnels_open: int = 0
    tunnels_total: int = 0
    pools: dict[str, dict[str, int]] = field(default_factory=dict)
    servers: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    # (pool, server) → worker number → state as that worker sees it (several workers only)
    states: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)

    def server(self, pool: str, key: str) -> dict[str, int]:
        return self.servers.get((pool, key), {})

    def pool(self, pool: str) -> dict[str, int]:
        return self.pools.get(pool, {})

    def add(self, snapshot: dict[str, Any]) -> None:
        self.connections += int(snapshot["connections"])
        self.tunnels_open += int(snapshot["tunnels_open"])
        self.tunnels_total += int(snapshot["tunnels_total"])
        for name, pool in snapshot["pools"].items():
            totals = self.pools.setdefault(name, {})
            for what in ("queued", "rejected"):
                totals[what] = totals.get(what, 0) + int(pool[what])
            for key, figures in pool["servers"].items():
                server = self.servers.setdefault((name, key), {})
                for what, value in figures.items():
                    if what == "state":
                        self.states.setdefault((name, key), {})[str(snapshot["number"])] = value
                    else:
                        server[what] = server.get(what, 0) + int(value)
        for what, value in (snapshot["cache"] or {}).items():
            self.cache[what] = self.cache.get(what, 0) + int(value)


def redact(value: Any) -> Any:
    """A copy of config data with secrets replaced by ``"<redacted>"``: values of keys named
    like a secret, and passwords inside URLs."""
    if isinstance(value, Mapping):
        return {
            key: (REDACTED if key in _SECRET_KEYS and item else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + m.group(3), value, count=1)
    return value


def _json_scalar(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# How a class exposes its attributes: properties, slots (member descriptors) and, in classes
# compiled by mypyc, attributes and properties alike (getset descriptors).
_ATTRIBUTE_KINDS = (property, types.MemberDescriptorType, types.GetSetDescriptorType)


def _scalars(obj: Any) -> dict[str, Any]:
    """The public scalar attributes of ``obj``: slots, ``__dict__`` entries and properties."""
    names: set[str] = set(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names.update([slots] if isinstance(slots, str) else slots)
        names.update(name for name, attr in vars(cls).items() if isinstance(attr, _ATTRIBUTE_KINDS))
    result: dict[str, Any] = {}
    for name in sorted(names):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except Exception:  # a property that cannot answer right now
            continue
        if value is None or isinstance(value, bool | int | float | str):
            result[name] = _json_scalar(value)
    return result


def health_fields(upstream: Upstream) -> dict[str, Any]:
    """``is_available`` plus whatever health and ejection state the upstream carries, read
    generically (scalar attributes and properties, and one level of state objects such as
    active-check and outlier records), so new balancer fields show up without changes here."""
    fields: dict[str, Any] = {"is_available": bool(upstream.is_available)}
    for name, value in _scalars(upstream).items():
        if name not in _CORE_FIELDS:
            fields[name] = value
    for name in ("health", "outlier"):
        state = getattr(upstream, name, None)
        if state is not None and not isinstance(state, bool | int | float | str):
            fields[name] = _scalars(state)
    return fields


def upstream_state(upstream: Upstream) -> str:
    """One word for the dashboard: ``drained`` (by an operator), ``down`` (unavailable or
    failing its health checks), ``ejected`` (by passive detection) or ``up``."""
    if getattr(upstream, "drained", False):
        return "drained"
    if not upstream.is_available or not getattr(upstream, "is_healthy", True):
        return "down"
    if getattr(upstream, "is_ejected", False):
        return "ejected"
    return "up"


def is_selectable(upstream: Upstream) -> bool:
    """Whether the group may pick the server now (panic mode aside)."""
    return upstream_state(upstream) == "up"


def server_status(
    group: UpstreamGroup, upstream: Upstream, stats: ProxyStats, peers: Peers | None = None
) -> dict[str, Any]:
    """One server; with ``peers`` (several workers) its figures summed over all of them."""
    peers = peers or Peers()
    extra = peers.server(group.name, upstream.key)
    server = stats.server(group.name, upstream.key)
    ewma: float | None = None
    p50: float | None = None
    p99: float | None = None
    samples = 0
    responses: dict[str, int] = {}
    if server is not None:
        ewma = server.window.ewma
        p50, p99 = server.window.percentiles(0.5, 0.99)
        samples = len(server.window.samples)
        responses = dict(sorted(server.responses.items()))
    pool = group.pools.get(upstream.key)
    status: dict[str, Any] = {
        "address": upstream.key,
        "state": upstream_state(upstream),
        "available": is_selectable(upstream),
        "drained": bool(getattr(upstream, "drained", False)),
        "weight": upstream.weight,
        "health": health_fields(upstream),
        "in_flight": upstream.in_flight + extra.get("in_flight", 0),
        # Attempts sent to this server (retries included) and those that failed at the
        # transport level (refused, reset, timed out); responses count statuses it answered.
        "requests": upstream.requests + extra.get("requests", 0),
        "errors": upstream.errors + extra.get("errors", 0),
        "responses": responses,
        "latency": {"ewma": ewma, "p50": p50, "p99": p99, "samples": samples},
        "connections": {
            "active": (pool.active if pool is not None else 0) + extra.get("active", 0),
            "idle": (pool.idle if pool is not None else 0) + extra.get("idle", 0),
        },
    }
    states = peers.states.get((group.name, upstream.key))
    if states is not None:
        status["workers"] = states  # worker number → state as that worker sees it
    return status


def pool_status(
    group: UpstreamGroup, stats: ProxyStats, balance: str, peers: Peers | None = None
) -> dict[str, Any]:
    refresh = getattr(group, "refresh", None)
    if callable(refresh):
        refresh()  # end ejections whose period is over before showing them
    queued = (peers or Peers()).pool(group.name).get("queued", 0)
    return {
        "name": group.name,
        "balance": balance,
        "retries": group.retries,
        "queued": getattr(group, "queued", 0) + queued,
        "panic": bool(getattr(group, "in_panic", False)),
        "servers": [server_status(group, u, stats, peers) for u in group.upstreams],
    }


def cache_stats(cache: HttpCache, peers: Peers | None = None) -> dict[str, Any]:
    """The cache's figures; with ``peers``, summed over every worker (a shared disk or redis
    storage is then counted once per worker in ``entries`` and ``bytes``)."""
    storage = cache.storage.stats()
    extra = (peers or Peers()).cache
    hits = cache.hits + extra.get("hits", 0)
    stale = cache.stale + extra.get("stale", 0)
    misses = cache.misses + extra.get("misses", 0)
    served = hits + stale
    lookups = served + misses
    return {
        "storage": cache.storage.name,
        "entries": storage.get("entries", 0) + extra.get("entries", 0),
        "bytes": storage.get("bytes", 0) + extra.get("bytes", 0),
        "evictions": storage.get("evictions", 0) + extra.get("evictions", 0),
        "hits": hits,
        "misses": misses,
        "stale": stale,
        "revalidations": cache.revalidations + extra.get("revalidations", 0),
        # Requests answered from storage (fresh or stale) among those that looked it up.
        "hit_ratio": served / lookups if lookups else None,
    }


def app_status(
    app: ProxyApp, stats: ProxyStats, *, uptime: float, peers: Peers | None = None
) -> dict[str, Any]:
    """``GET /api/status``. With several workers, ``stats`` is every worker's statistics merged
    and ``peers`` the other workers' live figures (summed in), and ``processes`` lists them."""
    peers = peers or Peers()
    sent = sum(r.bytes_sent for r in stats.routes.values())
    received = sum(r.bytes_received for r in stats.routes.values())
    errors = sum(
        count
        for r in stats.routes.values()
        for (_server, klass), count in r.requests.items()
        if klass == "5xx"
    )
    status: dict[str, Any] = {
        "version": __version__,
        "uptime": uptime,
        "workers": peers.workers,
        "requests": stats.requests,
        "errors": errors,
        "bytes_sent": sent,
        "bytes_received": received,
        "connections": len(app.connections) + peers.connections,
        "in_flight": sum(u.in_flight for g in app.groups.values() for u in g.upstreams)
        + sum(s.get("in_flight", 0) for s in peers.servers.values()),
        "pools": [
            pool_status(group, stats, _balance_name(app, group.name), peers)
            for group in app.groups.values()
        ],
        "cache": cache_stats(app.cache, peers) if app.cache is not None else None,
    }
    if peers.processes:  # several workers: number, pid, uptime and requests of each
        status["processes"] = peers.processes
    return status


def _balance_name(app: ProxyApp, pool: str) -> str:
    settings = app.settings.upstreams.get(pool)
    return settings.balance if settings is not None else ""


def redacted_config(app: ProxyApp) -> dict[str, Any]:
    """``GET /api/config``: the effective settings with secrets redacted."""
    data: dict[str, Any] = redact(settings_to_dict(app.settings))
    return data
