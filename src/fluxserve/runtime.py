"""Wires the pieces together for one process and runs their background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fluxserve import retention
from fluxserve.engines import make_engine
from fluxserve.engines.base import Engine
from fluxserve.errors import StoreUnavailable
from fluxserve.metrics import Registry
from fluxserve.netguard import NetPolicy
from fluxserve.service import TaskService
from fluxserve.settings import Settings
from fluxserve.storage import Storage, open_storage
from fluxserve.store import Store, open_store
from fluxserve.store.base import SubmitLimits
from fluxserve.tasks import MODELS
from fluxserve.webhooks import Webhooks

if TYPE_CHECKING:
    from fluxserve.worker import Worker

logger = logging.getLogger(__name__)


class Runtime:
    """Store, storage and service; plus, when asked, a worker and the callback dispatcher."""

    def __init__(
        self,
        settings: Settings,
        *,
        run_worker: bool = True,
        models: Sequence[str] = MODELS,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.policy = NetPolicy(allow_private_networks=settings.allow_private_networks)
        self.store: Store = open_store(
            settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous
        )
        self.storage: Storage = open_storage(settings)
        self.metrics = Registry()
        self.webhooks = Webhooks(settings, self.store, self.storage, self.metrics)
        self._register_fleet_metrics()
        self.service = TaskService(
            self.store,
            self.policy,
            callback_policy=self.webhooks.policy,
            price=settings.price,
            limits=_limits(settings),
            idempotency_ttl=settings.idempotency_ttl,
            storage=self.storage,
        )
        self.worker: Worker | None = None
        if run_worker:
            # Imported here: an API-only process never loads the worker's image code.
            from fluxserve.worker import Worker

            self.worker = Worker(
                store=self.store,
                storage=self.storage,
                engine=engine or make_engine(settings, models),
                settings=settings,
                policy=self.policy,
                models=models,
                events=self.webhooks.progress,
            )
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.store.start()
        self._loops.append(asyncio.create_task(self.webhooks.run(), name="callbacks"))
        self._loops.append(asyncio.create_task(self._sweep_forever(), name="sweeper"))
        if self.worker is not None:
            self._loops.append(asyncio.create_task(self.worker.run(), name="worker"))

    async def wait_until(self, stopping: asyncio.Event) -> int:
        """Run until `stopping` is set (exit code 0) or the worker dies (exit code 1)."""
        stop = asyncio.create_task(stopping.wait())
        watched = [loop for loop in self._loops if loop.get_name() == "worker"]
        done, _ = await asyncio.wait([stop, *watched], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if stop in done:
            return 0
        logger.error("worker stopped: %s", self.worker.error if self.worker else "unknown")
        return 1

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop_engine()
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        self._loops.clear()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.close)
        await self.webhooks.aclose()
        await self.store.close()

    async def _sweep_forever(self) -> None:
        """Hand back the tasks of lost workers, one process at a time; delete expired files."""
        while True:
            try:
                requeued, failed = await self.store.requeue_expired(self.settings.max_attempts)
            except StoreUnavailable as exc:
                logger.warning("sweep skipped: %s", exc)
            else:
                if requeued or failed:
                    logger.warning("lost workers: %d tasks requeued, %d failed", requeued, failed)
            await self._sweep_files()
            await asyncio.sleep(self.settings.lease_seconds / 2)

    async def _sweep_files(self) -> None:
        try:
            swept = await retention.sweep(self.store, self.storage, self.settings)
        except StoreUnavailable as exc:
            logger.warning("file retention skipped: %s", exc)
        except Exception:
            # A storage outage must not stop the sweeper: the next round retries.
            logger.exception("file retention failed")
        else:
            if swept.uploads or swept.tasks or swept.partials:
                logger.info(
                    "retention: removed %d uploads, the files of %d tasks and %d partial files",
                    swept.uploads,
                    swept.tasks,
                    swept.partials,
                )

    async def health(self) -> dict[str, Any]:
        """This process's worker, the queue per model and the fleet's live workers."""
        worker = self.worker
        live = await self.store.live_workers(self.settings.lease_seconds)
        return {
            "status": "ok",
            "worker": None
            if worker is None
            else {"state": worker.state.value, "engine": worker.engine.name, "error": worker.error},
            "queue": await self.store.queue_depths(),
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "state": w.state,
                    "engine": w.engine,
                    "models": list(w.models),
                }
                for w in live
            ],
        }

    def _register_fleet_metrics(self) -> None:
        async def workers_alive() -> float:
            return len(await self.store.live_workers(self.settings.lease_seconds))

        async def queue_depth() -> dict[tuple[str, ...], float]:
            depths = await self.store.queue_depths()
            return {(model,): float(depths.get(model, 0)) for model in MODELS}

        self.metrics.gauge(
            "fluxserve_workers_alive", "Workers whose heartbeat is within a lease", workers_alive
        )
        self.metrics.gauge(
            "fluxserve_queue_depth", "Queued tasks per model", queue_depth, labelnames=("model",)
        )


def _limits(settings: Settings) -> SubmitLimits | None:
    """The per-key submit limits; None when neither is set, so submits skip the check."""
    if settings.rate_limit_per_minute is None and settings.max_active_tasks is None:
        return None
    return SubmitLimits(settings.rate_limit_per_minute, settings.max_active_tasks)
