"""A loop that waits for an event, for at most so many seconds, stops when cancelled,
even when the cancel arrives as the event is set."""

from __future__ import annotations

import asyncio

from fluxserve.waits import set_or_timeout


async def test_a_cancel_that_arrives_as_the_event_is_set_stops_the_loop() -> None:
    event = asyncio.Event()

    async def follow() -> None:
        while True:
            await set_or_timeout(event, 30)
            event.clear()

    for yields in range(4):  # the cancel lands at each point of the wake-up
        loop = asyncio.create_task(follow())
        await asyncio.sleep(0)
        event.set()
        for _ in range(yields):
            await asyncio.sleep(0)
        loop.cancel()
        done, _ = await asyncio.wait([loop], timeout=5)
        assert loop in done and loop.cancelled(), f"still running, cancelled {yields} steps on"


async def test_it_returns_when_the_event_is_set_or_the_time_is_up() -> None:
    event = asyncio.Event()
    waiting = asyncio.create_task(set_or_timeout(event, 30))
    event.set()
    await asyncio.wait_for(waiting, 5)
    await set_or_timeout(asyncio.Event(), 0.01)  # returns, having waited its time
