"""Callback delivery from the durable outbox, retried on a schedule, never blocking.

A finished or failed task's callback row is written in the same transaction as
its status. The dispatcher claims due rows, POSTs the status body with bounded
concurrency, and records each attempt; a restart picks up where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from fluxserve import __version__
from fluxserve.errors import UnsafeURLError
from fluxserve.store import CallbackRecord, Store

logger = logging.getLogger(__name__)

BodyFor = Callable[[str], Awaitable[dict[str, Any] | None]]
"""The callback body for a task id (its status body), or None if it is gone."""


def is_retryable(status_code: int) -> bool:
    """A receiver's answer worth retrying: 408, 429 and 5xx. Other 4xx are final."""
    return status_code in (408, 429) or status_code >= 500


class CallbackDispatcher:
    """Delivers pending callbacks; `delays[n]` is the wait after the (n+1)th failure."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        body_for: BodyFor,
        *,
        delays: list[float],
        timeout: float,
        concurrency: int,
        poll_interval: float,
    ) -> None:
        self.store = store
        self.client = client
        self.body_for = body_for
        self.delays = delays
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._concurrency = concurrency
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Deliver forever; cancel to stop (in-flight deliveries are cancelled too)."""
        try:
            while True:
                free = self._concurrency - len(self._in_flight)
                if free == 0:
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                due = await self.store.claim_callbacks(free, self.timeout + 5)
                for record in due:
                    job = asyncio.create_task(self._deliver(record))
                    self._in_flight.add(job)
                    job.add_done_callback(self._in_flight.discard)
                if len(due) < free:
                    await self.store.wait_for_callback(await self._wait_time())
        finally:
            for job in self._in_flight:
                job.cancel()

    async def _wait_time(self) -> float:
        next_at = await self.store.next_callback_at()
        if next_at is None:
            return self.poll_interval
        return min(self.poll_interval, max(next_at - time.time(), 0.0))

    async def _deliver(self, record: CallbackRecord) -> None:
        body = await self.body_for(record.task_id)
        if body is None:
            await self.store.record_attempt(
                record.callback_id, delivered=False, error="task no longer exists", retry_at=None
            )
            return
        started = time.monotonic()
        error, retryable = await self._post(record, body)
        elapsed = time.monotonic() - started
        if error is None:
            logger.info("callback %s delivered in %.3fs", record.event_id, elapsed)
            await self.store.record_attempt(
                record.callback_id, delivered=True, error=None, retry_at=None
            )
            return
        retry_at = None
        if retryable and record.attempts < len(self.delays):
            retry_at = time.time() + self.delays[record.attempts]
        logger.warning(
            "callback %s to %s failed (attempt %d): %s%s",
            record.event_id,
            record.url,
            record.attempts + 1,
            error,
            "" if retry_at else "; giving up",
        )
        await self.store.record_attempt(
            record.callback_id, delivered=False, error=error, retry_at=retry_at
        )

    async def _post(self, record: CallbackRecord, body: dict[str, Any]) -> tuple[str | None, bool]:
        """(error or None, whether to retry)."""
        headers = {
            "content-type": "application/json",
            "user-agent": f"fluxserve/{__version__}",
            "webhook-id": record.event_id,
        }
        try:
            response = await self.client.post(
                record.url,
                content=json.dumps(body).encode(),
                headers=headers,
                timeout=self.timeout,
                # A redirect is the receiver's answer, not an invitation to
                # read another server's body.
                follow_redirects=False,
            )
        except UnsafeURLError as exc:
            return f"refused: {exc}", False
        except httpx.TimeoutException:
            return f"timed out after {self.timeout:g}s", True
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, True
        if 200 <= response.status_code < 300:
            return None, False
        return f"HTTP {response.status_code}", is_retryable(response.status_code)
