#!/usr/bin/env python3
"""PIBL against nginx and HAProxy on this machine: one command, one table, JSON + PNG.

    make bench                                   # installs what is missing, then runs this
    .venv/bin/python bench/run.py [--duration S] [--rounds N] [--connections 50,256]
    .venv/bin/python bench/run.py --profile      # py-spy profile of PIBL, 1 KiB, 50 connections

What runs (everything on 127.0.0.1, ports found by binding port 0, files in a temp dir):

- three backends: nginx instances with one worker each, serving ``/1k.bin`` (1 KiB),
  ``/1m.bin`` (1 MiB) and ``/cached/1k.bin`` (the same 1 KiB with ``Cache-Control:
  max-age=3600``), from files (sendfile, open_file_cache), without an access log;
- the proxies, all in front of the three backends (round-robin, keep-alive to the backends) and
  all writing an access log to a file: nginx (1 worker, upstream keepalive, buffered log),
  HAProxy (1 thread, ``option httplog`` to stdout redirected to a file), PIBL with 1 and with 2
  workers; for cache hits, a second nginx with ``proxy_cache`` and PIBL instances with the
  memory cache;
- wrk (``--latency``) against each target in turn: every round runs every (connections, target)
  pair once, so slow drifts of the machine spread over all targets alike. The figures are the
  medians over the rounds; a target's peak RSS is the sum of VmHWM over its processes (master,
  supervisor and workers), reset (``/proc/PID/clear_refs``) before each run.

Each process is stopped when the run ends, fails or is interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KIB = 1024
MIB = 1024 * KIB
BACKENDS = 3
START_TIMEOUT = 20.0  # seconds for a server to accept connections
STOP_TIMEOUT = 10.0  # seconds for a server to exit after SIGTERM, then SIGKILL
WRK_SLACK = 30.0  # seconds beyond the run's duration before wrk is killed
WRK_TIMEOUT = "10s"  # a request slower than this counts as a wrk timeout error
TOOLS = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy"}  # command -> Debian package

SCENARIOS = {
    # name: (path, what it measures)
    "1k": ("/1k.bin", "1 KiB responses, proxied"),
    "cache": ("/cached/1k.bin", "1 KiB cache hits (nginx proxy_cache vs PIBL memory cache)"),
    "1m": ("/1m.bin", "1 MiB responses, proxied"),
}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """An ephemeral port that was free a moment ago (good enough for a benchmark)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[19]
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """Children, grandchildren ... of ``pid`` (Linux /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    for child in children.read().split():
                        found.append(int(child))
                        todo.append(int(child))
    return found


def peak_rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs the right to write clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


@dataclass
class Server:
    """A process of the benchmark (a backend or a proxy), stopped in ``stop()``."""

    name: str
    argv: list[str]
    port: int
    log: Path
    ready_line: str | None = None  # wait for this in the log instead of a connect
    proc: subprocess.Popen[bytes] | None = None
    stdout: Path | None = None

    def start(self) -> None:
        out = open(self.stdout, "ab") if self.stdout else subprocess.DEVNULL  # noqa: SIM115
        err = open(self.log, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.log.parent
            )
        finally:
            err.close()
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}\n{self.tail()}")
            if self.ready_line is not None:
                if self.ready_line in self.log.read_text(errors="replace"):
                    return
            else:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=1.0),
                ):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT}s\n{self.tail()}")

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        family = [(pid, _start_time(pid)) for pid in descendants(self.proc.pid)]
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        for pid, started in family:  # orphans: only the very processes seen before
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


class Servers:
    """Everything started, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def start(self, server: Server) -> Server:
        self.servers.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        interrupted: BaseException | None = None
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as error:  # keep stopping the others
                print(f"warning: stopping {server.name}: {error}", file=sys.stderr)
            except BaseException as error:  # a second Ctrl-C: stop the others first
                interrupted = error
                if server.proc is not None:
                    server.proc.kill()
        if interrupted is not None:
            raise interrupted


# --------------------------------------------------------------------------- configurations

NGINX_COMMON = """\
daemon off;
master_process on;
user root;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 16384; }}
"""
NGINX_TEMP_PATHS = """\
    client_body_temp_path {dir}/client_body; proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
"""


def nginx_backend_conf(directory: Path, port: int, www: Path) -> str:
    return (
        NGINX_COMMON.format(workers=1, dir=directory)
        + "http {\n"
        + NGINX_TEMP_PATHS.format(dir=directory)
        + f"""\
    access_log off;
    default_type application/octet-stream;
    sendfile on; tcp_nopush on; tcp_nodelay on;
    keepalive_requests 1000000; keepalive_timeout 120s;
    open_file_cache max=16 inactive=60s; open_file_cache_valid 3600s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location /cached/ {{ alias {www}/; add_header Cache-Control "max-age=3600"; }}
    }}
}}
"""
    )


def nginx_proxy_conf(
    directory: Path, port: int, backends: Sequence[int], keepalive: int, cache: bool
) -> str:
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in backends)
    cache_zone = (
        f"    proxy_cache_path {directory}/cache levels=1:2 keys_zone=bench:10m max_size=256m "
        "inactive=1h use_temp_path=off;\n"
        if cache
        else ""
    )
    cache_use = (
        "            proxy_cache bench;\n"
        "            add_header X-Cache-Status $upstream_cache_status;\n"
        if cache
        else ""
    )
    return (
        NGINX_COMMON.format(workers=1, dir=directory)
        + "http {\n"
        + NGINX_TEMP_PATHS.format(dir=directory)
        + cache_zone
        + f"""\
    access_log {directory}/access.log combined buffer=64k flush=1s;
    keepalive_requests 1000000; keepalive_timeout 120s;
    upstream backends {{
{servers}        keepalive {keepalive};
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Stream large responses through memory buffers, as PIBL does, not via temp files.
            proxy_max_temp_file_size 0;
{cache_use}        }}
    }}
}}
"""
    )


def haproxy_conf(port: int, backends: Sequence[int]) -> str:
    servers = "".join(f"    server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(backends, 1))
    return f"""\
global
    nbthread 1
    maxconn 4096
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend bench
    bind 127.0.0.1:{port}
    default_backend backends

backend backends
    balance roundrobin
{servers}"""


def pibl_conf(
    directory: Path, port: int, backends: Sequence[int], workers: int, cache: bool
) -> str:
    servers = ", ".join(f'"127.0.0.1:{p}"' for p in backends)
    text = f"""\
[server]
listen = "127.0.0.1:{port}"
workers = {workers}
shutdown_timeout = "2s"

[upstreams.app]
servers = [{servers}]

[access_log]
path = "{directory}/access.log"
format = "combined"
"""
    if cache:
        text += '\n[cache]\nenabled = true\nstorage = "memory"\n'
    return text


def pibl_keepalive_default() -> int:
    """PIBL's idle connections per upstream server, to give nginx the same pool."""
    try:
        sys.path.insert(0, str(ROOT / "src"))
        from pibl.config import UpstreamSettings

        return UpstreamSettings().keepalive
    except Exception:
        return 32
    finally:
        sys.path.pop(0)


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    label: str  # "direct", "nginx", "haproxy", "bare" (bench/bare.py), "pibl-1w", "pibl-2w"
    scenario: str
    port: int
    server: Server | None  # None: the backend itself (no proxy process measured)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{SCENARIOS[self.scenario][0]}"


def start_everything(servers: Servers, work: Path, only: set[str] | None) -> list[Target]:
    www = work / "www"
    www.mkdir()
    (www / "1k.bin").write_bytes(os.urandom(KIB))
    (www / "1m.bin").write_bytes(os.urandom(MIB))

    def wanted(scenario: str, label: str) -> bool:
        return only is None or scenario in only or label in only or f"{scenario}:{label}" in only

    backends: list[Server] = []
    for i in range(1, BACKENDS + 1):
        d = work / f"backend{i}"
        d.mkdir()
        port = free_port()
        conf = d / "nginx.conf"
        conf.write_text(nginx_backend_conf(d, port, www))
        argv = ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
        backends.append(servers.start(Server(f"backend{i}", argv, port, d / "stderr.log")))
    ports = [b.port for b in backends]

    proxies: dict[str, Server] = {}

    def add(name: str, make: Callable[[Path, int], tuple[list[str], str | None, bool]]) -> None:
        d = work / name
        d.mkdir()
        port = free_port()
        argv, ready, stdout_log = make(d, port)
        server = Server(
            name,
            argv,
            port,
            d / "stderr.log",
            ready_line=ready,
            stdout=d / "access.log" if stdout_log else None,
        )
        proxies[name] = servers.start(server)

    keepalive = pibl_keepalive_default() * BACKENDS

    def nginx(cache: bool) -> Callable[[Path, int], tuple[list[str], str | None, bool]]:
        def make(d: Path, port: int) -> tuple[list[str], str | None, bool]:
            conf = d / "nginx.conf"
            conf.write_text(nginx_proxy_conf(d, port, ports, keepalive, cache))
            return ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")], None, False

        return make

    def haproxy(d: Path, port: int) -> tuple[list[str], str | None, bool]:
        conf = d / "haproxy.cfg"
        conf.write_text(haproxy_conf(port, ports))
        return ["haproxy", "-db", "-f", str(conf)], None, True

    def pibl(
        workers: int, cache: bool
    ) -> Callable[[Path, int], tuple[list[str], str | None, bool]]:
        def make(d: Path, port: int) -> tuple[list[str], str | None, bool]:
            conf = d / "pibl.toml"
            conf.write_text(pibl_conf(d, port, ports, workers, cache))
            return [sys.executable, "-m", "pibl", "run", "-c", str(conf)], "listening on", False

        return make

    def bare(cache: bool) -> Callable[[Path, int], tuple[list[str], str | None, bool]]:
        def make(d: Path, port: int) -> tuple[list[str], str | None, bool]:
            argv = [
                sys.executable,
                str(ROOT / "bench" / "bare.py"),
                "--listen",
                f"127.0.0.1:{port}",
            ]
            argv += [arg for p in ports for arg in ("--backend", f"127.0.0.1:{p}")]
            return [*argv, "--cache"] if cache else argv, "listening on", False

        return make

    plan: list[tuple[str, str, str, Callable[[Path, int], Any] | None]] = []
    for scenario in ("1k", "1m"):
        plan += [
            (scenario, "direct", "", None),
            (scenario, "nginx", "nginx", nginx(cache=False)),
            (scenario, "haproxy", "haproxy", haproxy),
            (scenario, "bare", "bare", bare(cache=False)),
            (scenario, "pibl-1w", "pibl-1w", pibl(1, cache=False)),
            (scenario, "pibl-2w", "pibl-2w", pibl(2, cache=False)),
        ]
    plan += [
        ("cache", "nginx", "nginx-cache", nginx(cache=True)),
        ("cache", "bare", "bare-cache", bare(cache=True)),
        ("cache", "pibl-1w", "pibl-1w-cache", pibl(1, cache=True)),
        ("cache", "pibl-2w", "pibl-2w-cache", pibl(2, cache=True)),
    ]
    plan = [p for p in plan if wanted(p[0], p[1])]
    for _scenario, _label, name, make in plan:
        if make is not None and name not in proxies:
            add(name, make)
    for server in [*backends, *proxies.values()]:
        server.wait_ready()
    order = {"1k": 0, "cache": 1, "1m": 2}
    plan.sort(key=lambda p: order[p[0]])
    return [
        Target(label, scenario, proxies[name].port if make else ports[0], proxies.get(name))
        for scenario, label, name, make in plan
    ]


# --------------------------------------------------------------------------- wrk

_DURATION_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


@dataclass
class Run:
    scenario: str
    target: str
    connections: int
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors (connect, read, write, timeout)
    non_2xx: int
    peak_rss_kib: int | None  # summed over the target's processes; None for direct
    processes: int
    load_1min: float  # the machine's load average right after the run: others' work shows here


def parse_wrk(output: str) -> dict[str, float]:
    rps = re.search(r"Requests/sec:\s*([\d.]+)", output)
    p50 = re.search(r"^\s*50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s*99%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p99_ms": _ms(p99.group(1)),
        "requests": int(total.group(1)),
        "errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def wrk(url: str, connections: int, duration: float, threads: int) -> dict[str, float]:
    argv = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",  # wrk takes whole seconds
        f"--timeout={WRK_TIMEOUT}",
        "--latency",
        url,
    ]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + WRK_SLACK, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr}{result.stdout}")
    return parse_wrk(result.stdout)


def check_cache_hits(targets: Sequence[Target]) -> None:
    """The cache scenario measures hits: a repeated request must say so (or the run stops).

    Each PIBL worker has its own memory cache: a hit comes once the worker that answers has
    stored the response, so a few requests (new connections, spread by the kernel) are made.
    """
    for target in targets:
        if target.scenario != "cache":
            continue
        for _ in range(20):
            # A keep-alive request as wrk sends it (urllib would ask for Connection: close).
            client = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
            try:
                client.request("GET", SCENARIOS[target.scenario][0])
                response = client.getresponse()
                response.read()
                headers = response.headers
                status = f"{headers.get('Cache-Status')} {headers.get('X-Cache-Status')}"
            finally:
                client.close()
            if "hit" in status.lower():
                break
        else:
            raise RuntimeError(f"{target.label}: the cache scenario is not a cache hit: {status}")


def measure(target: Target, connections: int, duration: float, threads: int, rnd: int) -> Run:
    pids = target.server.pids() if target.server else []
    reset = all([reset_peak_rss(pid) for pid in pids])
    figures = wrk(target.url, connections, duration, threads)
    rss = sum(peak_rss_kib(pid) for pid in pids) if pids and reset else None
    return Run(
        scenario=target.scenario,
        target=target.label,
        connections=connections,
        round=rnd,
        rps=figures["rps"],
        p50_ms=figures["p50_ms"],
        p99_ms=figures["p99_ms"],
        requests=int(figures["requests"]),
        errors=int(figures["errors"]),
        non_2xx=int(figures["non_2xx"]),
        peak_rss_kib=rss,
        processes=len(pids),
        load_1min=os.getloadavg()[0],
    )


# --------------------------------------------------------------------------- summary


@dataclass
class Row:
    scenario: str
    target: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    peak_rss_mib: float | None
    rps_vs_nginx: float | None = None
    p99_vs_nginx: float | None = None
    rss_vs_nginx: float | None = None
    errors: int = 0
    rounds: list[float] = field(default_factory=list)


def summarise(runs: Sequence[Run]) -> list[Row]:
    groups: dict[tuple[str, str, int], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.scenario, run.target, run.connections)].append(run)
    rows: list[Row] = []
    for (scenario, target, connections), group in groups.items():
        rss = [r.peak_rss_kib for r in group if r.peak_rss_kib is not None]
        rows.append(
            Row(
                scenario,
                target,
                connections,
                rps=statistics.median(r.rps for r in group),
                p50_ms=statistics.median(r.p50_ms for r in group),
                p99_ms=statistics.median(r.p99_ms for r in group),
                peak_rss_mib=statistics.median(rss) / 1024 if rss else None,
                errors=sum(r.errors + r.non_2xx for r in group),
                rounds=[round(r.rps, 1) for r in group],
            )
        )
    by_key = {(r.scenario, r.target, r.connections): r for r in rows}
    for row in rows:
        ref = by_key.get((row.scenario, "nginx", row.connections))
        if ref is None:
            continue
        row.rps_vs_nginx = row.rps / ref.rps if ref.rps else None
        row.p99_vs_nginx = row.p99_ms / ref.p99_ms if ref.p99_ms else None
        if row.peak_rss_mib is not None and ref.peak_rss_mib:
            row.rss_vs_nginx = row.peak_rss_mib / ref.peak_rss_mib
    return rows


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(rows: Sequence[Row]) -> str:
    head = (
        "| scenario | target | conns | req/s | vs nginx | p50 ms | p99 ms | p99 vs nginx "
        "| peak RSS MiB | RSS vs nginx | errors |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        rss = "-" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.1f}"
        lines.append(
            f"| {r.scenario} | {r.target} | {r.connections} | {r.rps:,.0f} | {_x(r.rps_vs_nginx)} "
            f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {_x(r.p99_vs_nginx)} | {rss} "
            f"| {_x(r.rss_vs_nginx)} | {r.errors} |"
        )
    return "\n".join(lines)


def chart(rows: Sequence[Row], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (make bench installs it): no chart", file=sys.stderr)
        return False
    scenarios = [s for s in SCENARIOS if any(r.scenario == s for r in rows)]
    conns = sorted({r.connections for r in rows})
    fig, axes = plt.subplots(2, len(scenarios), figsize=(5.5 * len(scenarios), 8), squeeze=False)
    for col, scenario in enumerate(scenarios):
        targets = list(dict.fromkeys(r.target for r in rows if r.scenario == scenario))
        for line, (metric, label) in enumerate((("rps", "requests/s"), ("p99_ms", "p99 ms"))):
            ax = axes[line][col]
            width = 0.8 / len(conns)
            for i, c in enumerate(conns):
                values = []
                for t in targets:
                    row = next(
                        (
                            r
                            for r in rows
                            if (r.scenario, r.target, r.connections) == (scenario, t, c)
                        ),
                        None,
                    )
                    values.append(getattr(row, metric) if row else 0.0)
                xs = [x + (i - (len(conns) - 1) / 2) * width for x in range(len(targets))]
                ax.bar(xs, values, width, label=f"{c} connections")
            ax.set_xticks(range(len(targets)), targets, rotation=20)
            ax.set_ylabel(label)
            if metric == "p99_ms":
                ax.set_yscale("log")
            ax.set_title(f"{SCENARIOS[scenario][1]}" if line == 0 else "", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if col == 0 and line == 0:
                ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- setup


def ensure_tools(install: bool) -> None:
    missing = [pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None]
    if not missing:
        return
    if not install:
        raise SystemExit(f"missing: {', '.join(missing)} (run without --no-install)")
    if os.geteuid() != 0:
        raise SystemExit(f"missing: {', '.join(missing)}; install them (apt-get install) as root")
    print(f"installing {', '.join(missing)} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        timeout=900,
    )


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        with contextlib.suppress(Exception):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            text = (out.stdout + out.stderr).strip()
            return text.splitlines()[0] if text else "?"
        return "?"

    return {
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "python": platform.python_version(),
        "pibl": first_line([sys.executable, "-m", "pibl", "--version"]),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that every server is stopped."""

    def handler(signum: int, frame: object) -> None:
        # A second SIGTERM (make and its child both signalled, a repeated kill) must not cut
        # the clean-up short: servers left running would skew every later run.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- main modes


def benchmark(args: argparse.Namespace) -> int:
    connections = [int(c) for c in args.connections.split(",")]
    only = set(args.only.split(",")) if args.only else None
    servers = Servers()
    runs: list[Run] = []
    access_logs: dict[str, int] = {}
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="pibl-bench-") as tmp:
        try:
            targets = start_everything(servers, Path(tmp), only)
            check_cache_hits(targets)
            total = len(targets) * len(connections) * args.rounds
            eta = total * (args.duration + 0.5) + len(targets) * args.warmup
            print(
                f"{len(targets)} targets x {len(connections)} connection counts x {args.rounds} "
                f"rounds of {args.duration:g}s: about {eta / 60:.1f} min",
                flush=True,
            )
            if args.warmup > 0:
                for target in targets:
                    wrk(target.url, min(connections), args.warmup, args.threads)
            done = 0
            for rnd in range(1, args.rounds + 1):
                for conns in connections:
                    for target in targets:
                        run = measure(target, conns, args.duration, args.threads, rnd)
                        runs.append(run)
                        done += 1
                        rss = "-" if run.peak_rss_kib is None else f"{run.peak_rss_kib / 1024:.1f}"
                        warn = (
                            f"  ERRORS {run.errors} non-2xx {run.non_2xx}"
                            if (run.errors or run.non_2xx)
                            else ""
                        )
                        print(
                            f"[{done}/{total}] round {rnd} {target.scenario:5} "
                            f"{target.label:8} c={conns:<4} {run.rps:10,.0f} req/s  "
                            f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  "
                            f"RSS {rss} MiB  load {run.load_1min:.1f}{warn}",
                            flush=True,
                        )
        finally:
            servers.stop_all()
            # Proof that every proxy wrote its access log (the files go with the temp dir).
            for log in sorted(Path(tmp).glob("*/access.log")):
                access_logs[log.parent.name] = log.stat().st_size
    rows = summarise(runs)
    text = table(rows)
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + started.strftime("%Y%m%d-%H%M%S")
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "connections": connections,
        "wrk_threads": args.threads,
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "versions": versions(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "load_1min_median": statistics.median(r.load_1min for r in runs) if runs else None,
        "access_log_bytes": access_logs,
    }
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": [asdict(r) for r in rows],
                "runs": [asdict(r) for r in runs],
            },
            indent=2,
        )
        + "\n"
    )
    title = (
        f"PIBL vs nginx vs HAProxy - {meta['cpus']} CPUs, {args.duration:g}s x "
        f"{args.rounds} rounds, medians ({meta['started']})"
    )
    charted = chart(rows, out / f"{stem}.png", title)
    print(f"\nwrote {out / stem}.json" + (f" and {stem}.png" if charted else ""))
    return 0


# --------------------------------------------------------------------------- profile


def summarise_collapsed(path: Path, top: int = 25) -> str:
    """Self and inclusive time per function from py-spy's raw (collapsed stacks) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        # "function (file:line)" -> "function (file)": the same function on any line.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [re.sub(r"\(/\S*/(site-packages|src|lib/python3\.\d+)/", "(", f) for f in frames]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def profile(args: argparse.Namespace) -> int:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is missing: make bench installs it (pip install py-spy)")
    servers = Servers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "profile-native" if args.native else "profile"
    svg, text = out / f"{name}.svg", out / f"{name}-summary.txt"
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="pibl-profile-") as tmp:
        raw = Path(tmp) / "collapsed.txt"
        try:
            targets = start_everything(servers, Path(tmp), {"1k:pibl-1w"})
            (target,) = targets
            assert target.server is not None
            assert target.server.proc is not None
            pid = target.server.proc.pid
            wrk(target.url, 50, args.warmup or 2, args.threads)
            seconds = int(args.profile_duration)
            common = ["--pid", str(pid), "--duration", str(seconds), "--rate", "250"]
            if args.native:
                common.append("--native")
            else:
                common.append("--nonblocking")
            recorders = [
                subprocess.Popen(
                    [py_spy, "record", *common, "--format", fmt, "-o", str(dest)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for fmt, dest in (("raw", raw), ("flamegraph", svg))
            ]
            try:
                figures = wrk(target.url, 50, seconds + 2, args.threads)
                for rec in recorders:
                    _, err = rec.communicate(timeout=seconds + WRK_SLACK)
                    if rec.returncode != 0:
                        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
            finally:
                for rec in recorders:
                    if rec.poll() is None:
                        rec.kill()
                        rec.wait()
        finally:
            servers.stop_all()
        mode = (
            "--native (the process is paused for each sample)" if args.native else "--nonblocking"
        )
        summary = (
            f"py-spy record {mode}, {seconds}s at 250 Hz; PIBL 1 worker, 1 KiB responses, "
            f"50 connections: {figures['rps']:,.0f} req/s while profiled; "
            f"load average {os.getloadavg()[0]:.1f}\n\n" + summarise_collapsed(raw)
        )
    text.write_text(summary + "\n")
    print(summary)
    print(f"\nwrote {svg} and {text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=float(env.get("BENCH_DURATION", 10)),
        help="seconds per wrk run (env BENCH_DURATION; default 10)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(env.get("BENCH_ROUNDS", 3)),
        help="rounds over all targets (env BENCH_ROUNDS; default 3)",
    )
    parser.add_argument("--connections", default=env.get("BENCH_CONNECTIONS", "50,256"))
    parser.add_argument(
        "--threads", type=int, default=min(4, os.cpu_count() or 1), help="wrk threads"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per target, once")
    parser.add_argument(
        "--only",
        default=env.get("BENCH_ONLY", ""),
        help="comma list of scenarios (1k, cache, 1m), targets or scenario:target",
    )
    parser.add_argument("--out", default=str(RESULTS), help="directory for JSON and PNG")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get missing tools")
    parser.add_argument(
        "--profile", action="store_true", help="profile PIBL (1 worker, 1 KiB, 50 conns)"
    )
    parser.add_argument("--profile-duration", type=float, default=20.0)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("the benchmark needs Linux (/proc, SO_REUSEPORT)")
    ensure_tools(not args.no_install)
    return profile(args) if args.profile else benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
