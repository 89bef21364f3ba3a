"""Load-balancing strategies: which upstream server gets the next request.

The caller (the pipeline) hands every ``select`` the servers that are usable *right now* and
not yet tried for this request, so the list can shrink, grow or reorder between calls (health
checks, drains, retries). Each strategy therefore keys any memory it keeps by ``Upstream.key``
rather than by position, and never returns a server outside the list it was given.

Strategies do no I/O and read no clock: ``select`` runs once per request on the event loop, and
being pure apart from its own small state makes it deterministic to test.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from pibl.balancer.upstream import Upstream
from pibl.http.head import RequestHead, get_cookie, get_header

__all__ = [
    "STRATEGIES",
    "ConsistentHash",
    "KeySource",
    "LeastConnections",
    "RandomTwo",
    "RoundRobin",
    "Strategy",
    "StrategyFactory",
    "WeightedRoundRobin",
    "make_strategy",
    "parse_hash_key",
]


class Strategy(Protocol):
    """Chooses one server from ``candidates`` for ``request``, or None when there is none."""

    def select(self, candidates: Sequence[Upstream], request: RequestHead) -> Upstream | None: ...


class RoundRobin:
    """Each request goes to the server after the one chosen last, ignoring weights.

    A bare counter taken modulo ``len(candidates)`` skips or repeats servers whenever the list
    changes size (a retry that leaves out the failed server, a server going down), so this
    remembers *which* server it chose and where it stood, and continues after it.
    """

    __slots__ = ("_last_index", "_last_key")

    def __init__(self) -> None:
        self._last_key: str | None = None
        self._last_index = 0

    def select(self, candidates: Sequence[Upstream], request: RequestHead) -> Upstream | None:
        n = len(candidates)
        if n == 0:
            return None
        i = self._last_index
        if not (i < n and candidates[i].key == self._last_key):
            # The list changed since last time; find the last choice by identity.
            for j, upstream in enumerate(candidates):
                if upstream.key == self._last_key:
                    i = j
                    break
            else:
                # The last choice is gone (or this is the first call): its successor has slid
                # into its slot, so start there rather than skipping that server.
                i = (i - 1) % n
        i = (i + 1) % n
        chosen = candidates[i]
        self._last_key = chosen.key
        self._last_index = i
        return chosen


class WeightedRoundRobin:
    """nginx's smooth weighted round-robin (``ngx_http_upstream_get_peer``).

    Every call adds each candidate's weight to its ``current`` score, picks the highest
    (the first on a tie, as nginx does) and takes the total weight off the winner. Over any
    window of ``sum(weights)`` requests each server gets exactly its weight's share, and the
    picks are interleaved (5,1,1 gives a a b a c a a) instead of bursting like a plain
    weighted cycle would (a a a a a b c).

    Scores are kept by ``Upstream.key``. A server left out of a call (tried already, down)
    keeps its score frozen, like nginx's skipped peers, so a retry does not disturb the
    schedule; scores of servers absent for long are dropped once they far outnumber the
    current candidates, which bounds the memory when servers come and go.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def select(self, candidates: Sequence[Upstream], request: RequestHead) -> Upstream | None:
        n = len(candidates)
        if n <= 1:
            # A lone candidate gains its weight and loses the same total: its score is
            # unchanged, so there is nothing to record (nginx's ``peers->single``).
            return candidates[0] if n else None
        current = self._current
        best = candidates[0]
        best_score = current.get(best.key, 0) + best.weight
        current[best.key] = best_score
        total = best.weight
        for k in range(1, n):
            upstream = candidates[k]
            weight = upstream.weight
            score = current.get(upstream.key, 0) + weight
            current[upstream.key] = score
            total += weight
            if score > best_score:
                best, best_score = upstream, score
        current[best.key] = best_score - total
        if len(current) > 2 * n + 64:
            keep = {upstream.key for upstream in candidates}
            self._current = {key: score for key, score in current.items() if key in keep}
        return best


class LeastConnections:
    """The server with the fewest requests in flight per unit of weight (nginx ``least_conn``).

    Loads are compared as ``in_flight / weight`` (cross-multiplied, so no floats), which makes a
    weight-3 server take three times the concurrent load of a weight-1 one. Ties, which are the
    normal case at low load when every count is zero, go to smooth weighted round-robin among
    the tied servers, exactly as nginx does; taking the first tied server instead would pile
    every quiet-period request onto one server.
    """

    __slots__ = ("_ties",)

    def __init__(self) -> None:
        self._ties = WeightedRoundRobin()

    def select(self, candidates: Sequence[Upstream], request: RequestHead) -> Upstream | None:
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        best = candidates[0]
        tied = [best]
        for k in range(1, n):
            upstream = candidates[k]
            lhs = upstream.in_flight * best.weight
            rhs = best.in_flight * upstream.weight
            if lhs < rhs:
                best = upstream
                tied = [upstream]
            elif lhs == rhs:
                tied.append(upstream)
        if len(tied) == 1:
            return best
        return self._ties.select(tied, request)


class RandomTwo:
    """Power of two random choices (Mitzenmacher, 2001; nginx ``random two least_conn``).

    Two distinct servers are drawn at random and the less loaded (``in_flight / weight``) wins.
    Against a single random pick this cuts the worst server's excess load from
    O(log n / log log n) to O(log log n), while needing no shared ordering, which keeps it
    sound when several balancers or workers route to the same pool with stale counts.

    Draws are weighted by ``weight``, as nginx's are, so weights still shape the split when
    every count is zero and the load comparison cannot tell servers apart. On a tie the first
    draw wins, which is itself a weighted random choice.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def select(self, candidates: Sequence[Upstream], request: RequestHead) -> Upstream | None:
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        total = 0
        for upstream in candidates:
            total += upstream.weight
        randrange = self._rng.randrange
        if total == n:
            # Every weight is 1: draw indexes directly, the second from the other n - 1.
            i = randrange(n)
            j = randrange(n - 1)
            if j >= i:
                j += 1
        else:
            i = _weighted_index(candidates, randrange(total), -1)
            j = _weighted_index(candidates, randrange(total - candidates[i].weight), i)
        a, b = candidates[i], candidates[j]
        return b if b.in_flight * a.weight < a.in_flight * b.weight else a


def _weighted_index(candidates: Sequence[Upstream], point: int, skip: int) -> int:
    """The index whose weight interval (laid end to end, leaving out ``skip``) holds ``point``."""
    for k, upstream in enumerate(candidates):
        if k == skip:
            continue
        point -= upstream.weight
        if point < 0:
            return k
    raise AssertionError("point beyond the total weight")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where ``ConsistentHash`` reads a request's key from; build one with ``parse_hash_key``.

    ``name`` is the lower-cased header name or the cookie name (cookie names are
    case-sensitive, RFC 6265 §5.4); it is empty for ``client_ip`` and ``uri``.
    """

    kind: Literal["client_ip", "uri", "header", "cookie"]
    name: bytes = b""

    def key_for(self, request: RequestHead) -> bytes:
        """The request's hash key; the client IP when the header or cookie is absent or empty,
        so such requests still stick to one server per client rather than all sharing one."""
        kind = self.kind
        if kind == "uri":
            return request.target
        value: bytes | None = None
        if kind == "header":
            value = get_header(request.headers, self.name)
        elif kind == "cookie":
            value = get_cookie(request.headers, self.name)
        return value if value else request.client_ip.encode()


_TCHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def parse_hash_key(spec: str) -> KeySource:
    """Parse a ``hash_key`` setting: ``client_ip``, ``uri``, ``header:NAME`` or ``cookie:NAME``.

    Names must be HTTP tokens (RFC 9110 §5.6.2, which cookie names also follow): anything
    else could never match a received field, and a key that never matches would silently
    degrade to hashing on the client IP.
    """
    kind, sep, name = spec.strip().partition(":")
    kind = kind.strip().lower()
    name = name.strip()
    if not sep and kind in ("client_ip", "uri"):
        return KeySource("client_ip" if kind == "client_ip" else "uri")
    if sep and kind in ("header", "cookie"):
        raw = name.encode("ascii", "replace")
        if not raw or not all(c in _TCHARS for c in raw):
            raise ValueError(f"hash key {spec!r}: {kind} name must be a non-empty HTTP token")
        return KeySource("header", raw.lower()) if kind == "header" else KeySource("cookie", raw)
    raise ValueError(
        f"unknown hash key {spec!r}; expected 'client_ip', 'uri', 'header:NAME' or 'cookie:NAME'"
    )


_TWO_POW_53: Final = float(1 << 53)


class ConsistentHash:
    """Weighted rendezvous (highest random weight) hashing: Thaler & Ravishankar, 1998.

    Each server scores ``-weight / ln(u)``, with ``u`` in (0, 1) drawn from a hash of the
    server's key and the request's key, and the highest score wins. That is the weighted HRW
    of Schindelhauer & Schomaker (2005): a server wins with probability ``weight / total``,
    and when a server joins or leaves only the keys it wins or loses move, about
    ``1 / (n + 1)`` of them, with no ring and no virtual nodes to keep in step with the pool.
    The cost is O(n) hashes per request, which is small for the pool sizes a proxy fronts.

    The hash is BLAKE2b, not ``hash()``: Python salts ``str``/``bytes`` hashing per process,
    which would send a key to different servers from different workers or after a restart.
    """

    __slots__ = ("_key_source",)

    def __init__(self, key_source: KeySource | None = None) -> None:
        self._key_source = key_source if key_source is not None else KeySource("client_ip")

    @property
    def key_source(self) -> KeySource:
        return self._key_source

    def select(self, candidates: Sequence[Upstream], request: RequestHead) -> Upstream | None:
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        # Hash the request key once and copy the state per server; the NUL keeps the split
        # between the two keys unambiguous.
        base = hashlib.blake2b(self._key_source.key_for(request), digest_size=8)
        base.update(b"\0")
        log = math.log
        best = candidates[0]
        best_score = -math.inf
        for upstream in candidates:
            h = base.copy()
            h.update(upstream.key.encode())
            # The top 53 bits plus one half, over 2**53: exactly representable, strictly
            # inside (0, 1), so ln(u) is finite and negative and the score positive.
            u = ((int.from_bytes(h.digest(), "big") >> 11) + 0.5) / _TWO_POW_53
            score = -upstream.weight / log(u)
            if score > best_score:
                best, best_score = upstream, score
        return best


StrategyFactory = Callable[[str, random.Random | None], Strategy]
"""Builds a strategy from the ``hash_key`` setting and an optional random source."""

STRATEGIES: Final[dict[str, StrategyFactory]] = {
    "round_robin": lambda hash_key, rng: RoundRobin(),
    "weighted_round_robin": lambda hash_key, rng: WeightedRoundRobin(),
    "least_connections": lambda hash_key, rng: LeastConnections(),
    "random_two": lambda hash_key, rng: RandomTwo(rng),
    "consistent_hash": lambda hash_key, rng: ConsistentHash(parse_hash_key(hash_key)),
}


def make_strategy(
    name: str, *, hash_key: str = "client_ip", rng: random.Random | None = None
) -> Strategy:
    """A fresh strategy for the ``balance`` setting ``name``.

    Each pool gets its own instance: strategies keep per-pool state (round-robin positions),
    and sharing one would interleave the schedules of unrelated pools.
    """
    factory = STRATEGIES.get(name)
    if factory is None:
        expected = ", ".join(repr(known) for known in STRATEGIES)
        raise ValueError(f"unknown balance {name!r}; expected one of {expected}")
    return factory(hash_key, rng)
