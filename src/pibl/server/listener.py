"""A listening socket that accepts every pending connection when it is readable.

uvloop's servers (libuv 1.52) accept one connection per event-loop iteration. Under load an
iteration takes milliseconds, so a burst of new connections waits in the kernel's accept queue:
measured with 256 new connections against a busy PIBL, the last was accepted 700 ms after the
first, and its request waited as long (wrk's p99). nginx's ``multi_accept on`` and HAProxy's
``tune.maxaccept`` exist for the same reason. Here each readiness accepts up to
``ACCEPT_BATCH`` connections and hands them to the loop with ``connect_accepted_socket``.

The object stands in for the ``asyncio.Server`` that ``create_server`` returns, as far as the
app uses one: ``sockets``, ``close()``, ``wait_closed()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger("pibl.server")

# Connections accepted per readiness; the rest wait for the next loop iteration.
ACCEPT_BATCH = 512
# Out of file descriptors: stop accepting this long rather than spin (nginx waits 500 ms).
ACCEPT_PAUSE = 0.5
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Listener:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float | None = None,
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._factory = protocol_factory
        self._tls = tls
        self._handshake_timeout = tls_handshake_timeout
        self._pending: set[asyncio.Task[object]] = set()
        self._resume: asyncio.TimerHandle | None = None
        self.is_serving = False
        self.accept_calls = 0  # readiness callbacks, for tests

    @classmethod
    async def bind(
        cls,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.Protocol],
        host: str,
        port: int,
        *,
        backlog: int,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float | None = None,
    ) -> Listener:
        """Listen on every address ``host`` resolves to, as ``create_server`` would."""
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # One socket per family, as asyncio does: "::" must not also take IPv4.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as error:
                    # The message create_server gives: the address is what an operator needs.
                    message = f"error while attempting to bind on address {address!r}"
                    raise OSError(
                        error.errno, f"{message}: {(error.strerror or str(error)).lower()}"
                    ) from None
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        listener = cls(
            loop,
            sockets,
            protocol_factory,
            tls=tls,
            tls_handshake_timeout=tls_handshake_timeout,
        )
        listener.start()
        return listener

    def start(self) -> None:
        self.is_serving = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        self.accept_calls += 1
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as error:
                if error.errno in _OUT_OF_FDS:
                    log.error(
                        "cannot accept connections (%s); pausing for %gs", error, ACCEPT_PAUSE
                    )
                    self._pause(ACCEPT_PAUSE)
                    return
                raise
            self._open(conn)

    def _open(self, conn: socket.socket) -> None:
        opening = self._loop.connect_accepted_socket(
            self._factory,
            conn,
            ssl=self._tls,
            ssl_handshake_timeout=self._handshake_timeout if self._tls is not None else None,
        )
        task: asyncio.Task[object] = self._loop.create_task(opening)
        self._pending.add(task)
        task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[object]) -> None:
        self._pending.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # A failed TLS handshake or a client that reset at once: nothing to serve.
            log.debug("accepted connection not opened: %s", error)

    def _pause(self, seconds: float) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
        self._resume = self._loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self.is_serving:
            self.start()

    def close(self) -> None:
        if not self.is_serving:
            return
        self.is_serving = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in self._pending:
            task.cancel()

    async def wait_closed(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending))
