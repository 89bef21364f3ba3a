"""The admin API with ``[server] workers = N``: one admin listener, figures of every worker.

Which process serves the admin API: worker 1. The supervisor stays a synchronous, thread-less
``select`` loop so that forking is safe (see ``server/workers.py``); giving it an event loop, the
admin HTTP server and copies of the proxy's objects would undo that. Worker 1 already has all of
them, and when it dies the supervisor restarts it under the same number, so the listener comes
back (on the same port unless it is configured as 0).

How the workers talk: files in a private folder the supervisor creates (``tempfile.mkdtemp``,
mode 0700) and removes when it stops; every file is written to a temporary name and renamed, so
a reader never sees half of one. No sockets, no messages to lose, nothing for the supervisor to
relay, and a worker that dies leaves at worst a file that goes stale.

- ``worker-<N>.json``, written by worker N every ``SNAPSHOT_EVERY`` seconds and right after it
  applied a command: its request statistics (``stats_to_dict``: counters, histograms, latency
  windows), its live figures (connections, in-flight, pooled connections, cache counters, each
  server's state as this worker sees it), the last command it applied and their results.
- ``control.json``, written by worker 1 only: a sequence number, the recent commands (drain,
  enable, weight, purge, refresh) and the drain/weight state they add up to. Every worker checks
  it every ``POLL`` seconds (one ``stat``) and applies the commands it has not applied yet. A
  worker that starts (or restarts) applies the state, not the old commands: drains and weights
  survive a worker restart, an old purge is not replayed on a shared disk cache.

An action answers once every live worker's snapshot says it applied the command (or after
``ACK_TIMEOUT``, naming the workers that did not). ``/api/status``, ``/api/cache/stats`` and
``/metrics`` first issue a ``refresh`` command the same way, so the figures they merge are at
most one poll old; a worker whose snapshot is older than ``STALE_AFTER`` (dead, or stuck) is left
out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pibl.admin.stats import ProxyStats, merged_stats, stats_from_dict, stats_to_dict
from pibl.admin.status import Peers, upstream_state
from pibl.cache.key import key_from_url

if TYPE_CHECKING:
    from pibl.server.app import ProxyApp

__all__ = [
    "ACK_TIMEOUT",
    "ADMIN_WORKER",
    "ClusterNode",
    "ClusterSpec",
    "apply_command",
    "live_figures",
]

log = logging.getLogger("pibl.admin")

ADMIN_WORKER: Final = 1  # the worker number that listens for the admin API
POLL: Final = 0.1  # seconds between two looks at control.json (the delay of an action)
SNAPSHOT_EVERY: Final = 0.5  # seconds between two snapshots of a worker's figures
STALE_AFTER: Final = 3.0  # a snapshot older than this is from a dead or stuck worker
ACK_TIMEOUT: Final = 2.0  # how long an action waits for the other workers
_RECENT: Final = 64  # commands kept in control.json (a worker further behind applies the state)
_STATE_OPS: Final = ("drain", "enable", "weight")


@dataclass(frozen=True)
class ClusterSpec:
    """Where a worker stands: its number (1..workers) and the supervisor's state folder."""

    number: int
    workers: int
    state_dir: str

    @property
    def serves_admin(self) -> bool:
        return self.number == ADMIN_WORKER


def _write_json(path: str, data: Any) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file, separators=(",", ":"))
    os.replace(temporary, path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_figures(app: ProxyApp) -> dict[str, Any]:
    """What a worker's objects say right now, beyond its request statistics."""
    pools: dict[str, Any] = {}
    for group in app.groups.values():
        servers: dict[str, Any] = {}
        for upstream in group.upstreams:
            pool = group.pools.get(upstream.key)
            servers[upstream.key] = {
                "in_flight": upstream.in_flight,
                "requests": upstream.requests,
                "errors": upstream.errors,
                "active": pool.active if pool is not None else 0,
                "idle": pool.idle if pool is not None else 0,
                "connects": pool.connects if pool is not None else 0,
                "reuses": pool.reuses if pool is not None else 0,
                "state": upstream_state(upstream),
            }
        pools[group.name] = {
            "queued": getattr(group, "queued", 0),
            "rejected": getattr(group, "rejected", 0),
            "servers": servers,
        }
    cache: dict[str, int] | None = None
    if app.cache is not None:
        storage = app.cache.storage.stats()
        cache = {
            "hits": app.cache.hits,
            "misses": app.cache.misses,
            "stale": app.cache.stale,
            "revalidations": app.cache.revalidations,
            "entries": storage.get("entries", 0),
            "bytes": storage.get("bytes", 0),
            "evictions": storage.get("evictions", 0),
        }
    return {
        "connections": len(app.connections),
        "tunnels_open": app.tunnels_open,
        "tunnels_total": app.tunnels_total,
        "pools": pools,
        "cache": cache,
    }


async def apply_command(app: ProxyApp, command: dict[str, Any]) -> int:
    """Apply an admin action to this process; the number of cache entries purged (else 0).
    A pool or server this process does not know (another config) is skipped."""
    op = command.get("op")
    if op in _STATE_OPS:
        group = app.groups.get(str(command.get("pool")))
        servers = group.upstreams if group is not None else []
        upstream = next((u for u in servers if u.key == command.get("server")), None)
        if upstream is None:
            return 0
        if op == "weight":
            upstream.weight = int(command["weight"])
        else:
            upstream.drained = op == "drain"
        return 0
    if op == "purge" and app.cache is not None:
        storage = app.cache.storage
        if command.get("all"):
            return await storage.purge(None)
        key = key_from_url(str(command.get("url") or command.get("prefix")))
        if "url" in command:
            return await storage.delete(key)
        return await storage.purge(key.url)
    return 0


def _apply_state(app: ProxyApp, state: dict[str, Any]) -> None:
    for pool, servers in state.items():
        group = app.groups.get(pool)
        for upstream in group.upstreams if group is not None else ():
            entry = servers.get(upstream.key)
            if entry is None:
                continue
            if "drained" in entry:
                upstream.drained = bool(entry["drained"])
            if "weight" in entry:
                upstream.weight = int(entry["weight"])


class ClusterNode:
    """One worker's side: snapshots out, commands in; in worker 1 also the admin's side."""

    def __init__(self, app: ProxyApp, stats: ProxyStats, spec: ClusterSpec) -> None:
        self.app = app
        self.stats = stats
        self.spec = spec
        self.started = time.time()
        self.applied = 0  # the last command applied here
        self.results: dict[str, int] = {}  # command number → result, for the recent ones
        self.control: dict[str, Any] = {"seq": 0, "state": {}, "recent": []}
        self._control_id: tuple[int, int] | None = None
        self._written = 0.0
        self._task: asyncio.Task[None] | None = None

    def _path(self, name: str) -> str:
        return os.path.join(self.spec.state_dir, name)

    def _snapshot_path(self, number: int) -> str:
        return self._path(f"worker-{number}.json")

    # -- every worker ------------------------------------------------------------------------
    async def start(self) -> None:
        self.started = time.time()
        control = self._read_control()
        if control is not None:  # a restarted worker: take the drains and weights over
            self.control = control
            _apply_state(self.app, control["state"])
            self.applied = int(control["seq"])
        self.write_snapshot()
        self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(OSError):  # a stopped worker is no longer waited for
            os.unlink(self._snapshot_path(self.spec.number))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                applied = await self._poll_control()
                if applied or time.monotonic() - self._written >= SNAPSHOT_EVERY:
                    self.write_snapshot()
            except Exception:
                log.exception("worker %d: exchanging admin state failed", self.spec.number)

    def snapshot(self) -> dict[str, Any]:
        return {
            "number": self.spec.number,
            "pid": os.getpid(),
            "started": self.started,
            "written": time.time(),
            "applied": self.applied,
            "results": self.results,
            "stats": stats_to_dict(self.stats),
            **live_figures(self.app),
        }

    def write_snapshot(self) -> None:
        _write_json(self._snapshot_path(self.spec.number), self.snapshot())
        self._written = time.monotonic()

    def _read_control(self) -> dict[str, Any] | None:
        """control.json when it changed since the last read, else None."""
        path = self._path("control.json")
        try:
            st = os.stat(path)
        except OSError:
            return None
        ident = (st.st_ino, st.st_mtime_ns)
        if ident == self._control_id:
            return None
        data = _read_json(path)
        if not isinstance(data, dict):
            return None
        self._control_id = ident
        return data

    async def _poll_control(self) -> bool:
        control = self._read_control()
        if control is None or int(control["seq"]) <= self.applied:
            return False
        self.control = control
        pending = [c for c in control["recent"] if int(c["seq"]) > self.applied]
        if not pending or int(pending[0]["seq"]) != self.applied + 1:
            _apply_state(self.app, control["state"])  # fell behind: the state covers drains
        for command in pending:
            try:
                result = await apply_command(self.app, command)
            except Exception:
                log.exception("admin command %s failed", command.get("op"))
                result = 0
            self.results[str(command["seq"])] = result
            self.applied = int(command["seq"])
        for old in list(self.results)[:-_RECENT]:
            del self.results[old]
        return True

    # -- worker 1: the admin API -------------------------------------------------------------
    def peer_snapshots(self) -> list[dict[str, Any]]:
        """The latest snapshot of every other live worker."""
        now = time.time()
        found = []
        for number in range(1, self.spec.workers + 1):
            if number == self.spec.number:
                continue
            data = _read_json(self._snapshot_path(number))
            if not isinstance(data, dict) or now - float(data["written"]) > STALE_AFTER:
                continue
            if _alive(int(data["pid"])):
                found.append(data)
        return found

    def _issue(self, command: dict[str, Any]) -> int:
        seq = int(self.control["seq"]) + 1
        command = {**command, "seq": seq}
        state: dict[str, Any] = self.control["state"]
        if command["op"] in _STATE_OPS:
            entry = state.setdefault(command["pool"], {}).setdefault(command["server"], {})
            if command["op"] == "weight":
                entry["weight"] = command["weight"]
            else:
                entry["drained"] = command["op"] == "drain"
        recent = [*self.control["recent"], command][-_RECENT:]
        self.control = {"seq": seq, "state": state, "recent": recent}
        _write_json(self._path("control.json"), self.control)
        self.applied = seq  # the caller applied it here already
        return seq

    async def broadcast(self, command: dict[str, Any]) -> tuple[dict[int, int], list[int]]:
        """Have every other live worker apply ``command`` (already applied here): their
        results by worker number, and the workers that did not acknowledge in time."""
        seq = self._issue(command)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACK_TIMEOUT
        while True:
            peers = self.peer_snapshots()
            waiting = sorted(int(p["number"]) for p in peers if int(p["applied"]) < seq)
            if not waiting or loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        results = {
            int(p["number"]): int(p["results"].get(str(seq), 0))
            for p in peers
            if int(p["applied"]) >= seq
        }
        if waiting:
            log.warning("admin: workers %s did not apply %s in time", waiting, command["op"])
        return results, waiting

    async def view(self, *, refresh: bool) -> tuple[ProxyStats, Peers]:
        """Every worker's statistics merged, and the others' live figures summed."""
        if refresh:
            await self.broadcast({"op": "refresh"})
        snapshots = self.peer_snapshots()
        peers = Peers(workers=self.spec.workers)
        now = time.time()
        peers.processes.append(self._process(self.snapshot(), now))
        for pool, servers in live_figures(self.app)["pools"].items():
            for key, figures in servers["servers"].items():
                peers.states.setdefault((pool, key), {})[str(self.spec.number)] = figures["state"]
        parts = [self.stats]
        for snapshot in snapshots:
            parts.append(stats_from_dict(snapshot["stats"]))
            peers.add(snapshot)
            peers.processes.append(self._process(snapshot, now))
        peers.processes.sort(key=lambda p: int(p["number"]))
        return merged_stats(parts), peers

    @staticmethod
    def _process(snapshot: dict[str, Any], now: float) -> dict[str, Any]:
        return {
            "number": snapshot["number"],
            "pid": snapshot["pid"],
            "uptime": max(0.0, now - float(snapshot["started"])),
            "requests": snapshot["stats"]["requests"],
        }
