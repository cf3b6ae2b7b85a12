"""The worker: claim a task, run the engine off the event loop, hand back the result.

States: NEW -> STARTING (engine loading) -> READY -> STOPPED, or DEFUNCT when the
engine cannot load. One task at a time: a worker is one GPU's (or CPU's) engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

import httpx

from fluxserve import reference_shape, results
from fluxserve.engines.base import Engine, GenerationRequest, engine_label
from fluxserve.errors import (
    EngineError,
    FetchError,
    ReferenceImageError,
    StoreUnavailable,
    UnsafeURLError,
)
from fluxserve.netguard import NetPolicy, guarded_client
from fluxserve.references import load_references
from fluxserve.settings import Settings
from fluxserve.sizes import dimensions, size_ratio
from fluxserve.storage import Storage
from fluxserve.store import Store
from fluxserve.store.base import LeaseState, Outcome
from fluxserve.tasks import CANCELLED_MESSAGE, MODELS, Claim
from fluxserve.webhooks.progress import ProgressEvents, TaskEvents

logger = logging.getLogger(__name__)

# Denoising fills progress up to here; storing the file takes it to 100.
DENOISE_SHARE = 95
USER_ERRORS = (ReferenceImageError, FetchError, UnsafeURLError, EngineError)


class WorkerState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DEFUNCT = "defunct"
    STOPPED = "stopped"


class Interrupted(Exception):
    """Raised on the engine thread at the next step when the worker must stop."""


class TaskStopped(Exception):
    """Raised on the engine thread at the next step of a cancelled or timed-out task.

    Unlike `Interrupted`, the task does not go back to the queue: it fails with
    this message.
    """


class Worker:
    """Claims tasks for `models` from `store` and runs them on `engine`."""

    def __init__(
        self,
        *,
        store: Store,
        storage: Storage,
        engine: Engine,
        settings: Settings,
        policy: NetPolicy,
        models: Sequence[str] = MODELS,
        events: ProgressEvents | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.engine = engine
        self.settings = settings
        self.policy = policy
        self.models = tuple(models)
        self.events = events
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.state = WorkerState.NEW
        self.error: str | None = None
        # Model code runs on this one thread, never on the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._stopping = threading.Event()
        # Task ids to stop at their next step; read on the engine thread.
        self._cancelled: set[str] = set()
        self._running: str | None = None

    async def run(self) -> None:
        """Load the engine, then claim and run tasks until cancelled."""
        loop = asyncio.get_running_loop()
        self.state = WorkerState.STARTING
        heartbeat = asyncio.create_task(self._heartbeat_forever())
        try:
            await loop.run_in_executor(self._executor, self.engine.load)
        except Exception as exc:
            self.state, self.error = WorkerState.DEFUNCT, f"engine failed to load: {exc}"
            logger.exception("worker %s: engine failed to load", self.worker_id)
            await self._heartbeat()
            heartbeat.cancel()
            raise
        self.state = WorkerState.READY
        logger.info("worker %s ready for %s", self.worker_id, ", ".join(self.models))
        await self._heartbeat()
        try:
            async with guarded_client(self.policy, timeout=self.settings.fetch_timeout) as client:
                while True:
                    try:
                        claim = await self.store.claim_task(
                            self.models, self.worker_id, self.settings.lease_seconds
                        )
                        if claim is None:
                            await self.store.wait_for_task(self.settings.poll_interval)
                            continue
                        await self._run_task(claim, client)
                    except StoreUnavailable as exc:
                        # The lease covers a running task meanwhile; retry once it's back.
                        logger.warning("worker %s: %s; retrying", self.worker_id, exc)
                        await asyncio.sleep(self.settings.poll_interval)
        finally:
            self.state = WorkerState.STOPPED
            heartbeat.cancel()
            with contextlib.suppress(StoreUnavailable):
                await self.store.forget_worker(self.worker_id)

    async def _heartbeat(self) -> None:
        try:
            await self.store.record_heartbeat(
                self.worker_id, self.models, self.engine.name, self.state.value
            )
        except StoreUnavailable as exc:
            logger.warning("worker %s: heartbeat not saved: %s", self.worker_id, exc)

    async def _heartbeat_forever(self) -> None:
        """Tell the fleet this worker is alive; /health counts those seen within a lease."""
        while True:
            await self._heartbeat()
            await asyncio.sleep(self.settings.lease_seconds / 3)

    def stop_engine(self) -> None:
        """Make the engine give up at its next step; the task goes back to the queue."""
        self._stopping.set()

    def cancel(self, task_id: str) -> bool:
        """Stop `task_id` at its next denoising step; it fails as cancelled.

        Returns whether the task is running on this worker now.
        """
        if self._running != task_id:
            return False
        self._cancelled.add(task_id)
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run_task(self, claim: Claim, client: httpx.AsyncClient) -> None:
        events = self.events.watch(claim.task) if self.events is not None else None
        if events is not None:
            events.running()
        reporter = _ProgressReporter(
            self.store, claim, self.settings.lease_seconds, events, on_cancel=self.cancel
        )
        heartbeat = asyncio.create_task(reporter.run())
        try:
            outcome = await self._generate(claim, client, reporter)
        except asyncio.CancelledError:
            await self.store.release_task(claim)
            raise
        except Interrupted:
            await self.store.release_task(claim)
            return
        except TaskStopped as exc:
            await self.store.fail_task(claim, str(exc))
            return
        except USER_ERRORS as exc:
            await self.store.fail_task(claim, str(exc))
            return
        except Exception as exc:
            logger.exception("task %s failed", claim.task.task_id)
            await self.store.fail_task(claim, f"Internal error: {type(exc).__name__}: {exc}")
            return
        finally:
            heartbeat.cancel()
            self._running = None
            self._cancelled.discard(claim.task.task_id)
        if not await self.store.finish_task(claim, outcome):
            logger.warning(
                "task %s: lease lost before finishing; result discarded", claim.task.task_id
            )

    async def _generate(
        self, claim: Claim, client: httpx.AsyncClient, reporter: _ProgressReporter
    ) -> Outcome:
        task = claim.task
        spec = task.input
        images = await load_references(
            spec.image_urls,
            client=client,
            policy=self.policy,
            max_bytes=self.settings.max_reference_bytes,
            max_pixels=self.settings.max_reference_pixels,
            total_timeout=self.settings.fetch_timeout,
            storage=self.storage,
        )
        reference_shape.check_loaded(images)
        reference = images[0].size if images else None
        width, height = dimensions(size_ratio(spec.size, reference), spec.resolution)
        seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
        request = GenerationRequest(
            prompt=spec.prompt,
            width=width,
            height=height,
            seed=seed,
            steps=spec.steps,
            guidance=spec.guidance,
            images=tuple(images),
            model=task.model,
        )
        loop = asyncio.get_running_loop()
        timeout = self.settings.task_timeout
        deadline = None if timeout is None else loop.time() + timeout
        self._running = task.task_id

        def on_progress(done: int, total: int) -> None:
            if self._stopping.is_set():
                raise Interrupted("worker is stopping")
            if task.task_id in self._cancelled:
                raise TaskStopped(CANCELLED_MESSAGE)
            if deadline is not None and loop.time() > deadline:
                raise TaskStopped(
                    f"Task timed out: still denoising after {timeout:g} s (step {done} of "
                    f"{total}); the limit is the task_timeout setting"
                )
            loop.call_soon_threadsafe(reporter.update, done * DENOISE_SHARE // max(total, 1))

        outputs = await loop.run_in_executor(
            self._executor, self.engine.generate, request, on_progress
        )
        files = []
        for index, image in enumerate(outputs):
            data = await asyncio.to_thread(results.encode, image, spec.output_format)
            record = results.result_file(task.task_id, index, data, spec.output_format)
            await self.storage.put(record.key, data, record.content_type)
            files.append(record)
        engine = engine_label(self.engine, task.model)
        return Outcome(engine=engine, seed=seed, width=width, height=height, files=files)


class _ProgressReporter:
    """Writes the newest progress, and renews the lease at least every third of it."""

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

    def update(self, progress: int) -> None:
        self._latest = max(self._latest, progress)
        self._changed.set()
        if self._events is not None:
            self._events.progress(self._latest)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._lease / 3)
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
