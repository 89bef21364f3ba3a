"""The admin API: routing, authentication and the handlers behind each endpoint.

``AdminApi.handle`` takes a parsed :class:`~pibl.admin.http.AdminRequest` and returns the
response; it does no socket I/O itself, so tests can call it directly.

Security: with a ``token`` configured, every API call and ``/metrics`` needs
``Authorization: Bearer <token>`` (compared in constant time). The dashboard's static files are
public: they hold no data, and a browser cannot attach a header to a page load. Requests a
browser sends on behalf of another site are refused (an ``Origin`` that is not this listener),
and a loopback listener without a token only answers ``Host: localhost``/loopback names, so a
DNS-rebinding page cannot reach it either.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import mimetypes
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from pibl.admin.cluster import ClusterNode, apply_command
from pibl.admin.http import AdminRequest, AdminResponse, error, json_response, split_path
from pibl.admin.metrics import CONTENT_TYPE, PiblCollector, make_registry, render
from pibl.admin.stats import ProxyStats
from pibl.admin.status import Peers, app_status, cache_stats, redacted_config, server_status
from pibl.balancer.upstream import Upstream
from pibl.cache.key import key_from_url
from pibl.config import parse_address

if TYPE_CHECKING:
    from pibl.balancer.group import UpstreamGroup
    from pibl.server.app import ProxyApp

__all__ = ["MAX_WEIGHT", "AdminApi", "is_loopback_host", "load_static"]

log = logging.getLogger("pibl.admin")

MAX_WEIGHT: Final = 1000
_STATIC_PACKAGE: Final = "pibl.admin"
# The dashboard loads only its own files and talks only to this listener.
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS: Final = [
    ("Content-Security-Policy", _CSP),
    ("Referrer-Policy", "no-referrer"),  # the page URL may carry ?token=
    ("X-Frame-Options", "DENY"),
]

Params = Sequence[str]
Handler = Callable[["AdminApi", AdminRequest, Params], Awaitable[AdminResponse]]


def load_static() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files shipped in the package: name → (content, content type)."""
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files(_STATIC_PACKAGE).joinpath("static")
    for entry in root.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind in ("application/javascript", "image/svg+xml"):
                kind += "; charset=utf-8"
            files[entry.name] = (entry.read_bytes(), kind)
    return files


def is_loopback_host(host_header: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminApi:
    """Answers admin requests for one running proxy."""

    def __init__(
        self,
        app: ProxyApp,
        stats: ProxyStats,
        *,
        token: str | None,
        uptime: Callable[[], float],
        loopback: bool = True,
        static: dict[str, tuple[bytes, str]] | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        self.app = app
        self.stats = stats
        self.token = token
        self.uptime = uptime
        self.loopback = loopback
        self.static = load_static() if static is None else static
        self.collector = PiblCollector(app, stats, uptime)
        self.registry = make_registry(self.collector)
        # Several workers: figures merged from every worker, actions sent to every worker.
        self.cluster = cluster

    async def handle(self, request: AdminRequest) -> AdminResponse:
        segments = split_path(request.path)
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        method = "GET" if request.method == "HEAD" else request.method
        if not segments or segments[0] == "static":
            return self._static(method, segments)
        if self.token is not None and not self._authorized(request):
            return error(
                401,
                "missing or wrong bearer token",
                [("WWW-Authenticate", 'Bearer realm="pibl-admin"')],
            )
        for pattern, methods in _ROUTES:
            params = _match(pattern, segments)
            if params is None:
                continue
            handler = methods.get(method)
            if handler is None:
                allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
                return error(
                    405,
                    f"{request.method} is not allowed here; use {', '.join(allowed)}",
                    [("Allow", ", ".join(allowed))],
                )
            return await handler(self, request, params)
        return error(404, f"no such endpoint: {request.path}")

    # -- guards -------------------------------------------------------------------------------
    def _refusal(self, request: AdminRequest) -> AdminResponse | None:
        host = request.header("host") or ""
        origin = request.header("origin")
        if origin is not None and origin.lower() != f"http://{host}".lower():
            return error(403, "cross-origin requests are refused")
        if self.loopback and self.token is None and not is_loopback_host(host):
            return error(403, "this admin listener only answers Host: localhost or a loopback IP")
        return None

    def _authorized(self, request: AdminRequest) -> bool:
        assert self.token is not None
        scheme, _, credentials = (request.header("authorization") or "").partition(" ")
        given = credentials.strip().encode("utf-8", "surrogateescape")
        # compare_digest takes the same time wherever the first difference is.
        matches = hmac.compare_digest(given, self.token.encode())
        return scheme.lower() == "bearer" and matches

    def _static(self, method: str, segments: list[str]) -> AdminResponse:
        name = "index.html" if not segments else "/".join(segments[1:])
        found = self.static.get(name)
        if found is None:
            return error(404, f"no such file: {name}")
        if method != "GET":
            return error(405, f"{method} is not allowed here; use GET", [("Allow", "GET, HEAD")])
        content, kind = found
        headers = list(_PAGE_HEADERS) if name.endswith(".html") else []
        return AdminResponse(200, content, kind, headers)

    # -- lookups ------------------------------------------------------------------------------
    def _group(self, name: str) -> UpstreamGroup:
        group = self.app.groups.get(name)
        if group is None:
            raise _NotFound(f"unknown upstream pool {name!r}")
        return group

    def _upstream(self, group: UpstreamGroup, server: str) -> Upstream:
        keys = {server}
        with contextlib.suppress(ValueError):
            keys.add(str(parse_address(server)))  # "LOCALHOST:9001" names localhost:9001
        for upstream in group.upstreams:
            if upstream.key in keys:
                return upstream
        raise _NotFound(f"no server {server!r} in upstream pool {group.name!r}")

    # -- several workers ----------------------------------------------------------------------
    async def _view(self, *, refresh: bool = True) -> tuple[ProxyStats, Peers | None]:
        """The statistics to show, and the other workers' figures (None with one worker)."""
        if self.cluster is None:
            return self.stats, None
        return await self.cluster.view(refresh=refresh)

    async def _act(self, command: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """Apply an action here, then in every other worker: the summed result (purged
        entries) and, with several workers, which of them acknowledged."""
        result = await apply_command(self.app, command)
        if self.cluster is None:
            return result, None
        results, missing = await self.cluster.broadcast(command)
        acknowledged = sorted([self.cluster.spec.number, *results])
        return result + sum(results.values()), {"acknowledged": acknowledged, "missing": missing}

    async def _server_answer(
        self, group: UpstreamGroup, upstream: Upstream, workers: dict[str, Any] | None
    ) -> AdminResponse:
        stats, peers = await self._view(refresh=False)
        body = server_status(group, upstream, stats, peers)
        if workers is not None:
            body["acknowledged_by"] = workers
        return json_response(body)

    # -- endpoints ----------------------------------------------------------------------------
    async def status(self, request: AdminRequest, params: Params) -> AdminResponse:
        stats, peers = await self._view()
        return json_response(app_status(self.app, stats, uptime=self.uptime(), peers=peers))

    async def config(self, request: AdminRequest, params: Params) -> AdminResponse:
        return json_response(redacted_config(self.app))

    async def metrics(self, request: AdminRequest, params: Params) -> AdminResponse:
        stats, peers = await self._view()
        self.collector.stats, self.collector.peers = stats, peers or Peers()
        return AdminResponse(200, render(self.registry), CONTENT_TYPE)

    async def server(self, request: AdminRequest, params: Params) -> AdminResponse:
        group = self._group(params[0])
        upstream = self._upstream(group, params[1])
        stats, peers = await self._view()
        return json_response(server_status(group, upstream, stats, peers))

    async def drain(self, request: AdminRequest, params: Params) -> AdminResponse:
        return await self._set_drained(params, True)

    async def enable(self, request: AdminRequest, params: Params) -> AdminResponse:
        return await self._set_drained(params, False)

    async def _set_drained(self, params: Params, drained: bool) -> AdminResponse:
        group = self._group(params[0])
        upstream = self._upstream(group, params[1])
        if upstream.drained != drained:
            log.info(
                "admin: %s %s in %s", "drained" if drained else "enabled", upstream.key, group.name
            )
        op = "drain" if drained else "enable"
        _, workers = await self._act({"op": op, "pool": group.name, "server": upstream.key})
        return await self._server_answer(group, upstream, workers)

    async def weight(self, request: AdminRequest, params: Params) -> AdminResponse:
        group = self._group(params[0])
        upstream = self._upstream(group, params[1])
        body = _json_object(request)
        weight = body.get("weight")
        if set(body) != {"weight"}:
            raise _BadRequest('expected {"weight": N}')
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise _BadRequest(f"weight must be an integer from 1 to {MAX_WEIGHT}, got {weight!r}")
        if upstream.weight != weight:
            log.info(
                "admin: weight of %s in %s %d → %d",
                upstream.key,
                group.name,
                upstream.weight,
                weight,
            )
        command = {"op": "weight", "pool": group.name, "server": upstream.key, "weight": weight}
        _, workers = await self._act(command)
        return await self._server_answer(group, upstream, workers)

    async def cache_stats(self, request: AdminRequest, params: Params) -> AdminResponse:
        cache = self.app.cache
        if cache is None:
            return error(404, "the cache is disabled")
        _, peers = await self._view()
        return json_response(cache_stats(cache, peers))

    async def purge(self, request: AdminRequest, params: Params) -> AdminResponse:
        cache = self.app.cache
        if cache is None:
            return error(404, "the cache is disabled")
        body = _json_object(request)
        usage = (
            'expected {"url": "http://host/path"}, {"prefix": "http://host/dir/"} or {"all": true}'
        )
        if len(body) != 1:
            raise _BadRequest(usage)
        ((kind, value),) = body.items()
        if kind == "all" and value is True:
            what = "everything"
        elif kind in ("url", "prefix") and isinstance(value, str):
            try:
                key = key_from_url(value)
            except ValueError as exc:
                raise _BadRequest(f"{kind}: {exc}") from None
            what = key.url
        else:
            raise _BadRequest(usage)
        # "url": every Vary variant of the URL; "prefix": every URL under it.
        purged, workers = await self._act({"op": "purge", kind: value})
        log.info("admin: purged %s from the cache (%d entries)", what, purged)
        answer: dict[str, Any] = {"purged": purged}
        if workers is not None:
            answer["acknowledged_by"] = workers
        return json_response(answer)


class _NotFound(Exception):
    pass


class _BadRequest(Exception):
    pass


def _json_object(request: AdminRequest) -> dict[str, Any]:
    try:
        data = request.json()
    except ValueError as exc:
        raise _BadRequest(f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise _BadRequest("expected a JSON object body")
    return data


def _errors_as_json(handler: Handler) -> Handler:
    async def wrapped(api: AdminApi, request: AdminRequest, params: Params) -> AdminResponse:
        try:
            return await handler(api, request, params)
        except _NotFound as exc:
            return error(404, str(exc))
        except _BadRequest as exc:
            return error(400, str(exc))

    return wrapped


def _match(pattern: tuple[str, ...], segments: list[str]) -> list[str] | None:
    """The values of the ``*`` segments of ``pattern`` in ``segments``, or None."""
    if len(pattern) != len(segments):
        return None
    params: list[str] = []
    for expected, actual in zip(pattern, segments, strict=True):
        if expected == "*":
            if not actual:
                return None
            params.append(actual)
        elif expected != actual:
            return None
    return params


_SERVER = ("api", "upstreams", "*", "servers", "*")
_ROUTES: Final[list[tuple[tuple[str, ...], dict[str, Handler]]]] = [
    (("api", "status"), {"GET": AdminApi.status}),
    (("api", "config"), {"GET": AdminApi.config}),
    (("metrics",), {"GET": AdminApi.metrics}),
    (("api", "cache", "stats"), {"GET": AdminApi.cache_stats}),
    (("api", "cache", "purge"), {"POST": _errors_as_json(AdminApi.purge)}),
    (_SERVER, {"GET": _errors_as_json(AdminApi.server)}),
    ((*_SERVER, "drain"), {"POST": _errors_as_json(AdminApi.drain)}),
    ((*_SERVER, "enable"), {"POST": _errors_as_json(AdminApi.enable)}),
    ((*_SERVER, "weight"), {"PUT": _errors_as_json(AdminApi.weight)}),
]
