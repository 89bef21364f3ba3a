"""One upstream server and the live figures strategies and the pipeline read.

Availability is decided by the pipeline (health, drain, connection caps) before a strategy ever
sees the list, so strategies stay pure: they only read ``weight`` and ``in_flight``.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """

    __slots__ = ("address", "errors", "in_flight", "is_available", "key", "requests", "weight")

    def __init__(self, address: Address, weight: int = 1) -> None:
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        self.address = address
        self.key = str(address)
        self.weight = weight
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.is_available = True

    def __repr__(self) -> str:
        return f"<Upstream {self.key} weight={self.weight} in_flight={self.in_flight}>"
