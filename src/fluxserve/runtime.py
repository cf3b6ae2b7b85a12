"""Wires the pieces together for one process and runs their background loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fluxserve import retention
from fluxserve.engines import make_engine, upstream_models
from fluxserve.engines.base import Engine
from fluxserve.errors import StoreUnavailable
from fluxserve.lora_rules import LoraRules
from fluxserve.metrics import Metrics
from fluxserve.net_policy import NetPolicy
from fluxserve.service import TaskService
from fluxserve.settings import Settings
from fluxserve.storage import Storage, open_storage
from fluxserve.store import Store, store_for
from fluxserve.store.base import SubmitLimits
from fluxserve.task_feed import TaskFeed
from fluxserve.task_metrics import TaskMetrics
from fluxserve.tasks import MODELS, Task
from fluxserve.uploads import Uploads
from fluxserve.webhooks import Webhooks
from fluxserve.wire import encode, status_body

if TYPE_CHECKING:
    from fluxserve.worker_base import WorkerBase, WorkerParts

logger = logging.getLogger(__name__)


class Runtime:
    """Store, storage, service and the stream feed; plus, when asked, a worker and the
    callback dispatcher."""

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
        self.store: Store = store_for(settings)
        self.storage: Storage = open_storage(settings)
        self.metrics = Metrics()
        self.store.watch_endings(TaskMetrics(self.metrics).ended)
        self.webhooks = Webhooks(settings, self.store, self.storage, self.metrics)
        self._register_fleet_metrics()
        self.uploads = Uploads(self.store, self.storage, settings, self.policy)
        self.service = TaskService(
            self.store,
            self.policy,
            callback_policy=self.webhooks.policy,
            price=settings.price,
            limits=_limits(settings),
            idempotency_ttl=settings.idempotency_ttl,
            uploads=self.uploads,
            lora_rules=LoraRules(settings, self.policy),
        )
        self.feed = TaskFeed(self.store, self.render_status, wait=settings.poll_interval)
        self.workers: list[WorkerBase[Any]] = []
        if run_worker:
            self.workers = self._make_workers(models, engine)
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self.failure: str | None = None
        """Why a background loop ended on its own, if one did: the process must go."""
        self._failed = asyncio.Event()

    @property
    def worker(self) -> WorkerBase[Any] | None:
        """This process's worker (the local one, where it runs local and upstream models)."""
        return self.workers[0] if self.workers else None

    def _make_workers(self, models: Sequence[str], engine: Engine | None) -> list[WorkerBase[Any]]:
        """A worker for the models run here, and one for those routed upstream (bfl).

        The workers are imported here: an API-only process never loads their image code.
        """
        upstream = [] if engine is not None else upstream_models(self.settings, models)
        local = [model for model in models if model not in upstream]
        workers: list[WorkerBase[Any]] = []
        if local:
            from fluxserve.worker import Worker

            made = engine or make_engine(self.settings, local)
            workers.append(Worker(engine=made, **self._worker_parts(local)))
        if upstream:
            from fluxserve.engines.bfl import BflEngine
            from fluxserve.upstream_worker import UpstreamWorker

            bfl = BflEngine(self.settings)
            workers.append(UpstreamWorker(engine=bfl, **self._worker_parts(upstream)))
        return workers

    def _worker_parts(self, models: Sequence[str]) -> WorkerParts:
        return {
            "models": models,
            "store": self.store,
            "storage": self.storage,
            "settings": self.settings,
            "policy": self.policy,
            "events": self.webhooks.progress,
        }

    async def start(self) -> None:
        await self.store.start()
        loops = [("callbacks", self.webhooks.run()), ("sweeper", self._sweep_forever())]
        for worker in self.workers:
            loops.append(("worker", worker.run()))
        for name, body in loops:
            loop = asyncio.create_task(body, name=name)
            loop.add_done_callback(self._loop_ended)
            self._loops.append(loop)

    def _loop_ended(self, loop: asyncio.Task[None]) -> None:
        """A background loop ends only when stopped: any other end is fatal to the process.

        Nothing in the process would take over its work (a worker's tasks, the
        sweep, callbacks) while it kept answering, so it says why and goes: a
        supervisor starts a fresh one.
        """
        if loop.cancelled():
            return
        error = loop.exception()
        if self._stopping:
            return
        ended = "returned" if error is None else f"{type(error).__name__}: {error}"
        self.failure = f"{loop.get_name()} loop ended: {ended}"
        logger.critical(
            "%s; the process stops so that it can be restarted", self.failure, exc_info=error
        )
        self._failed.set()

    async def wait_for_failure(self) -> None:
        """Return once a background loop has ended on its own (see `failure`)."""
        await self._failed.wait()

    async def wait_until(self, stopping: asyncio.Event) -> int:
        """Run until `stopping` is set (exit code 0) or a background loop ends (exit code 1)."""
        waits = [asyncio.create_task(stopping.wait()), asyncio.create_task(self._failed.wait())]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
        return 0 if self.failure is None else 1

    async def stop(self) -> None:
        self._stopping = True
        for worker in self.workers:
            worker.stop_engine()
        for loop in self._loops:
            loop.cancel()
        if self._loops:
            # Waited for, not awaited: a loop that failed was reported when it ended.
            await asyncio.wait(self._loops)
        self._loops.clear()
        for worker in self.workers:
            await asyncio.to_thread(worker.close)
        await self.webhooks.aclose()
        await self.feed.close()
        await self.store.close()

    def render_status(self, task: Task, queue_position: int | None) -> str:
        """The status answer's JSON: what GET status writes, and a stream event's data."""
        return encode(status_body(task, self.storage, queue_position)).decode()

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
