"""Several worker processes behind one port: ``[server] workers = N`` (N > 1).

The process started by ``pibl run`` becomes a *supervisor*. It serves no traffic itself: it forks
N workers, each of which runs the ordinary single-process proxy (``cli.serve``) on the same
addresses, restarts a worker that dies, and forwards signals to all of them. With ``workers = 1``
none of this runs: ``pibl run`` serves in its own process, as before.

Sharing the port: SO_REUSEPORT, one listening socket per worker
---------------------------------------------------------------
Each worker binds and listens on its own socket with SO_REUSEPORT; the kernel spreads new
connections over the listeners by a hash of the connection's addresses. This is nginx's
``listen ... reuseport`` and the layout Linux recommends for multi-process servers. The other
way, one socket bound by the supervisor and inherited by the workers, gives one shared accept
queue that every worker polls: an idle worker and a busy one race for each connection (all wake,
one wins), and with epoll the last process to wait tends to win, so the load goes lopsided --
the reason nginx added ``reuseport``. What SO_REUSEPORT costs: the connections still waiting in
the accept queue of a worker that is killed are reset, and the balancing is per connection, not
per request. It needs Linux (3.9+) for the load balancing: BSD's SO_REUSEPORT hands every
connection to the last socket bound, so other systems are refused with a clear error.

The supervisor still binds every listen address once, *without listening*, before it forks. That
socket is never handed a connection (only listening sockets are), but it (1) turns ``port 0``
into the real port, which the workers then bind and which is logged once, as ``listening on
http://HOST:PORT``, when all workers are ready; (2) holds the port for the supervisor's lifetime,
so a restarted worker always gets it back and no program without SO_REUSEPORT can take it in
between; (3) makes "address already in use" fail ``pibl run`` at once, not in N workers.

Processes
---------
Workers are forked, not spawned: the settings are already parsed and validated in the
supervisor, a restart costs a fork instead of an interpreter start, and the imported modules
are shared copy-on-write. The supervisor stays synchronous (no event loop, no threads), so
forking is safe: its signal handlers only write the signal number to a pipe
(``signal.set_wakeup_fd``) that one ``select`` loop reads together with the workers' readiness
pipes and the restart and kill deadlines.

- Readiness: a worker writes one byte on its own pipe once it listens. ``listening on ...`` is
  logged when every worker of the first generation is ready; a worker of the first generation
  that exits before it is ready stops the whole start with its exit code (a config or file error
  is reported by the worker itself, like the single-process path does).
- Restarts: a worker that exits unexpectedly (crash, OOM kill, ``kill -9``) is replaced after a
  backoff that doubles from ``RESTART_BACKOFF_MIN`` up to ``RESTART_BACKOFF_MAX`` while it keeps
  dying young, and starts again from the minimum once a worker lived ``STABLE_AFTER`` seconds.
- Signals: SIGTERM and SIGINT are forwarded, then the supervisor waits for the workers up to
  ``shutdown_timeout`` (each worker enforces the same limit on its in-flight requests) plus
  ``KILL_GRACE``, kills what is left with SIGKILL and exits (0, or 1 if it had to kill). SIGHUP
  and SIGUSR1 (reopen the access log) are forwarded as they are. A worker ignores SIGHUP until
  ``serve`` installs a handler for it, so a forwarded SIGHUP never kills a worker.
- Orphans: every worker watches a "lifeline" pipe whose only write end the supervisor holds; when
  the supervisor dies, even by SIGKILL, the pipe reads EOF and the workers stop gracefully.
- Logs: workers share the supervisor's stderr; their log lines carry ``name[pid]``. The access
  log file is opened by every worker with O_APPEND and written in whole-line batches, so lines
  of different workers never interleave (see ``accesslog.AccessLog``).

What is per worker
------------------
Each worker has its own upstream keep-alive pools, balancer state (round-robin position, least
connections counts: balancing is per worker, like nginx without a ``zone``), active health
checks, and memory cache (``storage = "memory"`` is not shared: use ``disk`` or ``redis`` for one
cache across workers).

Metrics and the admin API across workers: with ``[admin]``, the supervisor creates a private
state folder (``WorkerLink.state_dir``, removed when it stops) where every worker writes a
snapshot of its figures, ``worker-<number>.json``, and reads the admin's commands; worker 1 alone
listens for the admin API and merges the snapshots (``pibl.admin.cluster``). A restarted worker
keeps its slot number; the counters of a dead process leave the totals once its snapshot is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeAlias

from pibl.balancer.upstream import Address
from pibl.config import Settings
from pibl.errors import ConfigError

__all__ = [
    "KILL_GRACE",
    "RESTART_BACKOFF_MAX",
    "RESTART_BACKOFF_MIN",
    "STABLE_AFTER",
    "Supervisor",
    "WorkerLink",
    "bind_placeholders",
    "restart_delay",
    "supervise",
]

log = logging.getLogger("pibl.workers")
server_log = logging.getLogger("pibl.server")  # "listening on ...", as the single-process path

# First restart delay after a worker died, doubled for each death in a row up to the maximum
# (systemd's RestartSec is 100 ms; gunicorn restarts at once, which spins on a crash loop).
RESTART_BACKOFF_MIN = 0.1
RESTART_BACKOFF_MAX = 10.0
# A worker that lived this long was healthy: its next death restarts after the minimum again.
STABLE_AFTER = 10.0
# Beyond shutdown_timeout: the time a worker needs to abort what is left and exit after its own
# shutdown_timeout expired, before the supervisor kills it.
KILL_GRACE = 2.0

FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_HANDLED = (*STOP_SIGNALS, *FORWARDED_SIGNALS, signal.SIGCHLD)

# Runs one worker: called in the forked child; returns when the worker stopped.
WorkerMain: TypeAlias = Callable[["WorkerLink"], None]
_SignalHandler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers


@dataclass
class WorkerLink:
    """What a forked worker gets from the supervisor: where to listen, how to report back.

    ``serve`` listens on ``listen`` with SO_REUSEPORT and without logging ``listening on``,
    then calls ``started(stop)``.
    """

    number: int
    listen: tuple[Address, ...]
    ready_fd: int
    lifeline_fd: int
    state_dir: str | None = None  # with [admin]: the folder shared with the other workers

    def started(self, stop: Callable[[], None]) -> None:
        """Tell the supervisor this worker listens; call ``stop`` when the supervisor dies."""
        os.write(self.ready_fd, b"1")
        os.close(self.ready_fd)
        loop = asyncio.get_running_loop()

        def on_lifeline() -> None:
            # Nobody writes on this pipe: readable means EOF, the supervisor is gone.
            loop.remove_reader(self.lifeline_fd)
            log.warning("the supervisor is gone; stopping")
            stop()

        loop.add_reader(self.lifeline_fd, on_lifeline)


@dataclass
class _Worker:
    """One worker slot: the number stays, the process changes across restarts."""

    number: int
    pid: int = 0  # 0: no process
    ready: bool = False
    ready_fd: int | None = None
    started_at: float = 0.0
    failures: int = 0  # deaths in a row, each younger than STABLE_AFTER
    restart_at: float | None = None


@dataclass
class _Exit:
    code: int  # os.waitstatus_to_exitcode: negative for a signal

    def __str__(self) -> str:
        if self.code < 0:
            try:
                name = signal.Signals(-self.code).name
            except ValueError:
                name = f"signal {-self.code}"
            return f"was killed by {name}"
        return f"exited with code {self.code}"


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that died young ``failures`` times in a row before."""
    return min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * float(2 ** min(failures, 32)))


def _check_platform() -> None:
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(
            "server.workers: more than one worker needs Linux (SO_REUSEPORT load balancing); "
            "use workers = 1 here"
        )


def bind_placeholders(addresses: Iterable[Address]) -> list[socket.socket]:
    """Bind (without listening) every address with SO_REUSEPORT; port 0 becomes a real port.

    A host name that resolves to several addresses gives one socket per address, all on the
    port the first one got when the configured port is 0.
    """
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            port = address.port
            infos = socket.getaddrinfo(
                address.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            seen: set[tuple[int, str]] = set()
            for family, kind, proto, _name, sockaddr in infos:
                ip = str(sockaddr[0])
                if (family, ip) in seen:
                    continue
                seen.add((family, ip))
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio
                sock.bind((ip, port, *sockaddr[2:]))
                port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Supervisor:
    """Forks ``settings.server.workers`` workers running ``worker_main`` and looks after them.

    ``run()`` returns the exit status for ``pibl run``. Use it from the main thread of a process
    that has no event loop running and no other threads (it forks).
    """

    def __init__(self, settings: Settings, worker_main: WorkerMain) -> None:
        self.settings = settings
        self.worker_main = worker_main
        self.workers = [_Worker(n) for n in range(1, settings.server.workers + 1)]
        self.listen: tuple[Address, ...] = ()
        self._sockets: list[socket.socket] = []
        self._selector: selectors.BaseSelector | None = None
        self._wakeup: tuple[int, int] | None = None
        self._lifeline: tuple[int, int] | None = None
        self._previous_handlers: dict[int, _SignalHandler] = {}
        self._announced = False
        self._stopping = False
        self._kill_at: float | None = None
        self._killed = False
        self._status: int | None = None  # set when the start failed
        self.state_dir: str | None = None  # with [admin] (see pibl.admin.cluster)

    # ----------------------------------------------------------------------- lifecycle

    def run(self) -> int:
        _check_platform()
        self._sockets = bind_placeholders(self.settings.server.listen)
        if self.settings.admin is not None:
            self.state_dir = tempfile.mkdtemp(prefix="pibl-workers-")
        try:
            self.listen = tuple(Address(*s.getsockname()[:2]) for s in self._sockets)
            self._selector = selectors.DefaultSelector()
            self._wakeup = os.pipe()
            self._lifeline = os.pipe()
            for fd in self._wakeup:
                os.set_blocking(fd, False)
            self._selector.register(self._wakeup[0], selectors.EVENT_READ)
            self._install_signal_handlers()
            log.info("supervisor (pid %d) starting %d workers", os.getpid(), len(self.workers))
            for worker in self.workers:
                self._spawn(worker)
            return self._loop()
        finally:
            self._cleanup()

    def _loop(self) -> int:
        assert self._selector is not None
        assert self._wakeup is not None
        while True:
            for key, _events in self._selector.select(self._timeout()):
                if key.fd == self._wakeup[0]:
                    self._on_signals()
                else:
                    self._on_ready_pipe(key.fd)
            self._reap()
            now = time.monotonic()
            if self._stopping:
                if not any(w.pid for w in self.workers):
                    break
                if self._kill_at is not None and now >= self._kill_at:
                    self._kill_all()
                continue
            for worker in self.workers:
                if worker.restart_at is not None and now >= worker.restart_at:
                    self._spawn(worker)
            if not self._announced and all(w.ready for w in self.workers):
                self._announced = True
                for address in self.listen:
                    server_log.info("listening on http://%s", address)
                pids = ", ".join(str(w.pid) for w in self.workers)
                log.info("%d workers ready (pids %s)", len(self.workers), pids)
        if self._status is not None:
            return self._status
        if self._killed:
            return 1
        log.info("all workers stopped")
        return 0

    def _timeout(self) -> float | None:
        deadlines = [w.restart_at for w in self.workers if w.restart_at is not None]
        if self._kill_at is not None:
            deadlines.append(self._kill_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _cleanup(self) -> None:
        # Normally every worker has exited by now; after an error in the supervisor itself,
        # leave no orphan behind.
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
                worker.pid = 0
            self._close_ready_fd(worker)
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        for pipe in (self._wakeup, self._lifeline):
            for fd in pipe or ():
                os.close(fd)
        self._wakeup = self._lifeline = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None

    # ----------------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> None:
        assert self._wakeup is not None
        # The handlers do nothing: the C-level handler writes the signal number to the wakeup
        # pipe, which the select loop reads. (Without a Python handler, SIGCHLD would not be
        # written there, and SIGINT would raise KeyboardInterrupt anywhere.)
        signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)
        for signum in _HANDLED:
            previous = signal.signal(signum, _ignore)
            self._previous_handlers[signum] = signal.SIG_DFL if previous is None else previous

    def _on_signals(self) -> None:
        assert self._wakeup is not None
        try:
            data = os.read(self._wakeup[0], 1024)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                continue  # reaped after the loop's select
            if signum in STOP_SIGNALS:
                self._begin_stop(signal.Signals(signum).name, signum)
            elif signum in FORWARDED_SIGNALS:
                name = signal.Signals(signum).name
                log.info("%s: forwarding to the workers", name)
                self._signal_all(signum)

    def _begin_stop(self, reason: str, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to every worker; kill those still running after the timeout."""
        first = not self._stopping
        self._stopping = True
        for worker in self.workers:
            worker.restart_at = None
        if first:
            timeout = self.settings.server.shutdown_timeout
            log.info("%s: stopping the workers (up to %gs)", reason, timeout)
            self._kill_at = time.monotonic() + timeout + KILL_GRACE
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def _kill_all(self) -> None:
        self._kill_at = None
        for worker in self.workers:
            if worker.pid:
                log.warning(
                    "worker %d (pid %d) still running after the shutdown timeout: killing it",
                    worker.number,
                    worker.pid,
                )
                self._killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    # ----------------------------------------------------------------------- workers

    def _spawn(self, worker: _Worker) -> None:
        assert self._selector is not None
        worker.restart_at = None
        ready_read, ready_write = os.pipe()
        sys.stdout.flush()  # or the child would write the parent's buffered output again
        sys.stderr.flush()
        # Signals wait until the child has reset the supervisor's handlers: before that, one
        # sent to the child would be written into the supervisor's wakeup pipe.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                os.close(ready_read)
                self._run_child(worker.number, ready_write, mask)  # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(ready_write)
        worker.pid = pid
        worker.ready = False
        worker.started_at = time.monotonic()
        worker.ready_fd = ready_read
        self._selector.register(ready_read, selectors.EVENT_READ)
        log.debug("worker %d started (pid %d)", worker.number, pid)

    def _run_child(self, number: int, ready_fd: int, mask: Iterable[int]) -> None:
        code = 1
        try:
            assert self._lifeline is not None
            assert self._wakeup is not None
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            # Until serve() installs its handlers: a forwarded SIGUSR1 or SIGHUP arriving during
            # start-up must not kill the worker (their default action is to terminate).
            for signum in FORWARDED_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            # The supervisor's descriptors: only the lifeline's read end is the worker's.
            fds = [*self._wakeup, self._lifeline[1]]
            fds += [w.ready_fd for w in self.workers if w.ready_fd is not None]
            for fd in fds:
                os.close(fd)
            if self._selector is not None:
                with contextlib.suppress(OSError):
                    self._selector.close()
            for sock in self._sockets:
                sock.close()
            _tag_log_lines_with_pid()
            link = WorkerLink(number, self.listen, ready_fd, self._lifeline[0], self.state_dir)
            self.worker_main(link)
            code = 0
        except KeyboardInterrupt:
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except ConfigError as error:
            print(f"pibl: config error: {error}", file=sys.stderr)
            code = 2
        except OSError as error:
            message = error.strerror or str(error)
            if error.filename is not None:
                message = f"{error.filename}: {message}"
            print(f"pibl: {message}", file=sys.stderr)
            code = 1
        except BaseException:
            log.exception("worker %d failed", number)
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _on_ready_pipe(self, fd: int) -> None:
        worker = next((w for w in self.workers if w.ready_fd == fd), None)
        if worker is None:
            return
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if data and not worker.ready:
            worker.ready = True
            log.info("worker %d ready (pid %d)", worker.number, worker.pid)
        if not data:  # EOF: written and closed, or the worker died
            self._close_ready_fd(worker)

    def _close_ready_fd(self, worker: _Worker) -> None:
        if worker.ready_fd is None:
            return
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.ready_fd)
        os.close(worker.ready_fd)
        worker.ready_fd = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is not None:
                self._on_exit(worker, _Exit(os.waitstatus_to_exitcode(status)))

    def _on_exit(self, worker: _Worker, status: _Exit) -> None:
        pid = worker.pid
        if worker.ready_fd is not None:
            self._on_ready_pipe(worker.ready_fd)  # a byte written before dying still counts
            self._close_ready_fd(worker)
        was_ready = worker.ready
        worker.pid = 0
        worker.ready = False
        if self._stopping:
            clean = status.code in (0, -signal.SIGTERM, -signal.SIGINT)
            level = logging.INFO if clean else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", worker.number, pid, status)
            return
        if not self._announced and not was_ready:
            log.error(
                "worker %d (pid %d) %s before it was ready; stopping", worker.number, pid, status
            )
            self._status = status.code if status.code > 0 else 1
            self._begin_stop("start failed")
            return
        now = time.monotonic()
        if now - worker.started_at >= STABLE_AFTER:
            worker.failures = 0
        delay = restart_delay(worker.failures)
        worker.failures += 1
        worker.restart_at = now + delay
        log.warning(
            "worker %d (pid %d) %s; restarting it in %.1fs", worker.number, pid, status, delay
        )


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The supervisor's Python-level signal handler: the wakeup pipe carries the signal."""


def _tag_log_lines_with_pid() -> None:
    """In a worker: ``pibl.server: ...`` becomes ``pibl.server[PID]: ...`` on the root handlers."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        fmt = getattr(formatter, "_fmt", None)
        if formatter is None or not isinstance(fmt, str) or "%(name)s" not in fmt:
            continue
        tagged = fmt.replace("%(name)s", "%(name)s[%(process)d]", 1)
        handler.setFormatter(logging.Formatter(tagged, formatter.datefmt))


def supervise(settings: Settings, worker_main: WorkerMain) -> int:
    """Run ``settings.server.workers`` workers until SIGTERM/SIGINT; the exit status."""
    return Supervisor(settings, worker_main).run()
