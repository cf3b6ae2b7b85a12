"""Delivery of the durable outbox: terminal callbacks, retried on a schedule, never blocking.

A finished or failed task's callback row is written in the same transaction as
its status. The dispatcher claims due rows (they become `sending`, held from
other dispatchers for the attempt's length), POSTs them with bounded
concurrency, and records each attempt; a restart picks up where it stopped,
and a row whose dispatcher died is claimed again once its hold runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fluxserve.errors import StoreUnavailable
from fluxserve.logs import about_tasks
from fluxserve.store import CallbackRecord, Store
from fluxserve.store.base import Attempt
from fluxserve.webhooks.counters import WebhookMetrics
from fluxserve.webhooks.receivers import MAX_REST, Receivers
from fluxserve.webhooks.retry import RetrySchedule
from fluxserve.webhooks.sender import Event, Render, Sender, Sent

logger = logging.getLogger(__name__)

# A claim holds a row for the attempt's timeout plus this: time to load the
# task and record the outcome, after which another dispatcher may take over.
HOLD_MARGIN = 5.0


class CallbackDispatcher:
    """Delivers due outbox rows: at most `concurrency` at once, within each
    receiver's bounds (see `receivers`)."""

    def __init__(
        self,
        store: Store,
        sender: Sender,
        render: Render,
        metrics: WebhookMetrics,
        *,
        schedule: RetrySchedule,
        concurrency: int,
        per_origin: int,
        poll_interval: float,
    ) -> None:
        self.store = store
        self.sender = sender
        self.render = render
        self.metrics = metrics
        self.schedule = schedule
        self.poll_interval = poll_interval
        self._concurrency = concurrency
        self._receivers = Receivers(per_origin)
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Deliver forever; cancel to stop (in-flight deliveries are cancelled too)."""
        try:
            while True:
                free = self._concurrency - len(self._in_flight)
                if free == 0:
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    if await self._claim_and_start(free) < free:
                        await self._idle(await self._wait_time())
                except StoreUnavailable as exc:
                    # Nothing is lost: the rows wait in the database until it is back.
                    logger.warning("callbacks paused: %s", exc)
                    await asyncio.sleep(self.poll_interval)
        finally:
            jobs = list(self._in_flight)
            for job in jobs:
                job.cancel()
            # An attempt cut short is not recorded: its row stays `sending` and
            # is claimed again once the hold runs out, by this process or another.
            await asyncio.gather(*jobs, return_exceptions=True)

    async def _claim_and_start(self, free: int) -> int:
        """Claim up to `free` due rows and start those within the bounds; how many claimed."""
        due = await self.store.claim_callbacks(
            free, self.sender.timeout + HOLD_MARGIN, self._receivers.busy()
        )
        over: list[int] = []
        # Fewest attempts first: otherwise the rows a claim happens to return
        # first would always win a busy receiver's slots, and the rest starve.
        for record in sorted(due, key=lambda r: r.attempts):
            if self._receivers.has_room(record.origin):
                self._start(record)
            else:
                over.append(record.callback_id)
        if over:
            # One claim can hold more rows for a receiver than it has slots
            # left; those go back, and its origin is skipped until one frees.
            await self.store.release_callbacks(over)
        return len(due)

    def _start(self, record: CallbackRecord) -> None:
        self._receivers.take(record.origin)
        with about_tasks(record.task_id):  # the delivery's task inherits it
            job = asyncio.create_task(self._deliver(record))
        self._in_flight.add(job)
        job.add_done_callback(lambda _: self._finished(job, record.origin))

    def _finished(self, job: asyncio.Task[None], origin: str) -> None:
        self._in_flight.discard(job)
        self._receivers.give_back(origin)

    async def _wait_time(self) -> float:
        waits = [self.poll_interval]
        next_at = await self.store.next_callback_at(self._receivers.busy())
        if next_at is not None:
            waits.append(max(next_at - time.time(), 0.0))
        rest_end = self._receivers.next_rest_end()
        if rest_end is not None:
            waits.append(rest_end)
        return min(waits)

    async def _idle(self, at_most: float) -> None:
        """Wait until a callback may be due, or a delivery ends and frees its receiver."""
        waiter = asyncio.create_task(self.store.wait_for_callback(at_most))
        try:
            await asyncio.wait({waiter, *self._in_flight}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)

    async def _deliver(self, record: CallbackRecord) -> None:
        try:
            await self._attempt(record)
        except Exception:
            # The row stays `sending` and is claimed again when its hold runs out.
            logger.exception("callback %s: attempt could not be made or recorded", record.event_id)

    async def _attempt(self, record: CallbackRecord) -> None:
        task = await self.store.get_task(record.task_id)
        if task is None:
            attempt = Attempt(time.time(), 0.0, None, "task no longer exists")
            await self._record(record, Sent(attempt), retry_at=None)
            return
        try:
            body = self.render(task)
            sent = await self.sender.send(
                Event(
                    record.event_id,
                    record.event_type,
                    record.url,
                    task.owner,
                    body,
                    task.input.bfl,
                )
            )
        except StoreUnavailable:
            raise  # nothing can be recorded either; the row is claimed again later
        except Exception as exc:
            # A failure of ours, not the receiver's: still a failed attempt on the
            # schedule, so the row never stays `sending` and the backlog drains.
            logger.exception("callback %s: the attempt failed before it was sent", record.event_id)
            sent = Sent(Attempt(time.time(), 0.0, None, f"{type(exc).__name__}: {exc}"), True)
        attempt = sent.attempt
        delay = None
        if sent.retryable:
            delay = self.schedule.delay_after(record.attempts + 1, sent.retry_after)
            # The receiver is in trouble: its other events wait a little too.
            self._receivers.rest(record.origin, MAX_REST if delay is None else delay)
        if attempt.delivered:
            logger.info("callback %s delivered in %.3fs", record.event_id, attempt.duration)
        else:
            logger.warning(
                "callback %s to %s failed (attempt %d): %s; %s",
                record.event_id,
                record.url,
                record.attempts + 1,
                attempt.error,
                "giving up" if delay is None else f"retrying in {delay:.3g}s",
            )
        retry_at = None if delay is None else time.time() + delay
        await self._record(record, sent, retry_at=retry_at)

    async def _record(self, record: CallbackRecord, sent: Sent, *, retry_at: float | None) -> None:
        await self.store.record_attempt(record.callback_id, sent.attempt, retry_at=retry_at)
        self.metrics.observe(record.event_type, sent, final=retry_at is None)
