"""A real ``redis-server`` for tests: 127.0.0.1 only, no persistence, started on a free port.

Redis cannot bind port 0, so a free port is found by binding a socket to ``127.0.0.1:0`` and
closing it; the rare collision (another process took the port in between) is detected from the
server's own output and retried on another port. Readiness is Redis' "Ready to accept
connections" line followed by a PING: no sleeps.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading

READY_LINE = b"Ready to accept connections"
START_TIMEOUT = 10.0
ATTEMPTS = 5


class RedisUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ping(port: int, timeout: float = 2.0) -> bool:
    """One PING over a fresh connection; True on ``+PONG``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                data = sock.recv(64)
                if not data:
                    break
                reply += data
            return reply == b"+PONG\r\n"
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``start`` again after ``kill`` reuses the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.output = bytearray()
        self._reader: threading.Thread | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="pibl-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable(
                "redis-server not found: `make test` installs it (apt-get install redis-server)"
            )
        fixed = self.port != 0
        for _ in range(1 if fixed else ATTEMPTS):
            port = self.port if fixed else free_port()
            if self._launch(binary, port):
                self.port = port
                return
        raise RedisUnavailable(
            f"redis-server did not start: {bytes(self.output[-2000:]).decode(errors='replace')}"
        )

    def _launch(self, binary: str, port: int) -> bool:
        options = {
            "port": str(port),
            "bind": "127.0.0.1",
            "save": "",  # no snapshots, no append-only file: a killed server loses everything
            "appendonly": "no",
            "dir": self._dir.name,
            "maxmemory": "256mb",  # as a shared cache should run (see README)
            "maxmemory-policy": "volatile-lru",
            "loglevel": "notice",  # prints the ready line
        }
        args = [binary] + [part for name, value in options.items() for part in (f"--{name}", value)]
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        ready = threading.Event()
        reader = threading.Thread(target=self._read, args=(process, ready), daemon=True)
        reader.start()
        # Set by the ready line, or at EOF when the server exits (e.g. the port was taken).
        ready.wait(START_TIMEOUT)
        # Listening once the line is out: the PING confirms it is this server answering.
        if process.poll() is None and ready.is_set() and ping(port):
            self.process, self._reader = process, reader
            return True
        self._end(process, reader)
        return False

    def _read(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert process.stdout is not None
        for line in process.stdout:  # also drains the pipe so the server never blocks on it
            self.output += line
            if READY_LINE in line:
                ready.set()
        ready.set()

    @staticmethod
    def _end(process: subprocess.Popen[bytes], reader: threading.Thread) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=10)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()

    def kill(self) -> None:
        """SIGKILL, like a crash: no goodbye to clients."""
        if self.process is not None and self._reader is not None:
            self._end(self.process, self._reader)
        self.process = self._reader = None

    def stop(self) -> None:
        self.kill()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["RedisServer", "RedisUnavailable", "free_port", "ping"]
