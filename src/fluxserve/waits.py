"""Waiting for an asyncio.Event, for at most so many seconds, in a way a cancel always stops.

`asyncio.wait_for` on Python 3.11 drops a cancel that arrives as the awaited
event is set: a loop around it (a follower, a reporter, a worker's wait for a
slot) then runs on, and whoever cancelled it waits for it forever.
`asyncio.timeout` lets every cancel through.
"""

from __future__ import annotations

import asyncio
import contextlib


async def set_or_timeout(event: asyncio.Event, at_most: float) -> None:
    """Return once `event` is set, or after `at_most` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(at_most):
            await event.wait()
