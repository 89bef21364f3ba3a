"""The admin listener as one of the proxy's services (``ProxyApp.services``)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pibl.admin.api import AdminApi, is_loopback_host
from pibl.admin.cluster import ClusterNode, ClusterSpec
from pibl.admin.http import AdminHttpServer
from pibl.admin.stats import ProxyStats
from pibl.balancer.upstream import Address
from pibl.config import AdminSettings

if TYPE_CHECKING:
    from pibl.server.app import ProxyApp

__all__ = ["AdminService"]

log = logging.getLogger("pibl.admin")


class AdminService:
    """Counts finished requests and serves the admin API, ``/metrics`` and the dashboard.

    The constructor only records its arguments; ``start()`` hooks the statistics into the
    pipeline and listens, ``aclose()`` undoes both (also after a partial start).

    ``cluster``: this process is one of several workers (``pibl.admin.cluster``). Every worker
    counts its requests and exchanges them through the supervisor's state folder; only worker 1
    listens, and merges the others' figures into its answers.
    """

    def __init__(
        self, app: ProxyApp, settings: AdminSettings, cluster: ClusterSpec | None = None
    ) -> None:
        self.app = app
        self.settings = settings
        self.stats = ProxyStats()
        self.started = time.monotonic()
        self.address: Address | None = None
        self.http: AdminHttpServer | None = None  # the listener, once started
        self.cluster = cluster
        self.node: ClusterNode | None = None

    def uptime(self) -> float:
        return time.monotonic() - self.started

    async def start(self) -> None:
        self.started = time.monotonic()
        observers = self.app.pipeline.record_observers
        if self.stats.observe not in observers:
            observers.append(self.stats.observe)
        if self.cluster is not None:
            self.node = ClusterNode(self.app, self.stats, self.cluster)
            await self.node.start()
            if not self.cluster.serves_admin:
                return
        api = AdminApi(
            self.app,
            self.stats,
            token=self.settings.token,
            uptime=self.uptime,
            loopback=is_loopback_host(self.settings.listen.host),
            cluster=self.node,
        )
        self.http = AdminHttpServer(api.handle)
        listen = self.settings.listen
        try:
            host, port = await self.http.start(listen.host, listen.port)
        except OSError as exc:
            # Say which listener failed: the proxy's own are already open at this point.
            raise OSError(exc.errno, f"admin.listen {listen}: {exc.strerror or exc}") from exc
        self.address = Address(host, port)
        self.app.admin_address = self.address
        log.info("admin API and dashboard on http://%s/", self.address)

    async def aclose(self) -> None:
        observers = self.app.pipeline.record_observers
        if self.stats.observe in observers:
            observers.remove(self.stats.observe)
        if self.node is not None:
            await self.node.aclose()
            self.node = None
        if self.http is not None:
            await self.http.aclose()
            self.http = None
