"""The ``pibl`` command line: parse arguments, load the config, run. No proxy logic here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import re
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pibl import __version__
from pibl.config import HeaderEditSettings, Settings, load_config, quick_settings
from pibl.errors import ConfigError, ProtocolError
from pibl.http.head import RequestHead

if TYPE_CHECKING:
    from pibl.server.app import ProxyApp
    from pibl.server.workers import WorkerLink

log = logging.getLogger("pibl")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pibl", description="HTTP reverse proxy and load balancer"
    )
    parser.add_argument("--version", action="version", version=f"pibl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help="TOML config file")
    run.add_argument("--listen", help="address to listen on (quick start without a file)")
    run.add_argument(
        "--backend", action="append", default=[], help="upstream server host:port (repeatable)"
    )
    run.add_argument("--balance", default="round_robin", help="balancing strategy")
    run.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")

    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True)

    route = sub.add_parser(
        "route",
        help="explain which route a request would take",
        description="Explain which [[routes]] rule a request would take and why, and what "
        "happens to it there. Exit status: 0 when a route matches, 1 when none does.",
    )
    route.add_argument("-c", "--config", required=True)
    route.add_argument("url", help='e.g. "http://api.example.com/v1/users?id=7" or "/v1/users"')
    route.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar='"NAME: VALUE"',
        help="a request header field (repeatable)",
    )

    demo = sub.add_parser("demo", help="start demo backends and PIBL in front of them")
    demo.add_argument("--listen", default="127.0.0.1:8080")
    return parser


def _settings_from_args(args: argparse.Namespace) -> Settings:
    if args.config:
        if args.listen or args.backend:
            raise ConfigError("use either -c FILE or --listen/--backend, not both")
        return load_config(args.config)
    if not args.listen or not args.backend:
        raise ConfigError("pibl run needs -c FILE, or --listen ADDRESS and at least one --backend")
    return quick_settings(args.listen, args.backend, args.balance)


# --------------------------------------------------------------------------- check, route


_ROUTES_HEADER = re.compile(r"\s*\[\[\s*routes\s*\]\]")


def _route_labels(settings: Settings) -> list[str]:
    """``routes[i]``, with the line of its ``[[routes]]`` header when the file has one each."""
    labels = [f"routes[{i}]" for i in range(len(settings.routes))]
    try:
        with open(settings.source or "", encoding="utf-8") as file:
            lines = [n for n, line in enumerate(file, 1) if _ROUTES_HEADER.match(line)]
    except OSError:
        return labels
    if len(lines) != len(labels):  # routes written as an inline array: no line per rule
        return labels
    return [f"{label} (line {line})" for label, line in zip(labels, lines, strict=True)]


def _check_warnings(settings: Settings) -> list[str]:
    """Rules that can never match (an earlier one takes all their requests); header-matched
    rules whose cached responses would be shared with other routes."""
    from pibl.proxy.routing import Route, cached_by_header, shadowed

    routes = [Route.from_settings(r, r.upstream) for r in settings.routes]
    labels = _route_labels(settings)
    warnings = [
        f"{labels[index]} can never match: {labels[by]} before it matches every request it "
        "would (first match wins)"
        for index, by in shadowed(routes)
    ]
    if settings.cache.enabled:
        for index in cached_by_header(routes):
            names = ", ".join(settings.routes[index].headers or {})
            warnings.append(
                f"{labels[index]} matches on {names} and uses the cache, whose key is the URL: "
                "its responses are also served to requests for the same URL that take another "
                f"route, unless the upstream sends Vary: {names} (or set cache = false)"
            )
    return warnings


def _explain_request(url: str, header_args: Sequence[str]) -> RequestHead:
    """The request ``pibl route`` explains: ``url`` absolute (its authority is the Host) or a
    path, and ``-H "Name: value"`` fields. Raises ``ValueError`` for what PIBL would refuse."""
    from pibl.http.validate import validate_request_head

    headers: list[tuple[bytes, bytes]] = []
    for item in header_args:
        name, colon, value = item.partition(":")
        if not colon or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError(f'-H {item!r}: expected "Name: value"')
        headers.append((name.encode("latin-1"), value.strip().encode("latin-1")))
    has_host = any(name.lower() == b"host" for name, _ in headers)
    target = url
    if not url.startswith("/"):
        rest = url.split("://", 1)[1] if "://" in url else url
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, target = rest[:cut].rsplit("@", 1)[-1], rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
        if has_host:
            raise ValueError("the URL names the host already; leave out -H Host")
        headers.insert(0, (b"Host", authority.encode("latin-1")))
    elif not has_host:
        headers.insert(0, (b"Host", b""))
    try:
        return validate_request_head("GET", target.encode(), "1.1", headers, keep_alive=True)
    except ProtocolError as error:
        raise ValueError(f"{url}: not a request PIBL would accept: {error}") from None


def _describe_upstream(settings: Settings, name: str) -> list[str]:
    upstream = settings.upstreams[name]
    balance = upstream.balance
    if balance == "consistent_hash":
        balance += f" on {upstream.hash_key}"
    lines = [f'upstream pool: "{name}", balance {balance}, retries {upstream.retries}']
    for entry in upstream.servers:
        extra = f" weight {entry.weight}" if entry.weight != 1 else ""
        if entry.max_connections:
            extra += f" max_connections {entry.max_connections}"
        lines.append(f"  server {entry.address}{extra}")
    return lines


def _edits_text(edits: HeaderEditSettings | None) -> str:
    if edits is None:
        return "none"
    parts = [f"set {n}: {v}" for n, v in edits.set.items()]
    parts += [f"add {n}: {v}" for n, v in edits.add.items()]
    parts += [f"remove {n}" for n in edits.remove]
    return "; ".join(parts) or "none"


def _route_report(settings: Settings, request: RequestHead) -> tuple[list[str], bool]:
    """What ``pibl route`` prints, and whether a route matched."""
    from pibl.proxy.rewrite import strip_prefix
    from pibl.proxy.routing import Route, explain, normalize_host

    fields = ", ".join(
        f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in request.headers if v
    )
    host = normalize_host(request.host)
    lines = [
        f"request: GET {request.target.decode('latin-1')} ({fields}; routed on host "
        + (f'"{host}")' if host else "(none))")
    ]
    if not settings.routes:
        name = settings.default_upstream or "default"
        lines.append(f'no [[routes]]: every request goes to the upstream pool "{name}"')
        return [*lines, *_describe_upstream(settings, name)], True
    routes = [Route.from_settings(r, r.upstream) for r in settings.routes]
    labels = _route_labels(settings)
    decision = explain(routes, request)
    for index, reason in decision.skipped:
        lines.append(f"{labels[index]}: skipped, {reason}")
    if decision.matched is None:
        lines.append("no route matches: PIBL answers 404 Not Found")
        return lines, False
    index = decision.matched
    route, chosen = routes[index], settings.routes[index]
    conditions = ", ".join(route.conditions()) or "no conditions: matches every request"
    lines.append(f"{labels[index]}: MATCHED ({conditions})")
    if index + 1 < len(routes):
        lines.append(f"  (the {len(routes) - index - 1} rule(s) after it are not considered)")
    lines += _describe_upstream(settings, chosen.upstream)
    target = request.target
    if route.strip_prefix and route.path_prefix is not None:
        target = strip_prefix(target, route.path_prefix)
        prefix = route.path_prefix.decode()
        lines.append(f'target sent upstream: {target.decode("latin-1")} (strip_prefix "{prefix}")')
    else:
        lines.append(f"target sent upstream: {target.decode('latin-1')} (unchanged)")
    if not settings.cache.enabled:
        lines.append("cache: off ([cache] enabled = false)")
    else:
        lines.append("cache: " + ("on" if route.cache else "off (cache = false)"))
    limit = route.max_body_size or settings.server.max_body_size
    source = "the route's" if route.max_body_size else "the server's"
    lines.append(
        f"max_body_size: {limit} bytes ({source})" if limit else "max_body_size: unlimited"
    )
    lines.append(f"request header edits: {_edits_text(chosen.request_headers)}")
    lines.append(f"response header edits: {_edits_text(chosen.response_headers)}")
    return lines, True


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _install_loop(use_uvloop: bool) -> None:
    if use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    settings: Settings, *, banner: str | None = None, worker: WorkerLink | None = None
) -> None:
    """Run the proxy until SIGTERM or SIGINT, then shut down gracefully.

    ``worker``: this process is one of several workers forked by ``server.workers.supervise``.
    """
    from pibl.server.app import ProxyApp

    cluster = None
    if worker is not None and worker.state_dir is not None:
        from pibl.admin.cluster import ClusterSpec

        cluster = ClusterSpec(worker.number, settings.server.workers, worker.state_dir)
    app = ProxyApp(settings, cluster=cluster)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers first: "listening on ..." tells a supervisor that PIBL is up, and a signal sent
    # right after it must take the graceful path, not the default action (killed by SIGTERM).
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Looked up at signal time: a reload may have replaced the access log.
    loop.add_signal_handler(signal.SIGUSR1, lambda: app.access_log.reopen())
    reloading: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(_reload(app))
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if worker is None:
        await app.start()
    else:
        await app.start(worker.listen, reuse_port=True, log_listening=False)
        worker.started(stop.set)
    if banner:
        print(banner.format(url=f"http://{app.addresses[0]}"), flush=True)
    _tune_gc()
    _tune_malloc()
    log.info("pibl %s started", __version__)
    await stop.wait()
    log.info(
        "shutting down: finishing in-flight requests (up to %gs)", settings.server.shutdown_timeout
    )
    await app.aclose()
    log.info("stopped")


# Tracked objects allocated (net) before the youngest generation is collected; CPython's is 700.
YOUNG_GC_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Set the cycle collector up for a long-running server, once everything is built."""
    # Everything built so far (modules, config, pools) lives as long as the process: moving it
    # out of the collector's reach keeps every full collection short (CPython's gc.freeze
    # advice for servers; imports alone are tens of thousands of tracked objects).
    gc.collect()
    gc.freeze()
    # A request in flight holds about 30 objects the collector tracks (heads, header lists,
    # the exchange, its future, the access record). With 256 connections that working set
    # alone keeps the youngest generation over CPython's threshold of 700, so it was collected
    # some 600 times a second and the collector took 4-5 % of the CPU (measured with
    # gc.callbacks under wrk -c256); at 50 connections it hardly ran. A threshold above any
    # likely in-flight set collects as often as the garbage, not the traffic, asks for.
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, oldest)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _tune_malloc() -> None:
    """Keep large buffers on the heap (glibc). A read of a streamed body is a bytes object of up
    to 256 KiB, which glibc may serve with mmap and hand back with munmap every time: page faults
    were then the largest cost of 1 MiB responses (exc_page_fault 17 % of the CPU, half the
    throughput: 950 against 2,070 responses/s). glibc normally raises its mmap threshold after
    the first such free, but not reliably (it did under the console script, not under
    ``python -m pibl``). A fixed 1 MiB threshold, and a heap trimmed only beyond 8 MiB free,
    keep those buffers in reused heap memory."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl, macOS): nothing to tune
    mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 8 * 1024 * 1024)


async def _reload(app: ProxyApp) -> None:
    """SIGHUP: re-read the same config file; an invalid one is logged and the old one kept."""
    source = app.settings.source
    if source is None:
        log.warning("SIGHUP: PIBL was started without a config file; nothing to reload")
        return
    try:
        settings = load_config(source)
    except ConfigError as error:
        log.error("reload refused, the running configuration stays: %s", error)
        return
    try:
        await app.reload(settings)
    except Exception:
        log.exception("reload failed; the running configuration stays")


async def _demo(listen: str) -> None:
    from pibl.config import parse_config
    from pibl.demo import server_address, start_demo_backends

    # Check --listen before anything starts: a typo is reported as the option's ("--listen: ..."),
    # and no demo backend is left open behind the error.
    quick_settings(listen, ["127.0.0.1:1"])
    backends = await start_demo_backends(3)
    servers = [str(server_address(b)) for b in backends]
    banner = (
        "PIBL demo: {url}/ is balanced round-robin over 3 backends (" + ", ".join(servers) + ").\n"
        'Try:  curl -s {url}/hello          (repeat it: the "backend" field changes each time)\n'
        "      curl -si {url}/static/logo   (again within 60 s: Cache-Status: pibl; hit)\n"
        "Press Ctrl-C to stop."
    )
    try:
        settings = parse_config(
            {
                "server": {"listen": listen},
                "upstreams": {"demo": {"servers": servers, "balance": "round_robin"}},
                "access_log": {"path": "-", "format": "combined"},
                # The original design's fixed 60 s lifetime, for responses without freshness.
                "cache": {"enabled": True, "storage": "memory", "default_ttl": "60s"},
            },
            source="<demo>",
        )
        await serve(settings, banner=banner)
    finally:
        for backend in backends:
            backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            settings = load_config(args.config)
            pools, routes = len(settings.upstreams), len(settings.routes)
            print(f"{args.config}: OK ({pools} upstream pool(s), {routes} route(s))")
            for warning in _check_warnings(settings):
                print(f"{args.config}: warning: {warning}", file=sys.stderr)
            return 0
        if args.command == "route":
            settings = load_config(args.config)
            try:
                request = _explain_request(args.url, args.header)
            except ValueError as error:
                print(f"pibl route: {error}", file=sys.stderr)
                return 2
            lines, matched = _route_report(settings, request)
            print("\n".join(lines))
            return 0 if matched else 1
        if args.command == "demo":
            configure_logging("info")
            _install_loop(True)
            asyncio.run(_demo(args.listen))
            return 0
        settings = _settings_from_args(args)
        configure_logging(settings.log.level)
        _install_loop(not args.no_uvloop)
        if settings.server.workers > 1:
            from pibl.server.workers import supervise

            return supervise(settings, lambda link: asyncio.run(serve(settings, worker=link)))
        asyncio.run(serve(settings))
        return 0
    except ConfigError as error:
        print(f"pibl: config error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        message = error.strerror or str(error)
        if error.filename is not None:
            # e.g. an access log that cannot be opened: say which file.
            message = f"{error.filename}: {message}"
        print(f"pibl: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
