"""When to try a failed callback again: the schedule, its jitter, and `Retry-After`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

# Answers that say "not now" rather than "never"; other 4xx are final.
RETRYABLE_STATUS = frozenset({408, 429})
# The answers whose Retry-After is honoured (RFC 9110 §10.2.3 names these two).
RETRY_AFTER_STATUS = frozenset({429, 503})


def is_retryable(status_code: int) -> bool:
    """A receiver's answer worth retrying: 408, 429 and 5xx."""
    return status_code in RETRYABLE_STATUS or status_code >= 500


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` value (seconds or an HTTP date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    # isdigit alone accepts "²" and other digits float() refuses; RFC 9110 means ASCII.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; an obsolete form may omit it
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetrySchedule:
    """`delays[n]` is the wait after the (n+1)th failed attempt; then it gives up.

    Each wait is stretched by a random fraction up to `jitter` (never shortened),
    so that events which failed together, when a receiver went down, do not all
    come back at the same instant when it returns. A `Retry-After` from the
    receiver lengthens a wait, up to the schedule's longest delay: a receiver
    may slow fluxserve to its slowest pace, but not park an event for a week.
    """

    delays: Sequence[float]
    jitter: float = 0.0
    uniform: Callable[[], float] = field(default=random.random, repr=False)

    def delay_after(self, failures: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait after `failures` failed attempts; None when the schedule is spent."""
        if not 1 <= failures <= len(self.delays):
            return None
        delay = self.delays[failures - 1]
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(self.delays)))
        return delay * (1.0 + self.jitter * self.uniform())
