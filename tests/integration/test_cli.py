"""The ``pibl`` command line, run as a real process: exit codes, messages, signals, the demo.

Every process is ``python -m pibl ...``; the ones that serve are waited for through their log
lines (``listening on http://HOST:PORT``), never with a fixed sleep. ``PiblProcess`` and
``pibl_process`` are shared with the other process-level tests (access log reopen, shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import ParamSpec

import pytest

from pibl import __version__
from pibl.balancer.upstream import Address
from tests.support import Backend, Handler, request

# --------------------------------------------------------------------------- helpers


# Generous: a cold interpreter start on a loaded CI machine; every wait is bounded by one.
PROCESS_TIMEOUT = 20.0
# A whole test, teardown of its servers included: a proxy that hangs fails, never blocks.
TEST_TIMEOUT = 60.0

P = ParamSpec("P")


def bounded(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """Run an async test under ``TEST_TIMEOUT``, context managers' teardown included."""

    @functools.wraps(test)
    async def run(*args: P.args, **kwargs: P.kwargs) -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await test(*args, **kwargs)

    return run


# Leaked sockets and servers show up as ResourceWarnings on stderr (see assert_clean_output).
PYTHON = (sys.executable, "-W", "always::ResourceWarning")


def run_pibl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pibl ARGS`` to completion (commands that exit by themselves)."""
    return subprocess.run(
        [*PYTHON, "-m", "pibl", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        check=False,
    )


def assert_clean_output(*outputs: str) -> None:
    """No traceback, and nothing left unclosed."""
    for text in outputs:
        assert "Traceback" not in text, text
        assert "ResourceWarning" not in text, text


class PiblProcess:
    """A running ``python -m pibl ...``; its stdout and stderr are read line by line meanwhile."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._eof: set[str] = set()
        self._changed = asyncio.Condition()
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read("stdout", proc.stdout)),
            asyncio.create_task(self._read("stderr", proc.stderr)),
        ]

    async def _read(self, name: str, stream: asyncio.StreamReader) -> None:
        while True:
            line = await stream.readline()
            async with self._changed:
                if line:
                    self.lines[name].append(line.decode("utf-8", "replace"))
                else:
                    self._eof.add(name)
                self._changed.notify_all()
            if not line:
                return

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return "".join(self.lines["stdout"])

    @property
    def stderr(self) -> str:
        return "".join(self.lines["stderr"])

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait_for(
        self, pattern: str, *, stream: str = "stderr", timeout: float = PROCESS_TIMEOUT
    ) -> re.Match[str]:
        """The first line of ``stream`` that matches ``pattern``, waiting for it to appear."""
        regex = re.compile(pattern)
        lines = self.lines[stream]
        try:
            async with asyncio.timeout(timeout), self._changed:
                seen = 0
                while True:
                    for line in lines[seen:]:
                        match = regex.search(line)
                        if match:
                            return match
                    seen = len(lines)
                    if stream in self._eof:
                        break
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no {stream} line matching {pattern!r} within {timeout}s\n{self.describe()}"
            ) from None
        raise AssertionError(
            f"pibl closed {stream} without a line matching {pattern!r}\n{self.describe()}"
        )

    async def wait_listening(self) -> Address:
        match = await self.wait_for(r"listening on http://([\d.]+):(\d+)")
        return Address(match.group(1), int(match.group(2)))

    async def wait_exit(self, timeout: float = PROCESS_TIMEOUT) -> int:
        """Wait for the process to exit and for its output to be read to the end."""
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                await asyncio.gather(*self._readers)
        except TimeoutError:
            raise AssertionError(
                f"pibl still running after {timeout}s\n{self.describe()}"
            ) from None
        return code

    def describe(self) -> str:
        return f"--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"

    async def aclose(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROCESS_TIMEOUT):
                    await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def pibl_process(*args: str, cwd: Path | None = None) -> AsyncIterator[PiblProcess]:
    """``python -m pibl ARGS``, killed at exit if the test did not stop it."""
    proc = await asyncio.create_subprocess_exec(
        *PYTHON,
        "-m",
        "pibl",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    pibl = PiblProcess(proc)
    try:
        yield pibl
    finally:
        await pibl.aclose()


def write_config(
    path: Path,
    servers: Sequence[Address],
    *,
    listen: str = "127.0.0.1:0",
    server: str = "",
    access_log: str = "enabled = false",
) -> Path:
    """A minimal valid config: one upstream "app" in front of ``servers``."""
    quoted = ", ".join(f'"{address}"' for address in servers)
    path.write_text(
        f'[server]\nlisten = "{listen}"\n{server}\n\n'
        f"[upstreams.app]\nservers = [{quoted}]\n\n"
        f"[access_log]\n{access_log}\n"
    )
    return path


@contextlib.asynccontextmanager
async def backend(handler: Handler | None = None, name: str = "origin") -> AsyncIterator[Backend]:
    origin = Backend(handler, name=name)
    await origin.start()
    try:
        yield origin
    finally:
        await origin.aclose()


# --------------------------------------------------------------------------- --version, check


def test_version_prints_name_and_version() -> None:
    result = run_pibl("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pibl {__version__}"
    assert re.fullmatch(r"pibl \d+\.\d+\.\d+\S*", result.stdout.strip())


GOOD_CONFIG = """\
[server]
listen = "127.0.0.1:8080"
connect_timeout = "2s"
shutdown_timeout = "10s"

[upstreams.app]
servers = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3 }]
balance = "weighted_round_robin"

[upstreams.static]
servers = ["127.0.0.1:9003"]

[[routes]]
path_prefix = "/static"
upstream = "static"

[[routes]]
upstream = "app"

[access_log]
path = "-"
format = "json"
"""


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    config = tmp_path / "good.toml"
    config.write_text(GOOD_CONFIG)
    result = run_pibl("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert str(config) in result.stdout
    assert "2 upstream pool(s), 2 route(s)" in result.stdout
    assert result.stderr == ""


VALID_TAIL = '\n[upstreams.app]\nservers = ["127.0.0.1:9001"]\n'

BAD_CONFIGS = [
    pytest.param(
        '[server]\nlisten = "127.0.0.1:8080"\nlisten_backlog = 5\n' + VALID_TAIL,
        ["server.listen_backlog", "unknown key"],
        id="unknown-key",
    ),
    pytest.param(
        '[server]\nlisten = "127.0.0.1:8080"\nshutdown_timeout = true\n' + VALID_TAIL,
        ["server.shutdown_timeout", "expected a duration", "got true"],
        id="wrong-type",
    ),
    pytest.param(
        '[server]\nlisten = "127.0.0.1:8080"\nmax_header_count = "many"\n' + VALID_TAIL,
        ["server.max_header_count", "positive integer", '"many"'],
        id="wrong-type-integer",
    ),
    pytest.param(
        '[server]\nlisten = "127.0.0.1:8080"\n\n[upstreams.app]\n'
        'servers = ["127.0.0.1:9001", "127.0.0.1:99999"]\n',
        ["upstreams.app.servers[1]", "127.0.0.1:99999", "port must be"],
        id="bad-address-port",
    ),
    pytest.param(
        '[server]\nlisten = "localhost"\n' + VALID_TAIL,
        ["server.listen", "localhost", ":port"],
        id="bad-address-no-port",
    ),
    pytest.param(
        '[server]\nlisten = "127.0.0.1:8080"\n' + VALID_TAIL + '\n[[routes]]\nupstream = "ap"\n',
        ["routes[0].upstream", 'unknown upstream "ap"'],
        id="route-to-unknown-upstream",
    ),
    pytest.param(
        '[server]\nlisten = "127.0.0.1:8080"\n\n[upstreams.app\nservers = ["127.0.0.1:9001"]\n',
        ["invalid TOML", "line 4"],
        id="toml-syntax-error",
    ),
    pytest.param(
        '[server]\nlisten = "127.0.0.1:8080"\ntimeout = "5s" "6s"\n' + VALID_TAIL,
        ["invalid TOML", "line 3"],
        id="toml-syntax-error-value",
    ),
]


@pytest.mark.parametrize(("content", "expected"), BAD_CONFIGS)
def test_check_rejects_a_bad_config_naming_file_and_key(
    tmp_path: Path, content: str, expected: list[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = run_pibl("check", "-c", str(config))
    assert result.returncode == 2, result
    assert_clean_output(result.stdout, result.stderr)
    assert result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message, "one line, not a dump"
    assert message.startswith(f"pibl: config error: {config}:"), message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_check_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run_pibl("check", "-c", str(missing))
    assert result.returncode == 2
    assert_clean_output(result.stdout, result.stderr)
    assert f"{missing}: file not found" in result.stderr


def test_run_with_a_bad_config_file_exits_2_before_listening(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\nworkerz = 2\n' + VALID_TAIL)
    result = run_pibl("run", "-c", str(config))
    assert result.returncode == 2
    assert_clean_output(result.stdout, result.stderr)
    assert str(config) in result.stderr
    assert "server.workerz" in result.stderr
    assert "listening" not in result.stderr


# --------------------------------------------------------------------------- run: arguments


def test_run_without_config_or_backend_explains_what_is_needed() -> None:
    result = run_pibl("run")
    assert result.returncode == 2
    assert_clean_output(result.stdout, result.stderr)
    assert "-c FILE" in result.stderr
    assert "--listen" in result.stderr
    assert "--backend" in result.stderr


@pytest.mark.parametrize(
    ("args", "option", "fragment"),
    [
        (["--balance", "nope"], "--balance", '"nope"'),
        (["--balance", "roundrobin"], "--balance", "round_robin"),
    ],
)
def test_run_with_an_unknown_balance_names_the_option(
    args: list[str], option: str, fragment: str
) -> None:
    result = run_pibl("run", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", *args)
    assert result.returncode == 2
    assert_clean_output(result.stdout, result.stderr)
    assert option in result.stderr
    assert fragment in result.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--listen", "127.0.0.1:0", "--backend", "127.0.0.1"], "--backend"),
        (["--listen", "127.0.0.1:0", "--backend", "http://127.0.0.1:1"], "--backend"),
        (["--listen", "127.0.0.1:99999", "--backend", "127.0.0.1:1"], "--listen"),
        (["--listen", "127.0.0.1:0"], "--backend"),
        (["--backend", "127.0.0.1:1"], "--listen"),
    ],
)
def test_run_with_bad_quick_start_arguments_names_the_option(args: list[str], option: str) -> None:
    result = run_pibl("run", *args)
    assert result.returncode == 2
    assert_clean_output(result.stdout, result.stderr)
    assert option in result.stderr


def test_run_with_both_config_and_backends_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path / "pibl.toml", [Address("127.0.0.1", 1)])
    result = run_pibl("run", "-c", str(config), "--backend", "127.0.0.1:2")
    assert result.returncode == 2
    assert_clean_output(result.stdout, result.stderr)
    assert "not both" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = run_pibl("serve")
    assert result.returncode == 2
    assert_clean_output(result.stdout, result.stderr)
    assert "usage: pibl" in result.stderr


# --------------------------------------------------------------------------- run: serving


@bounded
async def test_run_with_config_proxies_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    async with backend(name="origin-1") as origin:
        config = write_config(tmp_path / "pibl.toml", [origin.address])
        async with pibl_process("run", "-c", str(config)) as pibl:
            address = await pibl.wait_listening()
            assert address.port != 0
            response = await request(address, "GET", "/hello?x=1")
            assert response.status == 200
            assert response.body == b"origin-1 GET /hello?x=1\n"
            assert response.header("X-Backend") == "origin-1"
            assert response.header("Via") == "1.1 pibl"
            assert origin.requests[-1].header("X-Forwarded-For") == "127.0.0.1"

            pibl.send_signal(signal.SIGTERM)
            assert await pibl.wait_exit() == 0
            assert re.search(r"INFO pibl: stopped$", pibl.stderr, re.MULTILINE), pibl.describe()
            assert_clean_output(pibl.stdout, pibl.stderr)


@bounded
async def test_run_quick_start_proxies_and_stops_cleanly_on_sigint() -> None:
    async with (
        backend(name="quick") as origin,
        pibl_process("run", "--listen", "127.0.0.1:0", "--backend", str(origin.address)) as pibl,
    ):
        address = await pibl.wait_listening()
        response = await request(address, "POST", "/submit", body=b"payload")
        assert response.status == 200
        assert response.body == b"quick POST /submit\n"
        assert origin.requests[-1].body == b"payload"
        # The quick start logs requests (combined format) on stdout.
        line = await pibl.wait_for(r'"POST /submit HTTP/1\.1" 200 ', stream="stdout")
        assert f"upstream={origin.address}" in line.string

        pibl.send_signal(signal.SIGINT)
        assert await pibl.wait_exit() == 0
        assert "stopped" in pibl.stderr
        assert_clean_output(pibl.stdout, pibl.stderr)


@bounded
async def test_sigterm_right_after_listening_still_exits_cleanly(tmp_path: Path) -> None:
    # The earliest moment a supervisor can know PIBL is up is the "listening" line; a SIGTERM
    # sent then must take the graceful path (exit 0), not the default action (killed).
    config = write_config(tmp_path / "pibl.toml", [Address("127.0.0.1", 1)])
    for _ in range(6):
        async with pibl_process("run", "-c", str(config)) as pibl:
            await pibl.wait_listening()
            pibl.send_signal(signal.SIGTERM)
            assert await pibl.wait_exit() == 0, pibl.describe()


def _occupied_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("how", ["quick", "config", "demo"])
def test_listen_address_in_use_exits_1_with_a_message(tmp_path: Path, how: str) -> None:
    with _occupied_listener() as busy:
        port = busy.getsockname()[1]
        listen = f"127.0.0.1:{port}"
        if how == "quick":
            args = ["run", "--listen", listen, "--backend", "127.0.0.1:1"]
        elif how == "config":
            config = write_config(tmp_path / "pibl.toml", [Address("127.0.0.1", 1)], listen=listen)
            args = ["run", "-c", str(config)]
        else:
            args = ["demo", "--listen", listen]
        result = run_pibl(*args)
    assert result.returncode == 1, result
    assert_clean_output(result.stdout, result.stderr)
    assert "address already in use" in result.stderr.lower()
    assert str(port) in result.stderr


def test_unopenable_access_log_exits_1_naming_the_file(tmp_path: Path) -> None:
    log_path = tmp_path / "no-such-dir" / "access.log"
    config = write_config(
        tmp_path / "pibl.toml",
        [Address("127.0.0.1", 1)],
        access_log=f'path = "{log_path}"',
    )
    result = run_pibl("run", "-c", str(config))
    assert result.returncode == 1, result
    assert_clean_output(result.stdout, result.stderr)
    assert str(log_path) in result.stderr
    assert "No such file or directory" in result.stderr


# --------------------------------------------------------------------------- demo


@pytest.mark.parametrize("listen", ["nope", "127.0.0.1:99999", "http://127.0.0.1:8080"])
def test_demo_with_a_bad_listen_address_names_the_option(listen: str) -> None:
    result = run_pibl("demo", "--listen", listen)
    assert result.returncode == 2, result
    assert_clean_output(result.stdout, result.stderr)  # the demo backends were not left open
    assert result.stderr.startswith("pibl: config error: --listen:"), result.stderr
    assert listen in result.stderr


@bounded
async def test_demo_balances_round_robin_over_three_backends_and_stops_on_sigint() -> None:
    async with pibl_process("demo", "--listen", "127.0.0.1:0") as pibl:
        banner = await pibl.wait_for(r"PIBL demo: http://([\d.]+):(\d+)/", stream="stdout")
        address = Address(banner.group(1), int(banner.group(2)))
        assert address.port != 0
        await pibl.wait_for(r"Press Ctrl-C to stop", stream="stdout")

        names = []
        for _ in range(6):
            response = await request(address, "GET", "/hello")
            assert response.status == 200
            payload = json.loads(response.body)
            assert payload["path"] == "/hello"
            assert payload["method"] == "GET"
            assert response.header("X-Backend") == payload["backend"]
            names.append(payload["backend"])
        assert len(set(names[:3])) == 3, names
        assert names[3:] == names[:3], f"not round-robin: {names}"
        assert set(names) == {"backend-1", "backend-2", "backend-3"}

        pibl.send_signal(signal.SIGINT)
        assert await pibl.wait_exit() == 0
        assert "stopped" in pibl.stderr
        assert_clean_output(pibl.stdout, pibl.stderr)
        # The demo logs each request (combined format) on stdout, after the banner.
        assert len(re.findall(r'"GET /hello HTTP/1\.1" 200 ', pibl.stdout)) == 6


@bounded
async def test_demo_backends_answer_keep_alive_post_and_head() -> None:
    async with pibl_process("demo", "--listen", "127.0.0.1:0") as pibl:
        banner = await pibl.wait_for(r"PIBL demo: http://([\d.]+):(\d+)/", stream="stdout")
        address = Address(banner.group(1), int(banner.group(2)))
        response = await request(address, "POST", "/form", body=b"a=1&b=2")
        payload = json.loads(response.body)
        assert payload["method"] == "POST"
        assert payload["request_body_bytes"] == 7
        head = await request(address, "HEAD", "/x")
        assert head.status == 200
        assert head.body == b""
        assert int(head.header("Content-Length") or 0) > 0
        pibl.send_signal(signal.SIGTERM)
        assert await pibl.wait_exit() == 0
