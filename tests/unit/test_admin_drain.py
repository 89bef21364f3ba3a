"""``Upstream.drained``: the operator's drain counts as unavailable everywhere the group looks."""

from __future__ import annotations

from pibl.balancer.group import UpstreamGroup
from pibl.balancer.strategies import make_strategy
from pibl.balancer.upstream import Address, Upstream
from pibl.http.head import RequestHead

HEAD = RequestHead("GET", b"/", "1.1", [(b"host", b"example.com")])


def group_of(count: int) -> UpstreamGroup:
    upstreams = [Upstream(Address("127.0.0.1", 9000 + i)) for i in range(count)]
    return UpstreamGroup("app", upstreams, make_strategy("round_robin"), {})


def test_servers_start_undrained() -> None:
    assert Upstream(Address("127.0.0.1", 1)).drained is False


def test_a_drained_server_is_never_selected() -> None:
    group = group_of(3)
    group.upstreams[1].drained = True
    picks = {group.select(HEAD) for _ in range(9)}
    assert picks == {group.upstreams[0], group.upstreams[2]}
    assert not group.is_usable(group.upstreams[1])
    group.upstreams[1].drained = False
    assert {group.select(HEAD) for _ in range(9)} == set(group.upstreams)


def test_a_drained_server_stays_out_in_panic_mode() -> None:
    group = group_of(2)
    drained, down = group.upstreams
    drained.drained = True
    down.health.is_up = False  # no usable server: panic mode tries every enabled one
    assert {group.select(HEAD) for _ in range(4)} == {down}
    down.drained = True
    assert group.select(HEAD) is None
