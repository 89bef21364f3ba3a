"""One upstream server and the live figures strategies, the group and the admin API read.

Availability is decided by the group (operator switch, active health, passive ejection,
connection cap; see :mod:`pibl.balancer.group`) before a strategy ever sees the list, so
strategies stay pure: they only read ``weight`` and ``in_flight``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pibl.balancer.health import HealthState, OutlierState


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP address; ``str()`` gives ``host:port`` (IPv6 hosts in brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Upstream:
    """A server in an upstream pool.

    ``key`` is the stable identity used by hashing strategies: the configured address, so a
    server keeps its share of keys across restarts and reloads.

    Availability has three independent parts:

    - ``is_available``: the operator's switch (drain / disable). False takes the server out of
      rotation entirely, even in panic mode.
    - ``health``: active checks (:class:`~pibl.balancer.health.HealthState`); stays UP when the
      pool has no ``[health]`` table.
    - ``outlier``: passive ejection (:class:`~pibl.balancer.health.OutlierState`);
      ``ejected_until`` is monotonic, ``ejected_until_wall`` the same instant as a Unix time.

    ``max_connections`` (0 = unlimited) caps ``in_flight``: a server at its cap is not a
    candidate, and requests queue in the group until a slot frees.
    """

    __slots__ = (
        "address",
        "drained",
        "ejected_until_wall",
        "errors",
        "health",
        "in_flight",
        "is_available",
        "key",
        "max_connections",
        "outlier",
        "requests",
        "weight",
    )

    def __init__(self, address: Address, weight: int = 1, *, max_connections: int = 0) -> None:
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        if max_connections < 0:
            raise ValueError(f"max_connections must be >= 0, got {max_connections}")
        self.address = address
        self.key = str(address)
        self.weight = weight
        self.max_connections = max_connections
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.is_available = True
        # Drained by an operator (admin API): no new requests, in-flight ones finish; counts
        # as unavailable everywhere ``is_available`` does.
        self.drained = False
        self.health = HealthState()
        self.outlier = OutlierState()
        self.ejected_until_wall: float | None = None

    @property
    def is_healthy(self) -> bool:
        """UP as far as active checks know."""
        return self.health.is_up

    @property
    def is_ejected(self) -> bool:
        """Ejected by passive detection (as of the group's last look at the clock)."""
        return self.outlier.is_ejected

    @property
    def ejected_until(self) -> float | None:
        """Monotonic time the current ejection ends, or None."""
        return self.outlier.ejected_until

    @property
    def consecutive_failures(self) -> int:
        """Failed attempts in a row (passive detection)."""
        return self.outlier.consecutive_failures

    @property
    def ejections(self) -> int:
        """Ejections in a row; sets the length of the next one."""
        return self.outlier.ejections

    @property
    def has_capacity(self) -> bool:
        return self.max_connections == 0 or self.in_flight < self.max_connections

    def __repr__(self) -> str:
        state = "" if self.health.is_up else " down"
        if self.outlier.is_ejected:
            state += " ejected"
        return f"<Upstream {self.key} weight={self.weight} in_flight={self.in_flight}{state}>"
