"""A real ``redis-server`` for tests: 127.0.0.1 only, no persistence, started on a free port.

Redis cannot bind port 0, so a free port is found by binding a socket to ``127.0.0.1:0`` and
closing it; the rare collision (another process took the port in between) is detected from the
server's own output and retried on another port. Readiness is Redis' "Ready to accept
connections" line followed by a PING: no sleeps.

``redis_cluster`` (import it into a test module) starts three cluster-enabled servers the same
way, joins them with ``redis-cli --cluster create`` and waits, in a bounded loop, until every node
reports ``cluster_state:ok``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

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

    def __init__(self, extra: dict[str, str] | None = None) -> None:
        self.extra = extra or {}
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
        options.update(
            {name: value.replace("PORT", str(port)) for name, value in self.extra.items()}
        )
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


def cluster_ok(port: int, timeout: float = 2.0) -> bool:
    """Whether the node on ``port`` reports ``cluster_state:ok`` in CLUSTER INFO."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n")
            reply = b""
            while b"cluster_state:" not in reply or not reply.endswith(b"\r\n"):
                data = sock.recv(4096)
                if not data:
                    break
                reply += data
            return b"cluster_state:ok" in reply
    except OSError:
        return False


class RedisClusterServers:
    """Three ``redis-server`` primaries (no replicas) joined by ``redis-cli --cluster create``;
    every slot is served once each node reports ``cluster_state:ok``."""

    SIZE = 3

    def __init__(self) -> None:
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisUnavailable("redis-cli not found (apt-get install redis-tools)")
        for _ in range(self.SIZE):
            # --cluster-config-file is relative to each node's own temporary --dir.
            node = RedisServer(
                {
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes-PORT.conf",
                    "cluster-node-timeout": "5000",
                    "maxmemory": "64mb",
                }
            )
            self.nodes.append(node)
            node.start()  # waits for the ready line and a PING
        created = subprocess.run(
            [cli, "--cluster", "create"]
            + [f"127.0.0.1:{port}" for port in self.ports]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=START_TIMEOUT * 3,
            check=False,
        )
        if created.returncode != 0:
            raise RedisUnavailable(
                f"redis-cli --cluster create failed: {created.stdout[-2000:]!r} "
                f"{created.stderr[-2000:]!r}"
            )
        deadline = time.monotonic() + START_TIMEOUT * 3
        while not all(cluster_ok(port) for port in self.ports):  # bounded: gossip converges
            if time.monotonic() > deadline:
                raise RedisUnavailable("redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)  # polling interval of the bounded wait above

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> RedisClusterServers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A real three-primary Redis Cluster for the session; tests keep apart by key prefix."""
    with RedisClusterServers() as cluster:
        yield cluster


__all__ = [
    "RedisClusterServers",
    "RedisServer",
    "RedisUnavailable",
    "cluster_ok",
    "free_port",
    "ping",
    "redis_cluster",
]
