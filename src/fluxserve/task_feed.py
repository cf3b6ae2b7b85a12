"""Task changes fanned out to the streams that watch them (`GET /api/generate/stream`).

One feed per process. It takes the store's task changes (named in process,
and from other processes by LISTEN/NOTIFY on PostgreSQL: see
`Store.task_changes`) and reads a watched task once per change, however many
streams watch it; a change to a task no stream here watches costs no read. Each
stream is handed the newest snapshot: one that falls behind skips to it rather
than queueing those between. Reads are numbered as they start, and a stream is
never handed a snapshot read before one it has, so it never goes back in time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fluxserve.errors import StoreUnavailable
from fluxserve.store import Store
from fluxserve.tasks import Task, TaskStatus

logger = logging.getLogger(__name__)

Render = Callable[[Task, int | None], str]
"""A task and its queue position -> the status answer's JSON."""


def state_id(status: TaskStatus, progress: int) -> str:
    """A task's state as a stream names it (each event's `id`): the status and the
    progress that its status data shows."""
    return f"{status.value}.{100 if status is TaskStatus.FINISHED else progress}"


@dataclass(frozen=True)
class Snapshot:
    """A task's status answer as one read found it."""

    seq: int  # the read's number, taken as it started
    status: TaskStatus
    event_id: str
    data: str

    @property
    def terminal(self) -> bool:
        return self.status.terminal


class Subscription:
    """One stream's view of one task: the newest snapshot it has not taken yet."""

    def __init__(self, feed: TaskFeed, task_id: str) -> None:
        self.task_id = task_id
        self._feed = feed
        self._seen = -1
        self._pending: Snapshot | None = None
        self._ready = asyncio.Event()

    def offer(self, snapshot: Snapshot) -> None:
        pending = self._pending
        if snapshot.seq > self._seen and (pending is None or snapshot.seq > pending.seq):
            self._pending = snapshot
            self._ready.set()

    def saw(self, snapshot: Snapshot) -> None:
        """The stream has this snapshot already: older ones are never handed to it."""
        self._seen = max(self._seen, snapshot.seq)

    async def next(self) -> Snapshot:
        """The next snapshot newer than any this stream has, once there is one."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            snapshot, self._pending = self._pending, None
            if snapshot is not None and snapshot.seq > self._seen:
                self._seen = snapshot.seq
                return snapshot

    def close(self) -> None:
        """Stop watching; closing again does nothing."""
        self._feed.unsubscribe(self)


@dataclass
class _Topic:
    """A watched task: its streams, the newest snapshot, and its one read at a time."""

    subscribers: set[Subscription] = field(default_factory=set)
    latest: Snapshot | None = None
    reading: asyncio.Task[None] | None = None
    again: bool = False  # changed while being read: read once more

    def publish(self, snapshot: Snapshot) -> None:
        if self.latest is not None and snapshot.seq <= self.latest.seq:
            return
        self.latest = snapshot
        for subscriber in self.subscribers:
            subscriber.offer(snapshot)


class TaskFeed:
    """The process's watched tasks and the one loop that follows their changes."""

    def __init__(self, store: Store, render: Render, *, wait: float) -> None:
        self._store = store
        self._render = render
        self._wait = wait
        self._topics: dict[str, _Topic] = {}
        self._seq = itertools.count()
        self._follower: asyncio.Task[None] | None = None

    async def open(
        self, task_id: str, read: Callable[[], Awaitable[tuple[Task, int | None]]]
    ) -> tuple[Subscription, Snapshot]:
        """Watch `task_id`, and take its state now with `read` (the caller's own read,
        which checks who may see the task). If `read` raises, nothing is watched.

        The watch starts before the read, so no change after the read is missed.
        """
        subscription = Subscription(self, task_id)
        topic = self._topics.setdefault(task_id, _Topic())
        topic.subscribers.add(subscription)
        if self._follower is None:
            self._follower = asyncio.create_task(self._follow(), name="task-feed")
        seq = next(self._seq)
        try:
            task, position = await read()
        except BaseException:
            subscription.close()
            raise
        first = self._snapshot(seq, task, position)
        subscription.saw(first)
        topic.publish(first)
        return subscription, first

    def unsubscribe(self, subscription: Subscription) -> None:
        topic = self._topics.get(subscription.task_id)
        if topic is None:
            return
        topic.subscribers.discard(subscription)
        if not topic.subscribers:
            del self._topics[subscription.task_id]

    @property
    def streams(self) -> int:
        """How many streams watch a task now."""
        return sum(len(topic.subscribers) for topic in self._topics.values())

    async def close(self) -> None:
        """Stop following and reading; the streams' own ends are the server's."""
        jobs = [self._follower] if self._follower is not None else []
        jobs += [topic.reading for topic in self._topics.values() if topic.reading is not None]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        self._follower = None

    def _snapshot(self, seq: int, task: Task, position: int | None) -> Snapshot:
        event_id = state_id(task.status, task.progress)
        return Snapshot(seq, task.status, event_id, self._render(task, position))

    async def _follow(self) -> None:
        """Read each watched task that changed, for as long as the process runs."""
        missed = False  # a look at every watched task failed: look again
        while True:
            try:
                named = await self._store.task_changes(self._wait)
                if named is None or missed:
                    changed = await self._changed_among_watched()
                    missed = False
                else:
                    changed = set(named)
            except StoreUnavailable as exc:
                logger.warning("task changes not followed: %s; trying again", exc)
                missed = True
                await asyncio.sleep(self._wait)
                continue
            for task_id in changed:
                topic = self._topics.get(task_id)
                if topic is not None:
                    self._refresh(task_id, topic)

    async def _changed_among_watched(self) -> set[str]:
        """The watched tasks whose state differs from their newest snapshot, in one read."""
        if not self._topics:
            return set()
        states = await self._store.task_states(list(self._topics))
        changed = set()
        for task_id, (status, progress) in states.items():
            topic = self._topics.get(task_id)
            if topic is not None and (
                topic.latest is None or topic.latest.event_id != state_id(status, progress)
            ):
                changed.add(task_id)
        return changed

    def _refresh(self, task_id: str, topic: _Topic) -> None:
        if topic.reading is not None:
            topic.again = True
        else:
            topic.reading = asyncio.create_task(self._read(task_id, topic))

    async def _read(self, task_id: str, topic: _Topic) -> None:
        """Read the task into its topic; once more after each change that arrived meanwhile."""
        try:
            again = True
            while again:
                topic.again = False
                seq = next(self._seq)
                try:
                    found = await self._store.get_task_and_position(task_id)
                except StoreUnavailable as exc:
                    logger.warning("task %s not read for its streams: %s", task_id, exc)
                    return  # its next change, or the reconnect's look at all, reads it
                if found is not None:
                    topic.publish(self._snapshot(seq, *found))
                again = topic.again
        finally:
            topic.reading = None
