"""The admin API's documents, built from the live proxy: status, cache stats, redacted config.

Plain functions from the proxy's objects to JSON-ready dicts; no I/O, ``now`` passed in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
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


def _scalars(obj: Any) -> dict[str, Any]:
    """The public scalar attributes of ``obj``: slots, ``__dict__`` entries and properties."""
    names: set[str] = set(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names.update([slots] if isinstance(slots, str) else slots)
        names.update(name for name, attr in vars(cls).items() if isinstance(attr, property))
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


def server_status(group: UpstreamGroup, upstream: Upstream, stats: ProxyStats) -> dict[str, Any]:
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
    return {
        "address": upstream.key,
        "state": upstream_state(upstream),
        "available": is_selectable(upstream),
        "drained": bool(getattr(upstream, "drained", False)),
        "weight": upstream.weight,
        "health": health_fields(upstream),
        "in_flight": upstream.in_flight,
        # Attempts sent to this server (retries included) and those that failed at the
        # transport level (refused, reset, timed out); responses count statuses it answered.
        "requests": upstream.requests,
        "errors": upstream.errors,
        "responses": responses,
        "latency": {"ewma": ewma, "p50": p50, "p99": p99, "samples": samples},
        "connections": {
            "active": pool.active if pool is not None else 0,
            "idle": pool.idle if pool is not None else 0,
        },
    }


def pool_status(group: UpstreamGroup, stats: ProxyStats, balance: str) -> dict[str, Any]:
    refresh = getattr(group, "refresh", None)
    if callable(refresh):
        refresh()  # end ejections whose period is over before showing them
    return {
        "name": group.name,
        "balance": balance,
        "retries": group.retries,
        "queued": getattr(group, "queued", 0),
        "panic": bool(getattr(group, "in_panic", False)),
        "servers": [server_status(group, u, stats) for u in group.upstreams],
    }


def cache_stats(cache: HttpCache) -> dict[str, Any]:
    storage = cache.storage.stats()
    served = cache.hits + cache.stale
    lookups = served + cache.misses
    return {
        "storage": cache.storage.name,
        "entries": storage.get("entries", 0),
        "bytes": storage.get("bytes", 0),
        "evictions": storage.get("evictions", 0),
        "hits": cache.hits,
        "misses": cache.misses,
        "stale": cache.stale,
        "revalidations": cache.revalidations,
        # Requests answered from storage (fresh or stale) among those that looked it up.
        "hit_ratio": served / lookups if lookups else None,
    }


def app_status(app: ProxyApp, stats: ProxyStats, *, uptime: float) -> dict[str, Any]:
    """``GET /api/status``. One worker today; every number is a counter or a gauge that sums
    over workers, and latency windows merge (``LatencyWindow.merged``)."""
    sent = sum(r.bytes_sent for r in stats.routes.values())
    received = sum(r.bytes_received for r in stats.routes.values())
    errors = sum(
        count
        for r in stats.routes.values()
        for (_server, klass), count in r.requests.items()
        if klass == "5xx"
    )
    return {
        "version": __version__,
        "uptime": uptime,
        "workers": 1,
        "requests": stats.requests,
        "errors": errors,
        "bytes_sent": sent,
        "bytes_received": received,
        "connections": len(app.connections),
        "in_flight": sum(u.in_flight for g in app.groups.values() for u in g.upstreams),
        "pools": [
            pool_status(group, stats, _balance_name(app, group.name))
            for group in app.groups.values()
        ],
        "cache": cache_stats(app.cache) if app.cache is not None else None,
    }


def _balance_name(app: ProxyApp, pool: str) -> str:
    settings = app.settings.upstreams.get(pool)
    return settings.balance if settings is not None else ""


def redacted_config(app: ProxyApp) -> dict[str, Any]:
    """``GET /api/config``: the effective settings with secrets redacted."""
    data: dict[str, Any] = redact(settings_to_dict(app.settings))
    return data
