"""Health of one upstream server: active checks (rise/fall) and passive outlier ejection.

Two small state machines with no I/O and no clock of their own (callers pass ``now``, a
monotonic time in seconds), so every transition is tested exhaustively and fast:

- :class:`HealthState` follows the results of active checks. A server goes DOWN after ``fall``
  consecutive failed checks and UP after ``rise`` consecutive passed ones (HAProxy's
  ``rise``/``fall``, nginx Plus ``passes``/``fails``). Servers start UP, as HAProxy's do, so a
  freshly started proxy does not answer 503 until the first checks came back; a dead server
  is taken out after ``fall`` checks, or sooner by the passive side.

- :class:`OutlierState` follows the outcome of real requests. ``max_fails`` consecutive failed
  attempts (connect errors, timeouts, resets, 5xx answers; Envoy's ``consecutive_5xx`` default
  is 5) eject the server for a period that grows each time it is ejected again:

      period(k) = min(base * k, max(MAX_EJECTION, base))      for the k-th ejection in a row

  (Envoy's ``base_ejection_time`` * ejection count, capped by ``max_ejection_time`` = 300 s).
  The server returns when the period ends. The count ``k`` is forgotten — the next ejection
  lasts ``base`` again — at the first successful attempt that comes at least one period (the
  last one) after the server returned: a server that then serves for as long as it was out has
  earned a clean record. Outcomes observed while the server is ejected (requests that were
  already in flight, requests sent in panic mode) are ignored.

The group (:mod:`pibl.balancer.group`) combines both with the operator's ``is_available`` switch
and the connection cap into the list a strategy may choose from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_FAIL_TIMEOUT",
    "DEFAULT_MAX_FAILS",
    "MAX_EJECTION",
    "EjectionPolicy",
    "HealthState",
    "OutlierState",
]

DEFAULT_MAX_FAILS = 5  # Envoy outlier_detection.consecutive_5xx
DEFAULT_FAIL_TIMEOUT = 10.0  # seconds; nginx fail_timeout and Envoy base_ejection_time: 10 s
MAX_EJECTION = 300.0  # seconds; Envoy outlier_detection.max_ejection_time


@dataclass(slots=True)
class HealthState:
    """Active-check state of one server; ``observe`` returns whether it flipped UP/DOWN.

    ``successes`` and ``failures`` are the current streaks (one of them is always 0), kept
    past the flip so an operator can see how long a server has been failing.
    """

    rise: int = 2
    fall: int = 3
    is_up: bool = True
    successes: int = 0
    failures: int = 0
    last_result: str = ""  # the last check's outcome in words, for the log and the admin API

    def __post_init__(self) -> None:
        if self.rise < 1 or self.fall < 1:
            raise ValueError(f"rise and fall must be >= 1, got {self.rise} and {self.fall}")

    def observe(self, ok: bool) -> bool:
        """Record one check result; True when this result changed ``is_up``."""
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.is_up and self.successes >= self.rise:
                self.is_up = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.is_up and self.failures >= self.fall:
                self.is_up = False
                return True
        return False


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    """When and for how long passive detection ejects a server (``max_fails = 0`` never)."""

    max_fails: int = DEFAULT_MAX_FAILS
    base: float = DEFAULT_FAIL_TIMEOUT
    cap: float = MAX_EJECTION

    def __post_init__(self) -> None:
        if self.max_fails < 0 or self.base <= 0 or self.cap <= 0:
            raise ValueError("max_fails must be >= 0, base and cap > 0")

    @property
    def is_enabled(self) -> bool:
        return self.max_fails > 0

    def period(self, ejections: int) -> float:
        """Seconds out of service for the ``ejections``-th ejection in a row (1-based)."""
        return min(self.base * ejections, max(self.cap, self.base))


@dataclass(slots=True)
class OutlierState:
    """Passive (request outcome) state of one server. Times are monotonic seconds."""

    policy: EjectionPolicy = field(default_factory=EjectionPolicy)
    consecutive_failures: int = 0
    ejections: int = 0  # ejections in a row; forgotten after a good period (module docstring)
    ejected_until: float | None = None  # set while ejected
    returned_at: float | None = None  # when the last ejection ended
    last_period: float = 0.0  # length of the last ejection

    @property
    def is_ejected(self) -> bool:
        """Ejected as of the last ``check_return``; ``is_ejected_at(now)`` reads the clock."""
        return self.ejected_until is not None

    def is_ejected_at(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    def observe(self, ok: bool, now: float) -> bool:
        """Record one attempt's outcome; True when this failure ejected the server.

        Call ``check_return(now)`` first: outcomes seen while ejected are ignored.
        """
        if self.ejected_until is not None:
            return False
        if ok:
            self.consecutive_failures = 0
            if (
                self.ejections
                and self.returned_at is not None
                and now - self.returned_at >= self.last_period
            ):
                self.ejections = 0
            return False
        self.consecutive_failures += 1
        if not self.policy.is_enabled or self.consecutive_failures < self.policy.max_fails:
            return False
        self.ejections += 1
        self.last_period = self.policy.period(self.ejections)
        self.ejected_until = now + self.last_period
        self.consecutive_failures = 0
        return True

    def check_return(self, now: float) -> bool:
        """End an ejection whose period is over; True when the server just returned."""
        until = self.ejected_until
        if until is None or now < until:
            return False
        self._come_back(until)
        return True

    def reinstate(self, now: float) -> bool:
        """End an ejection early (a passed active check, like Envoy's
        ``successful_active_health_check_uneject_host``); True when it was ejected."""
        if self.ejected_until is None:
            return False
        self._come_back(now)
        return True

    def _come_back(self, at: float) -> None:
        self.ejected_until = None
        self.returned_at = at
        self.consecutive_failures = 0
