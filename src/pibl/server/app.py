"""Assemble a running proxy from settings: pools, strategies, routes, listeners, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from pibl.accesslog import AccessLog, AccessLogger, NullAccessLog
from pibl.balancer.checker import HealthChecker
from pibl.balancer.group import UpstreamGroup
from pibl.balancer.strategies import make_strategy
from pibl.balancer.upstream import Address, Upstream
from pibl.cache.storage import make_storage
from pibl.clock import TurnClock
from pibl.config import Settings, TlsSettings, UpstreamSettings
from pibl.errors import ConfigError
from pibl.pool.pool import ConnectionPool
from pibl.proxy.caching import HttpCache
from pibl.proxy.pipeline import Pipeline
from pibl.proxy.routing import Route, Router
from pibl.server.downstream import DownstreamConnection
from pibl.server.listener import Listener
from pibl.server.redirect import HttpsRedirect
from pibl.tls import (
    CertificateError,
    ServerCertificates,
    TlsTermination,
    UpstreamTLS,
    load_certificate,
    upstream_tls,
)
from pibl.writebatch import WriteBatch

if TYPE_CHECKING:
    from pibl.admin.cluster import ClusterSpec

log = logging.getLogger("pibl.server")

# Slack above the configured head limits that a client may send before llhttp has seen a
# whole field (one socket read); the exact per-field limits apply on top.
HEAD_READ_SLACK = 64 * 1024


def build_group(
    settings: UpstreamSettings,
    connect_timeout: float,
    reusable_pools: dict[str, ConnectionPool] | None = None,
    *,
    batch: WriteBatch | None = None,
) -> UpstreamGroup:
    """A group from settings; ``reusable_pools`` (by server key) keeps warm keep-alive pools
    across a reload when a server's pool settings did not change. ``batch``: where new
    upstream connections hold their writes (none: written at once)."""
    upstreams = [
        Upstream(entry.address, entry.weight, max_connections=entry.max_connections)
        for entry in settings.servers
    ]
    tls = _upstream_tls(settings)
    pools = {}
    for u in upstreams:
        pool = (reusable_pools or {}).pop(u.key, None)
        if pool is None or (
            pool.max_idle,
            pool.idle_timeout,
            pool.connect_timeout,
            pool.tls,
        ) != (settings.keepalive, settings.keepalive_timeout, connect_timeout, tls):
            if pool is not None:
                pool.retire()
            pool = ConnectionPool(
                u.address,
                max_idle=settings.keepalive,
                idle_timeout=settings.keepalive_timeout,
                connect_timeout=connect_timeout,
                tls=tls,
                batch=batch,
            )
        else:
            pool.tls = tls  # same settings; new connections use the freshly read CA file
        pools[u.key] = pool
    strategy = make_strategy(settings.balance, hash_key=settings.hash_key)
    return UpstreamGroup(
        settings.name,
        upstreams,
        strategy,
        pools,
        retries=settings.retries,
        max_fails=settings.max_fails,
        fail_timeout=settings.fail_timeout,
        queue=settings.queue,
        queue_timeout=settings.queue_timeout,
    )


def _upstream_tls(settings: UpstreamSettings) -> UpstreamTLS | None:
    if not settings.tls:
        return None
    try:
        return upstream_tls(
            verify=settings.tls_verify, ca=settings.tls_ca, server_name=settings.tls_server_name
        )
    except CertificateError as error:
        raise ConfigError(f"upstreams.{settings.name}.{error.key}: {error.message}") from None


def load_server_certificates(tls: TlsSettings, source: str | None = None) -> ServerCertificates:
    """The certificates of ``server.tls``; a file that no longer loads is a ConfigError."""
    loaded = []
    for i, entry in enumerate(tls.certificates):
        try:
            loaded.append(load_certificate(entry.cert, entry.key, entry.names))
        except CertificateError as error:
            key = f"server.tls.certificates[{i}].{error.key}"
            raise ConfigError(f"{source or '<config>'}: {key}: {error.message}") from None
    return ServerCertificates(loaded)


def _health_checkers(settings: Settings, groups: dict[str, UpstreamGroup]) -> list[HealthChecker]:
    return [
        HealthChecker(groups[name], up.health)
        for name, up in settings.upstreams.items()
        if up.health is not None
    ]


def build_router(settings: Settings, groups: dict[str, UpstreamGroup]) -> Router[UpstreamGroup]:
    if not settings.routes:
        name = next(iter(groups)) if len(groups) == 1 else "default"
        return Router([Route(groups[name], name=name)])
    return Router([Route.from_settings(r, groups[r.upstream]) for r in settings.routes])


class Service(Protocol):
    """A background part of the proxy with its own tasks or sockets."""

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


class ProxyApp:
    """A configured proxy: call ``start()`` to listen and ``aclose()`` to stop."""

    def __init__(
        self,
        settings: Settings,
        access_log: AccessLogger | None = None,
        *,
        cluster: ClusterSpec | None = None,
    ) -> None:
        """``cluster``: this process is one of several workers (``[server] workers``); the
        admin service then shares its figures and actions with the other workers."""
        self.settings = settings
        server = settings.server
        self._apply_server_settings(settings)
        # Output to clients and upstreams, held for the end of each loop turn.
        self.write_batch = WriteBatch()
        self.clock = TurnClock()  # wall-clock time, read once per loop turn
        self.groups = {
            name: build_group(up, server.connect_timeout, batch=self.write_batch)
            for name, up in settings.upstreams.items()
        }
        self.router = build_router(settings, self.groups)
        if access_log is None:
            cfg = settings.access_log
            access_log = AccessLog(cfg.path, cfg.format) if cfg.enabled else NullAccessLog()
        self.access_log = access_log
        self.cache: HttpCache | None = None
        if settings.cache.enabled:
            storage = make_storage(settings.cache)
            self.cache = HttpCache(
                storage,
                default_ttl=settings.cache.default_ttl,
                max_object_size=settings.cache.max_object_size,
            )
        self.pipeline = Pipeline(
            self.router,
            access_log,
            read_timeout=server.read_timeout,
            cache=self.cache,
            clock=self.clock,
        )
        self.connections: set[DownstreamConnection] = set()
        self.waiting: deque[DownstreamConnection] = deque()  # accepted beyond max_connections
        # Background parts (health checkers, the admin listener): started after the listeners,
        # closed before the pools.
        self.services: list[Service] = []
        self.health_checkers = _health_checkers(settings, self.groups)
        self.services += self.health_checkers
        self.admin_address: Address | None = None  # bound once the admin service started
        if settings.admin is not None:
            from pibl.admin.service import AdminService

            self.services.append(AdminService(self, settings.admin, cluster))
        self.servers: list[Listener] = []
        self.addresses: list[Address] = []
        # TLS termination (server.tls): its listeners' bound addresses, its certificates.
        self.tls_addresses: list[Address] = []
        self.tls: TlsTermination | None = None
        if server.tls is not None:
            self.tls = TlsTermination(load_server_certificates(server.tls, settings.source))
        self._redirect: HttpsRedirect | None = None
        # Tunnels after 101 Switching Protocols (WebSocket and other upgrades).
        self.tunnels_open = 0
        self.tunnels_total = 0

    def _apply_server_settings(self, settings: Settings) -> None:
        server = settings.server
        self.limits = server
        self.max_head_bytes = server.max_request_line + server.max_header_size + HEAD_READ_SLACK
        self.keepalive_enabled = server.keepalive_timeout > 0
        self.max_connections = server.max_connections
        self._trusted = tuple(server.trusted_proxies)
        self._trusted_cache: dict[str, bool] = {}

    async def reload(self, settings: Settings) -> None:
        """Swap routes, pools, strategies, limits and the access log for ``settings``.

        Client connections stay open; requests in flight finish on the pools they started
        on. The swap itself is one synchronous block, so no request sees half of it. What
        cannot change without a restart (listen addresses, workers, cache, admin) is kept
        and logged.
        """
        old = self.settings
        for what, before, after in (
            ("server.listen", old.server.listen, settings.server.listen),
            ("server.workers", old.server.workers, settings.server.workers),
            ("cache", old.cache, settings.cache),
            ("admin", old.admin, settings.admin),
        ):
            if before != after:
                log.warning("reload: %s changed; it takes effect after a restart", what)
        # TLS: certificates (and redirect_http) are swapped; the listeners stay as they are.
        old_tls, tls = old.server.tls, settings.server.tls
        certificates: ServerCertificates | None = None
        if old_tls is None or tls is None:
            if old_tls != tls:
                log.warning("reload: server.tls changed; it takes effect after a restart")
            tls = old_tls
        else:
            if tls.listen != old_tls.listen:
                log.warning("reload: server.tls.listen changed; it takes effect after a restart")
            tls = dataclasses.replace(tls, listen=old_tls.listen)
            certificates = load_server_certificates(tls, settings.source)
        reusable = {
            key: pool for group in self.groups.values() for key, pool in group.pools.items()
        }
        groups = {
            name: build_group(up, settings.server.connect_timeout, reusable, batch=self.write_batch)
            for name, up in settings.upstreams.items()
        }
        router = build_router(settings, groups)
        checkers = _health_checkers(settings, groups)
        for checker in checkers:
            await checker.start()
        access_log: AccessLogger | None = None
        if settings.access_log != old.access_log:
            cfg = settings.access_log
            access_log = AccessLog(cfg.path, cfg.format) if cfg.enabled else NullAccessLog()

        # -- the swap ------------------------------------------------------------------------
        old_checkers, old_log = self.health_checkers, self.access_log
        self.settings = dataclasses.replace(
            settings,
            server=dataclasses.replace(settings.server, listen=old.server.listen, tls=tls),
            cache=old.cache,
            admin=old.admin,
        )
        self._apply_server_settings(self.settings)
        self.groups, self.router, self.health_checkers = groups, router, checkers
        if certificates is not None and self.tls is not None:
            self.tls.replace(certificates)
        self.pipeline.router = router
        self.pipeline.read_timeout = settings.server.read_timeout
        self.services = [*(s for s in self.services if s not in old_checkers), *checkers]
        if access_log is not None:
            self.access_log = self.pipeline.access_log = access_log
        # -----------------------------------------------------------------------------------

        for checker in old_checkers:
            await checker.aclose()
        for pool in reusable.values():
            pool.retire()  # not taken over by the new groups (build_group took the others)
        if access_log is not None:
            old_log.close()
        log.info(
            "reloaded %s: %d upstream pool(s), %d route(s)",
            settings.source or "settings",
            len(groups),
            len(settings.routes),
        )

    def is_trusted(self, ip: str) -> bool:
        """Whether ``ip`` is a configured trusted proxy (its X-Forwarded-* are kept)."""
        if not self._trusted:
            return False
        cached = self._trusted_cache.get(ip)
        if cached is None:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                cached = False
            else:
                cached = any(addr in net for net in self._trusted)
            if len(self._trusted_cache) > 10_000:
                self._trusted_cache.clear()
            self._trusted_cache[ip] = cached
        return cached

    async def start(
        self,
        listen: Iterable[Address] | None = None,
        *,
        reuse_port: bool = False,
        log_listening: bool = True,
    ) -> list[Address]:
        """Listen on every configured address; returns them with the bound ports.

        A worker process (``server/workers.py``) passes ``reuse_port=True`` to share the port
        with the other workers, and ``log_listening=False``: its supervisor logs the address.
        """
        loop = asyncio.get_running_loop()
        if self.cache is not None:
            await self.cache.storage.start()
        tls = self.settings.server.tls
        if self.tls is not None and tls is not None:
            # Before the plain listeners: a redirect names the bound TLS port.
            for address in tls.listen:
                server = await Listener.bind(
                    loop,
                    self._tls_connection,
                    address.host,
                    address.port,
                    tls=self.tls.context,
                    tls_handshake_timeout=self.limits.client_header_timeout,
                    reuse_port=reuse_port,
                    backlog=2048,
                )
                self.servers.append(server)
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    self.tls_addresses.append(Address(host, port))
            self._redirect = HttpsRedirect(self, self.tls_addresses[0].port)
        for address in listen if listen is not None else self.settings.server.listen:
            server = await Listener.bind(
                loop,
                self._plain_connection,
                address.host,
                address.port,
                reuse_port=reuse_port,
                backlog=2048,
            )
            self.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.addresses.append(Address(host, port))
        for address in self.addresses if log_listening else ():
            log.info("listening on http://%s", address)
        for address in self.tls_addresses if log_listening else ():
            log.info("listening on https://%s", address)
        for service in self.services:
            await service.start()
        return self.addresses

    def _plain_connection(self) -> DownstreamConnection:
        conn = DownstreamConnection(self)
        tls = self.settings.server.tls
        if self._redirect is not None and tls is not None and tls.redirect_http:
            conn.handler = self._redirect.handle
        return conn

    def _tls_connection(self) -> DownstreamConnection:
        conn = DownstreamConnection(self)
        conn.scheme = "https"  # X-Forwarded-Proto and cache keys
        return conn

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish for up to ``timeout`` s, then stop."""
        if timeout is None:
            timeout = self.settings.server.shutdown_timeout
        for server in self.servers:
            server.close()
        self.keepalive_enabled = False  # responses from now on say Connection: close
        for conn in list(self.connections):
            if conn.task is None and not conn.queue:
                conn.close()
            else:
                conn.stop_parsing = True  # finish what is queued, then close
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            serving = [f for c in self.connections if (f := c.served()) is not None]
            if not serving:
                break
            await asyncio.wait(serving, timeout=max(0.0, deadline - loop.time()))
        for conn in [*self.connections, *self.waiting]:
            conn.abort()
        for service in self.services:
            await service.aclose()  # works after a partial start too
        for server in self.servers:
            await server.wait_closed()
        for group in self.groups.values():
            group.close()
        if self.cache is not None:
            await self.cache.storage.aclose()
        self.access_log.close()
        self.servers.clear()
