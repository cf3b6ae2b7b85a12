"""Per-receiver bounds of the outbox dispatcher, so one bad receiver costs the others little.

A receiver is a callback URL's `scheme://host:port`. Two bounds apply to each:
  - at most `per_origin` deliveries in flight, so one that hangs holds only
    that many of the dispatcher's slots;
  - after an attempt fails in a way worth retrying, a rest (up to
    `MAX_REST` seconds) before the next attempt to it starts, so one that fails
    at once (connection refused) is not hammered by every event waiting for it,
    at the expense of the process's CPU and everyone else's deliveries.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

MAX_REST = 1.0


class Receivers:
    """Deliveries in flight and rests, per origin, in one dispatcher."""

    def __init__(self, per_origin: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_origin = per_origin
        self.clock = clock
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._rest_until: dict[str, float] = {}

    def has_room(self, origin: str) -> bool:
        return self._in_flight[origin] < self.per_origin

    def take(self, origin: str) -> None:
        self._in_flight[origin] += 1

    def give_back(self, origin: str) -> None:
        self._in_flight[origin] -= 1
        if not self._in_flight[origin]:
            del self._in_flight[origin]

    def rest(self, origin: str, seconds: float) -> None:
        """Start no attempt to `origin` for `seconds` (at most MAX_REST)."""
        until = self.clock() + min(seconds, MAX_REST)
        self._rest_until[origin] = max(until, self._rest_until.get(origin, until))

    def busy(self) -> list[str]:
        """The origins no new attempt may start to now: full, or resting."""
        now = self.clock()
        for origin in [o for o, until in self._rest_until.items() if until <= now]:
            del self._rest_until[origin]
        full = [origin for origin, n in self._in_flight.items() if n >= self.per_origin]
        return sorted({*full, *self._rest_until})

    def next_rest_end(self) -> float | None:
        """Seconds until the first rest ends; None when none is resting."""
        if not self._rest_until:
            return None
        return max(0.0, min(self._rest_until.values()) - self.clock())
