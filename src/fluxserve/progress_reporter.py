"""A claimed task's progress writes, which renew its lease while the worker holds it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fluxserve.errors import StoreUnavailable
from fluxserve.logs import context_about
from fluxserve.store import Store
from fluxserve.store.base import LeaseState
from fluxserve.tasks import Claim
from fluxserve.waits import set_or_timeout
from fluxserve.webhooks.progress import TaskEvents

logger = logging.getLogger(__name__)


class ProgressReporter:
    """Writes the newest progress, and renews the lease at least every third of it.

    Runs from `start` to `stop`: from the claim until the task ends or goes back,
    through the download of its references as through its engine call.
    """

    def __init__(
        self,
        store: Store,
        claim: Claim,
        lease_seconds: float,
        events: TaskEvents | None,
        *,
        on_cancel: Callable[[str], object],
    ) -> None:
        self._store = store
        self._claim = claim
        self._lease = lease_seconds
        self._events = events
        self._on_cancel = on_cancel
        self._latest = 0
        self._changed = asyncio.Event()
        self._running: asyncio.Task[None] | None = None

    def start(self) -> None:
        context = context_about(self._claim.task.task_id)
        self._running = asyncio.create_task(self._run(), context=context)

    def stop(self) -> None:
        if self._running is not None:
            self._running.cancel()

    def update(self, progress: int) -> None:
        self._latest = max(self._latest, progress)
        self._changed.set()
        if self._events is not None:
            self._events.progress(self._latest)

    async def _run(self) -> None:
        while True:
            await set_or_timeout(self._changed, self._lease / 3)
            self._changed.clear()
            try:
                lease = await self._store.report_progress(self._claim, self._latest, self._lease)
                if lease is LeaseState.LOST:
                    return
                if lease is LeaseState.CANCEL_REQUESTED:
                    # Asked through another process: stop at the next step.
                    self._on_cancel(self._claim.task.task_id)
            except StoreUnavailable as exc:
                logger.warning("progress of %s not saved: %s", self._claim.task.task_id, exc)
