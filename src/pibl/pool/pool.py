"""Keep-alive pool of connections to one upstream server.

Bookkeeping (LIFO idle list, cap, idle expiry) is plain code; the only I/O is opening a
connection. LIFO reuse keeps the most recently used — least likely to have been closed by the
server's own idle timeout — at hand (httpcore and Go's Transport do the same).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque

from pibl.balancer.upstream import Address
from pibl.deadline import within
from pibl.errors import UpstreamConnectError, caused_by
from pibl.pool.connection import UpstreamConnection
from pibl.tls import UpstreamTLS
from pibl.writebatch import WriteBatch


class ConnectionPool:
    def __init__(
        self,
        address: Address,
        *,
        max_idle: int = 32,
        idle_timeout: float = 60.0,
        connect_timeout: float = 5.0,
        tls: UpstreamTLS | None = None,
        batch: WriteBatch | None = None,
    ) -> None:
        """``batch``: where the connections hold their writes until the end of the loop's
        turn (``pibl.writebatch``); None writes at once."""
        self.address = address
        self.tls = tls
        self.batch = batch
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._idle: deque[UpstreamConnection] = deque()
        self.active = 0
        self.connects = 0
        self.reuses = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self.retired = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def idle(self) -> int:
        return len(self._idle)

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently released live connection, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.is_open and conn.is_reusable:
                self.active += 1
                self.reuses += 1
                return conn
            conn.close()
        return None

    async def connect(self) -> UpstreamConnection:
        loop = self._loop = asyncio.get_running_loop()
        tls = self.tls
        if tls is None:
            opening = loop.create_connection(
                self._new_connection, self.address.host, self.address.port
            )
        else:
            opening = loop.create_connection(
                self._new_connection,
                self.address.host,
                self.address.port,
                ssl=tls.context,
                server_hostname=tls.server_name or self.address.host,
            )
        try:
            # The timeout covers the TLS handshake too; ``within`` because requests run
            # without a task (DownstreamConnection._start_serving).
            _, conn = await within(opening, self.connect_timeout)
        except TimeoutError as error:
            raise caused_by(  # noqa: B904 (caused_by)
                UpstreamConnectError(f"connect to {self.address} timed out"), error
            )
        except ssl.SSLError as error:
            detail = getattr(error, "verify_message", None) or error.reason or error
            raise caused_by(  # noqa: B904 (caused_by)
                UpstreamConnectError(f"TLS handshake with {self.address} failed: {detail}"), error
            )
        except OSError as error:
            raise caused_by(  # noqa: B904 (caused_by)
                UpstreamConnectError(
                    f"connect to {self.address} failed: {error.strerror or error}"
                ),
                error,
            )
        transport = conn.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.active += 1
        self.connects += 1
        return conn

    def _new_connection(self) -> UpstreamConnection:
        return UpstreamConnection(self.batch)

    def release(self, conn: UpstreamConnection) -> None:
        """Return ``conn`` after its exchange; it is kept only if its message ended cleanly."""
        self.active -= 1
        conn.finish()
        if (
            self.retired
            or not (conn.is_open and conn.is_reusable)
            or len(self._idle) >= self.max_idle
        ):
            conn.close()
            return
        # The loop is looked up once: asyncio.get_running_loop() calls getpid() every time
        # (7 % of samples in a native profile of the proxied hot path).
        loop = self._loop or asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle_timeout, self._sweep)

    def discard(self, conn: UpstreamConnection) -> None:
        self.active -= 1
        conn.sink = None
        conn.abort()

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self.idle_timeout
        idle = self._idle
        # Oldest first: the left end holds the connections released longest ago.
        while idle and (idle[0].idle_since <= deadline or not idle[0].is_open):
            idle.popleft().close()
        if idle:
            self._sweeper = loop.call_later(
                max(0.05, idle[0].idle_since + self.idle_timeout - loop.time()), self._sweep
            )

    def retire(self) -> None:
        """No longer part of the configuration: close idle connections, keep none again."""
        self.retired = True
        self.close()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._idle.pop().close()

    def __repr__(self) -> str:
        return f"<Pool {self.address} active={self.active} idle={len(self._idle)}>"
