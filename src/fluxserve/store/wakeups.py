"""Wake-up channels, and waiting on one: a task became claimable; a callback became due.

A write names the channels it wakes; each backend carries the wake-up to the
waiters of other processes its own way (see `sqlite.py` and `postgres.py`).
"""

from __future__ import annotations

import asyncio
import contextlib

TASKS = "fluxserve_tasks"
CALLBACKS = "fluxserve_callbacks"
"""Wake-up channels: a task became claimable; a callback became due."""


async def wait(event: asyncio.Event, at_most: float) -> None:
    # Clearing after the wake-up (not before) keeps a set() that lands between
    # a caller's empty poll and this wait from being lost.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), at_most)
    event.clear()
