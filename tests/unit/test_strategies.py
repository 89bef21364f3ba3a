"""Load-balancing strategies: distributions, stability under changing candidate lists."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.balancer.strategies import (
    STRATEGIES,
    ConsistentHash,
    KeySource,
    LeastConnections,
    RandomTwo,
    RoundRobin,
    Strategy,
    WeightedRoundRobin,
    make_strategy,
    parse_hash_key,
)
from pibl.balancer.upstream import Address, Upstream
from pibl.http.head import RequestHead


def pool(*weights: int) -> list[Upstream]:
    return [Upstream(Address("127.0.0.1", 9000 + i), weight=w) for i, w in enumerate(weights)]


def request(
    client_ip: str = "10.0.0.1",
    target: bytes = b"/x",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> RequestHead:
    return RequestHead(
        "GET",
        target,
        "1.1",
        headers if headers is not None else [(b"Host", b"a")],
        client_ip=client_ip,
    )


REQ = request()


def run(strategy: Strategy, candidates: Sequence[Upstream], times: int) -> list[Upstream]:
    chosen = []
    for _ in range(times):
        upstream = strategy.select(candidates, REQ)
        assert upstream is not None
        chosen.append(upstream)
    return chosen


def names(servers: Sequence[Upstream], chosen: Sequence[Upstream]) -> str:
    """Chosen servers as letters: the n-th server of ``servers`` is ``chr(ord("a") + n)``."""
    letter = {id(u): chr(ord("a") + i) for i, u in enumerate(servers)}
    return "".join(letter[id(u)] for u in chosen)


# --- round robin -----------------------------------------------------------------------------


def test_round_robin_in_order_and_exactly_even() -> None:
    servers = pool(1, 5, 1)  # weights are ignored
    assert names(servers, run(RoundRobin(), servers, 9)) == "abcabcabc"
    counts = Counter(run(RoundRobin(), servers, 3000))
    assert set(counts.values()) == {1000}


def test_round_robin_stays_fair_when_a_server_is_down() -> None:
    a, b, _c, d = servers = pool(1, 1, 1, 1)
    rr = RoundRobin()
    assert names(servers, run(rr, servers, 2)) == "ab"
    # c goes down right after b was chosen: c's successor d is next, then the rotation goes on.
    assert names(servers, run(rr, [a, b, d], 6)) == "dabdab"
    # c comes back: the rotation continues after b, so c is not skipped.
    assert names(servers, run(rr, servers, 4)) == "cdab"
    counts = Counter(run(rr, [a, b, d], 300))
    assert set(counts.values()) == {100}


def test_round_robin_retry_subset_does_not_skip_or_repeat() -> None:
    a, b, c = servers = pool(1, 1, 1)
    rr = RoundRobin()
    chosen = []
    for _ in range(30):
        first = rr.select(servers, REQ)
        assert first is not None
        chosen.append(first)
        # Every request fails once and is retried on the servers not yet tried.
        retry = rr.select([u for u in servers if u is not first], REQ)
        assert retry is not None
        assert retry is not first
        chosen.append(retry)
    assert names(servers, chosen[:6]) == "abcabc"
    assert Counter(chosen) == {a: 20, b: 20, c: 20}


def test_round_robin_even_while_servers_flap() -> None:
    servers = pool(1, 1, 1, 1, 1)
    rr = RoundRobin()
    rng = random.Random(7)
    counts: Counter[Upstream] = Counter()
    for _ in range(2000):
        subset = [u for u in servers if rng.random() < 0.9] or servers
        chosen = rr.select(subset, REQ)
        assert chosen is not None
        counts[chosen] += 1
    # Servers flapping in and out at random still share the requests evenly.
    assert max(counts.values()) - min(counts.values()) < 2000 * 0.05


# --- weighted round robin ----------------------------------------------------------------------


def test_weighted_round_robin_smooth_nginx_sequence() -> None:
    servers = pool(5, 1, 1)
    assert names(servers, run(WeightedRoundRobin(), servers, 14)) == "aabacaa" * 2


def test_weighted_round_robin_exact_proportions() -> None:
    servers = pool(1, 2, 3, 4)
    counts = Counter(run(WeightedRoundRobin(), servers, 10 * 100))
    assert [counts[u] for u in servers] == [100, 200, 300, 400]


def test_weighted_round_robin_equal_weights_is_round_robin() -> None:
    servers = pool(2, 2, 2)
    assert names(servers, run(WeightedRoundRobin(), servers, 6)) == "abcabc"


def test_weighted_round_robin_keeps_proportions_when_a_server_leaves() -> None:
    a, b, c = servers = pool(3, 2, 1)
    wrr = WeightedRoundRobin()
    run(wrr, servers, 4)
    counts = Counter(run(wrr, [a, c], 400))
    assert counts == {a: 300, c: 100}
    counts = Counter(run(wrr, servers, 600))
    for upstream, fair in ((a, 300), (b, 200), (c, 100)):
        assert abs(counts[upstream] - fair) <= 3


def test_weighted_round_robin_forgets_servers_gone_for_good() -> None:
    wrr = WeightedRoundRobin()
    for i in range(50):
        churn = [Upstream(Address("10.1.0.1", 1000 + 3 * i + k), weight=k + 1) for k in range(3)]
        run(wrr, churn, 3)
    assert len(wrr._current) <= 2 * 3 + 64


# --- least connections ------------------------------------------------------------------------


def test_least_connections_prefers_least_loaded() -> None:
    a, b, c = servers = pool(1, 1, 1)
    a.in_flight, b.in_flight, c.in_flight = 3, 0, 2
    assert Counter(run(LeastConnections(), servers, 50)) == {b: 50}


def test_least_connections_balances_ties_in_turn() -> None:
    a, b, c = servers = pool(1, 1, 1)
    lc = LeastConnections()
    assert names(servers, run(lc, servers, 6)) == "abcabc"
    a.in_flight, b.in_flight, c.in_flight = 1, 1, 5
    assert names(servers, run(lc, servers, 4)) == "abab"


def test_least_connections_is_weighted() -> None:
    a, b = servers = pool(1, 3)
    a.in_flight, b.in_flight = 2, 3  # 2/1 per unit of weight against 3/3
    assert run(LeastConnections(), servers, 1) == [b]
    a.in_flight, b.in_flight = 0, 0
    # Idle ties follow the weights (nginx: weighted round-robin among the tied peers).
    counts = Counter(run(LeastConnections(), servers, 400))
    assert counts == {a: 100, b: 300}


def test_least_connections_tracks_load_in_proportion_to_weight() -> None:
    servers = pool(1, 2, 5)
    lc = LeastConnections()
    rng = random.Random(1)
    busy: list[Upstream] = []
    for _ in range(5000):
        chosen = lc.select(servers, REQ)
        assert chosen is not None
        chosen.in_flight += 1
        busy.append(chosen)
        if len(busy) > 80:  # requests finish in random order
            done = busy.pop(rng.randrange(len(busy)))
            done.in_flight -= 1
    total = sum(u.in_flight for u in servers)
    for upstream in servers:
        assert abs(upstream.in_flight - total * upstream.weight / 8) <= 1


# --- random two -------------------------------------------------------------------------------


def test_random_two_spreads_evenly_at_equal_load() -> None:
    servers = pool(1, 1, 1, 1)
    counts = Counter(run(RandomTwo(random.Random(42)), servers, 10_000))
    for upstream in servers:
        assert abs(counts[upstream] - 2500) < 2500 * 0.1


def test_random_two_is_deterministic_with_a_seed() -> None:
    servers = pool(1, 2, 1, 3)
    first = run(RandomTwo(random.Random(5)), servers, 200)
    assert run(RandomTwo(random.Random(5)), servers, 200) == first


def test_random_two_favours_less_loaded() -> None:
    a, b, c, d = servers = pool(1, 1, 1, 1)
    a.in_flight, b.in_flight, c.in_flight, d.in_flight = 0, 1, 2, 3
    counts = Counter(run(RandomTwo(random.Random(3)), servers, 6000))
    # The busiest can only lose a pair; the idlest wins every pair it is drawn in (1/2).
    assert counts[d] == 0
    assert counts[a] > counts[b] > counts[c] > 0
    assert abs(counts[a] - 3000) < 300


def test_random_two_keeps_load_tighter_than_one_random_choice() -> None:
    two = pool(*[1] * 10)
    one = pool(*[1] * 10)
    p2c = RandomTwo(random.Random(11))
    rng = random.Random(11)
    for _ in range(1000):
        chosen = p2c.select(two, REQ)
        assert chosen is not None
        chosen.in_flight += 1
        rng.choice(one).in_flight += 1
    spread_two = max(u.in_flight for u in two) - min(u.in_flight for u in two)
    spread_one = max(u.in_flight for u in one) - min(u.in_flight for u in one)
    assert spread_two <= 3 < spread_one


def test_random_two_draws_by_weight() -> None:
    servers = pool(1, 2, 3, 4)
    counts = Counter(run(RandomTwo(random.Random(8)), servers, 10_000))
    for upstream in servers:
        fair = 10_000 * upstream.weight / 10
        assert abs(counts[upstream] - fair) < fair * 0.1


# --- consistent hash --------------------------------------------------------------------------


def ips(count: int) -> list[RequestHead]:
    return [request(client_ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(count)]


def assign(
    strategy: Strategy, servers: Sequence[Upstream], reqs: Sequence[RequestHead]
) -> list[str]:
    out = []
    for req in reqs:
        chosen = strategy.select(servers, req)
        assert chosen is not None
        out.append(chosen.key)
    return out


def test_consistent_hash_same_key_same_server() -> None:
    servers = pool(1, 1, 1, 1)
    reqs = ips(200)
    first = assign(ConsistentHash(), servers, reqs)
    assert assign(ConsistentHash(), servers, reqs) == first
    assert assign(ConsistentHash(), list(reversed(servers)), reqs) == first


def test_consistent_hash_is_stable_across_processes() -> None:
    # BLAKE2b, not the per-process salted hash(): this mapping must never change.
    servers = pool(1, 1, 1, 1)
    chosen = assign(ConsistentHash(), servers, ips(8))
    assert chosen == assign(ConsistentHash(KeySource("client_ip")), servers, ips(8))
    assert len(set(chosen)) > 1


def test_consistent_hash_spreads_keys_evenly() -> None:
    servers = pool(1, 1, 1, 1)
    counts = Counter(assign(ConsistentHash(), servers, ips(10_000)))
    for upstream in servers:
        assert abs(counts[upstream.key] - 2500) < 2500 * 0.2


def test_consistent_hash_weighted_shares() -> None:
    servers = pool(1, 2, 3, 4)
    counts = Counter(assign(ConsistentHash(), servers, ips(10_000)))
    for upstream in servers:
        fair = 10_000 * upstream.weight / 10
        assert abs(counts[upstream.key] - fair) < fair * 0.2


@pytest.mark.parametrize("n", [2, 4, 8])
def test_consistent_hash_adding_a_server_moves_about_one_in_n_plus_one(n: int) -> None:
    servers = pool(*[1] * (n + 1))
    reqs = ips(10_000)
    before = assign(ConsistentHash(), servers[:n], reqs)
    after = assign(ConsistentHash(), servers, reqs)
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert abs(len(moved) / len(reqs) - 1 / (n + 1)) < 0.03
    assert {new for _, new in moved} == {servers[n].key}  # keys only move to the newcomer


def test_consistent_hash_removing_a_server_moves_only_its_keys() -> None:
    servers = pool(1, 2, 1, 1, 3)
    reqs = ips(10_000)
    before = assign(ConsistentHash(), servers, reqs)
    gone = servers[1]
    after = assign(ConsistentHash(), [u for u in servers if u is not gone], reqs)
    for old, new in zip(before, after, strict=True):
        assert (old == new) == (old != gone.key)
    moved_to = Counter(new for old, new in zip(before, after, strict=True) if old == gone.key)
    assert len(moved_to) == 4  # its keys spread over the survivors, not onto one neighbour


def test_hash_key_header_and_fallback() -> None:
    servers = pool(1, 1, 1, 1, 1, 1, 1, 1)
    ch = ConsistentHash(parse_hash_key("header:X-User"))
    users = [request(client_ip=f"10.0.0.{i}", headers=[(b"x-USER", b"alice")]) for i in range(20)]
    assert len(set(assign(ch, servers, users))) == 1  # same header, any client: one server
    many = [request(headers=[(b"X-User", f"u{i}".encode())]) for i in range(50)]
    assert len(set(assign(ch, servers, many))) > 1
    missing = ips(50)
    assert assign(ch, servers, missing) == assign(ConsistentHash(), servers, missing)
    empty = [request(client_ip=r.client_ip, headers=[(b"X-User", b"")]) for r in missing]
    assert assign(ch, servers, empty) == assign(ConsistentHash(), servers, missing)


def test_hash_key_cookie_and_fallback() -> None:
    servers = pool(1, 1, 1, 1, 1, 1, 1, 1)
    ch = ConsistentHash(parse_hash_key("cookie:sid"))
    same = [
        request(client_ip=f"10.0.0.{i}", headers=[(b"Cookie", f"a=1; sid=abc; z={i}".encode())])
        for i in range(20)
    ]
    assert len(set(assign(ch, servers, same))) == 1
    many = [request(headers=[(b"Cookie", f"sid={i}".encode())]) for i in range(50)]
    assert len(set(assign(ch, servers, many))) > 1
    # Cookie names are case-sensitive: SID is not sid, so these fall back to the client IP.
    other = [request(client_ip=r.client_ip, headers=[(b"Cookie", b"SID=abc")]) for r in ips(50)]
    assert assign(ch, servers, other) == assign(ConsistentHash(), servers, ips(50))


def test_hash_key_uri() -> None:
    servers = pool(1, 1, 1, 1, 1, 1, 1, 1)
    ch = ConsistentHash(parse_hash_key("uri"))
    same = [request(client_ip=f"10.0.0.{i}", target=b"/img/1.png?v=2") for i in range(20)]
    assert len(set(assign(ch, servers, same))) == 1
    many = [request(target=f"/img/{i}.png".encode()) for i in range(50)]
    assert len(set(assign(ch, servers, many))) > 1
    query = [request(target=b"/img/1.png?v=3")]
    assert KeySource("uri").key_for(query[0]) == b"/img/1.png?v=3"  # the raw target, query too


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("client_ip", KeySource("client_ip")),
        ("uri", KeySource("uri")),
        (" URI ", KeySource("uri")),
        ("header:X-User", KeySource("header", b"x-user")),
        ("Header: X-User ", KeySource("header", b"x-user")),
        ("cookie:SessionID", KeySource("cookie", b"SessionID")),
    ],
)
def test_parse_hash_key(spec: str, expected: KeySource) -> None:
    assert parse_hash_key(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "ip", "client_ip:x", "uri:/", "header", "header:", "cookie:", "header:a b", "query:q"],
)
def test_parse_hash_key_rejects_unknown(spec: str) -> None:
    with pytest.raises(ValueError, match="hash key"):
        parse_hash_key(spec)


# --- registry ---------------------------------------------------------------------------------


def test_make_strategy_builds_each_kind() -> None:
    assert isinstance(make_strategy("round_robin"), RoundRobin)
    assert isinstance(make_strategy("weighted_round_robin"), WeightedRoundRobin)
    assert isinstance(make_strategy("least_connections"), LeastConnections)
    assert isinstance(make_strategy("random_two", rng=random.Random(1)), RandomTwo)
    ch = make_strategy("consistent_hash", hash_key="cookie:sid")
    assert isinstance(ch, ConsistentHash)
    assert ch.key_source == KeySource("cookie", b"sid")
    assert make_strategy("round_robin") is not make_strategy("round_robin")


def test_make_strategy_errors() -> None:
    with pytest.raises(
        ValueError, match=r"unknown balance 'fastest'; expected one of .*round_robin"
    ):
        make_strategy("fastest")
    with pytest.raises(ValueError, match="unknown hash key"):
        make_strategy("consistent_hash", hash_key="bogus")


# --- properties -------------------------------------------------------------------------------

SERVERS = st.lists(st.tuples(st.integers(1, 20), st.integers(0, 50)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(STRATEGIES)),
    specs=SERVERS,
    subsets=st.lists(st.lists(st.integers(0, 11), max_size=12), min_size=1, max_size=40),
    seed=st.integers(0, 2**32),
)
def test_select_returns_a_candidate_or_none(
    name: str, specs: list[tuple[int, int]], subsets: list[list[int]], seed: int
) -> None:
    servers = pool(*(weight for weight, _ in specs))
    for upstream, (_, in_flight) in zip(servers, specs, strict=True):
        upstream.in_flight = in_flight
    strategy = make_strategy(name, hash_key="header:x-k", rng=random.Random(seed))
    assert strategy.select(servers, REQ) in servers
    for indexes in subsets:
        # Any subset in any order; duplicate indexes are dropped (a pool has each server once).
        candidates = [servers[i] for i in dict.fromkeys(indexes) if i < len(servers)]
        req = request(client_ip=f"10.0.0.{len(candidates)}", headers=[(b"X-K", bytes(indexes))])
        chosen = strategy.select(candidates, req)
        if candidates:
            assert chosen is not None
            assert any(chosen is c for c in candidates)
        else:
            assert chosen is None
    assert strategy.select([], REQ) is None
