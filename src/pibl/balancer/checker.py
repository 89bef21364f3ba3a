"""Active health checks: the I/O beside the state machines of :mod:`pibl.balancer.health`.

One task per server sends ``GET <path> HTTP/1.1`` with ``Host: <server address>`` and
``Connection: close`` every ``interval``, and reads the status line. A connect error, no status
line within ``timeout`` (connect included), a malformed status line or a status outside the
expected set is a failure. The result goes to :meth:`UpstreamGroup.check_result`, which applies
rise/fall and logs the transitions. The body is never read: the connection is closed as soon
as the status is known.

The first check runs at once, then one every ``interval`` from the start of the previous one
(a slow check does not stretch the cadence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from pibl.balancer.group import UpstreamGroup
from pibl.balancer.health import HealthState
from pibl.balancer.upstream import Upstream
from pibl.config import HealthSettings

__all__ = ["HealthChecker", "check_request"]

log = logging.getLogger("pibl.balancer")

# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2})(?: [^\r\n]*)?\r?\n")
MAX_STATUS_LINE = 8 * 1024  # bytes; a status line is short, anything longer is not HTTP
INVALID = "invalid response (no HTTP/1.x status line)"


def check_request(upstream: Upstream, path: str) -> bytes:
    """The bytes of one check request."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {upstream.key}\r\n"
        "User-Agent: pibl-health-check\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")


class HealthChecker:
    """Checks every server of ``group``; a service with ``start()`` / ``aclose()``.

    The constructor gives each server a fresh :class:`HealthState` with the configured
    thresholds and starts nothing.
    """

    def __init__(self, group: UpstreamGroup, settings: HealthSettings) -> None:
        self.group = group
        self.settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        for upstream in group.upstreams:
            upstream.health = HealthState(rise=settings.rise, fall=settings.fall)

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The running check tasks, one per server (empty before start and after aclose)."""
        return list(self._tasks)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for upstream in self.group.upstreams:
            task = loop.create_task(self._run(upstream), name=f"health-check {upstream.key}")
            self._tasks.append(task)

    async def aclose(self) -> None:
        """Stop every check; safe before ``start()``, after a partial one and twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check(self, upstream: Upstream) -> tuple[bool, str]:
        """One check: (passed, what happened in words)."""
        settings = self.settings
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(settings.timeout):
                pool = self.group.pools.get(upstream.key)
                tls = pool.tls if pool is not None else None  # a TLS pool is checked over TLS
                reader, writer = await asyncio.open_connection(
                    upstream.address.host,
                    upstream.address.port,
                    limit=MAX_STATUS_LINE,
                    ssl=tls.context if tls is not None else None,
                    server_hostname=(tls.server_name or upstream.address.host) if tls else None,
                )
                writer.write(check_request(upstream, settings.path))
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            return False, f"no answer within {settings.timeout:g}s"
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return False, "connection closed before a status line"
        except asyncio.LimitOverrunError:
            return False, INVALID
        except OSError as error:
            if writer is not None:
                return False, f"connection failed: {error.strerror or error}"
            return False, f"connect failed: {error.strerror or error}"
        finally:
            if writer is not None:
                writer.transport.abort()
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            return False, INVALID
        status = int(match.group(1))
        return settings.accepts(status), f"status {status}"

    async def _run(self, upstream: Upstream) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.interval
        while True:
            started = loop.time()
            try:
                ok, reason = await self.check(upstream)
                self.group.check_result(upstream, ok=ok, reason=reason)
            except Exception:  # a bug must not end the checks of this server
                log.exception("health check of %s failed unexpectedly", upstream.key)
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    def __repr__(self) -> str:
        return f"<HealthChecker {self.group.name} servers={len(self.group.upstreams)}>"
