"""Best-effort `running` and `progress` callbacks, for tasks that ask for them.

Unlike the terminal events these are not in the outbox: each is POSTed once,
never retried, and skipped rather than queued when the receiver is slow, since
a newer one (or the terminal event) soon says more. The worker only calls
`TaskEvents.running()` and `.progress()`, which start a send and return at once.
Each send is recorded (one event with its one attempt) after it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from fluxserve.logs import about_tasks
from fluxserve.store import Store
from fluxserve.tasks import Task, new_event_id
from fluxserve.webhooks.counters import WebhookMetrics
from fluxserve.webhooks.sender import Event, Render, Sender

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
"""At most one progress event per task per this many seconds."""


class ProgressEvents:
    """Sends best-effort events: one in flight per task, `concurrency` in all."""

    def __init__(
        self,
        store: Store,
        sender: Sender,
        render: Render,
        metrics: WebhookMetrics,
        *,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.sender = sender
        self.render = render
        self.metrics = metrics
        self.concurrency = concurrency
        self.clock = clock
        self._in_flight: dict[str, asyncio.Task[None]] = {}

    def watch(self, task: Task) -> TaskEvents:
        """The events of one run of `task`; the worker holds it while the task runs."""
        return TaskEvents(self, task)

    def emit(self, task: Task, event_type: str) -> bool:
        """Start sending `task`'s status as `event_type`; False if skipped for the bounds."""
        if task.task_id in self._in_flight or len(self._in_flight) >= self.concurrency:
            self.metrics.dropped.labels(event=event_type).inc()
            return False
        with about_tasks(task.task_id):  # the send's task inherits it
            job = asyncio.create_task(self._send(task, event_type))
        self._in_flight[task.task_id] = job
        job.add_done_callback(lambda _: self._in_flight.pop(task.task_id, None))
        return True

    async def aclose(self) -> None:
        """Cancel the sends in flight and wait for them to end."""
        jobs = list(self._in_flight.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _send(self, task: Task, event_type: str) -> None:
        assert task.callback_url is not None
        event = Event(
            new_event_id(),
            event_type,
            task.callback_url,
            task.owner,
            self.render(task),
            task.input.bfl,
        )
        try:
            sent = await self.sender.send(event)
            await self.store.record_event(
                task.task_id, event.event_id, event_type, event.url, sent.attempt
            )
        except Exception:
            logger.exception("%s event of task %s could not be sent", event_type, task.task_id)
            return
        self.metrics.observe(event_type, sent, final=True)
        if not sent.attempt.delivered:
            logger.info(
                "%s event of task %s not delivered: %s",
                event_type,
                task.task_id,
                sent.attempt.error,
            )


class TaskEvents:
    """One running task's best-effort events; calls from the event loop only."""

    def __init__(self, events: ProgressEvents, task: Task) -> None:
        self._events = events
        self._task = task
        self._sent_at: float | None = None
        self._sent_progress = task.progress

    def running(self) -> None:
        """The task has started (again, after a lost worker)."""
        if self._task.wants("running"):
            self._events.emit(self._task, "running")

    def progress(self, value: int) -> None:
        """The task's progress rose to `value`; sent unless one went out within the interval."""
        if not self._task.wants("progress") or value <= self._sent_progress:
            return
        now = self._events.clock()
        if self._sent_at is not None and now - self._sent_at < PROGRESS_INTERVAL:
            return
        if self._events.emit(dataclasses.replace(self._task, progress=value), "progress"):
            self._sent_at, self._sent_progress = now, value
