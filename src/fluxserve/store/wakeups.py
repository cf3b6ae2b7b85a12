"""Wake-up channels, and waiting on one: a task became claimable; a callback became due;
a task's status or progress changed.

A transaction names the channels it wakes; each database carries the wake-up to
the waiters of other processes its own way (see `sqlite.py` and `postgres.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from fluxserve.waits import set_or_timeout

TASKS = "fluxserve_tasks"
CALLBACKS = "fluxserve_callbacks"
"""Wake-up channels: a task became claimable; a callback became due."""
TASK_CHANGES = "fluxserve_task_changes"
"""A task's status or progress changed; the NOTIFY's payload is its id."""


async def wait(event: asyncio.Event, at_most: float) -> None:
    # Clearing after the wake-up (not before) keeps a set() that lands between
    # a caller's empty poll and this wait from being lost.
    await set_or_timeout(event, at_most)
    event.clear()


class TaskChanges:
    """The ids of tasks whose status or progress changed, kept for the one reader
    that takes them (a process's stream feed). Until it first asks, nothing is
    kept: a process that streams nothing gathers no ids, and its first take says
    that any task may have changed."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._unknown = True
        self._asked = False
        self._event = asyncio.Event()

    def add(self, task_ids: Iterable[str]) -> None:
        """These tasks changed."""
        if self._asked:
            self._ids.update(task_ids)
            self._event.set()

    def set(self) -> None:
        """Any task may have changed: a commit whose tasks are not known, or
        wake-ups that may have been missed."""
        if self._asked:
            self._unknown = True
            self._event.set()

    async def take(self, at_most: float) -> frozenset[str] | None:
        """The ids gathered since the last take, once there are any (or empty after
        `at_most` seconds); None when any task may have changed."""
        if self._asked:
            await wait(self._event, at_most)
        self._asked = True
        ids, unknown = self._ids, self._unknown
        self._ids, self._unknown = set(), False
        return None if unknown else frozenset(ids)


class Wakeups:
    """This process's waiters: on each channel, and on task changes."""

    def __init__(self) -> None:
        self._events = {TASKS: asyncio.Event(), CALLBACKS: asyncio.Event()}
        self.changes = TaskChanges()

    def wake(self, *channels: str) -> None:
        """Wake the waiters on `channels`; TASK_CHANGES says any task may have changed."""
        for channel in channels:
            if channel == TASK_CHANGES:
                self.changes.set()
            else:
                self._events[channel].set()

    async def wait(self, channel: str, at_most: float) -> None:
        await wait(self._events[channel], at_most)
