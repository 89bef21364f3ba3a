"""The ``pibl`` command line: parse arguments, load the config, run. No proxy logic here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pibl import __version__
from pibl.config import Settings, load_config, quick_settings
from pibl.errors import ConfigError

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

    app = ProxyApp(settings)
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
    log.info("pibl %s started", __version__)
    await stop.wait()
    log.info(
        "shutting down: finishing in-flight requests (up to %gs)", settings.server.shutdown_timeout
    )
    await app.aclose()
    log.info("stopped")


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
            return 0
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
