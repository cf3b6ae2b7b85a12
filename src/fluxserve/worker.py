"""The worker: claim tasks, run the engine off the event loop, hand back the results.

States: NEW -> STARTING (engine loading) -> READY -> STOPPED, or DEFUNCT when the
engine cannot load or the loop ends on an error outside any task. Whatever a task's
own work raises (an engine's `BaseException` too, such as the panic of a tokenizer
written in Rust) fails that task, and the worker takes the next one; only the
process being asked to stop (`STOP_SIGNALS`) goes past a task.

One engine call at a time: a worker is one GPU's (or CPU's) engine. With
`max_batch_size` above 1, and an engine that batches, that call draws up to that
many queued tasks of one shape together; each task still has its own lease,
progress, seed, files and ending. A task with reference images is prepared in the
background while the engine runs others (see `prefetch`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Unpack

import httpx
from PIL import Image

from fluxserve import results
from fluxserve.engine_stops import Cancelled, Interrupted, TaskStopped
from fluxserve.engines.base import (
    Engine,
    GenerationRequest,
    batches,
    engine_label,
    generate_batch,
)
from fluxserve.errors import StoreUnavailable
from fluxserve.logs import about_tasks
from fluxserve.lora_fetch import LoraSource
from fluxserve.netguard import guarded_client
from fluxserve.prefetch import Prefetch, engine_request
from fluxserve.progress_reporter import ProgressReporter
from fluxserve.store.base import Outcome
from fluxserve.tasks import CANCELLED_MESSAGE, Claim
from fluxserve.worker_base import (
    DENOISE_SHARE,
    STOP_SIGNALS,
    USER_ERRORS,
    WorkerBase,
    WorkerParts,
    internal_error,
)
from fluxserve.worker_base import WorkerState as WorkerState

logger = logging.getLogger(__name__)

# A batch's companions come from this many times its size of the queue's front.
BATCH_LOOKAHEAD = 4
# Claimed tasks whose references download while the engine runs others: a few, as
# each is taken from the queue, where another worker could have run it.
PREFETCH_LIMIT = 4


@dataclass(frozen=True)
class _Job:
    """A claimed task, what it asks the engine for, and where its progress goes."""

    claim: Claim
    request: GenerationRequest
    reporter: ProgressReporter

    @property
    def task_id(self) -> str:
        return self.claim.task.task_id


class Worker(WorkerBase[Engine]):
    """Claims tasks for `models` from `store` and runs them on `engine`."""

    def __init__(self, *, engine: Engine, **parts: Unpack[WorkerParts]) -> None:
        super().__init__(engine=engine, **parts)
        # Engines that cannot batch get one task per call.
        self.batch_size = self.settings.max_batch_size if batches(engine) else 1
        # Model code runs on this one thread, never on the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._stopping = threading.Event()
        self._running: frozenset[str] = frozenset()
        self._prefetch: Prefetch[_Job] = Prefetch(PREFETCH_LIMIT)
        self.loras = LoraSource(self.settings, self.policy)

    async def _load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.load)

    async def _claim_and_run_forever(self) -> None:
        async with guarded_client(self.policy, timeout=self.settings.fetch_timeout) as client:
            try:
                while True:
                    try:
                        await self._run_next(client)
                    except StoreUnavailable as exc:
                        # The lease covers a running task meanwhile; retry once it's back.
                        logger.warning("worker %s: %s; retrying", self.worker_id, exc)
                        await asyncio.sleep(self.settings.poll_interval)
            finally:
                # Fetches end handing their tasks back; fetched tasks go back too.
                for job in await self._prefetch.stop():
                    await self._let_go(job.claim, job.reporter, None)

    async def _run_next(self, client: httpx.AsyncClient) -> None:
        """Run a task whose references are in, else claim more, else wait for either."""
        job = self._prefetch.take()
        if job is not None:
            with about_tasks(job.task_id):
                if job.task_id in self._cancelled:  # while it waited for the engine
                    await self._let_go(job.claim, job.reporter, CANCELLED_MESSAGE)
                else:
                    await self._run_jobs([job])
            return
        claims = []
        if not self._prefetch.full:
            claims = await self.store.claim_batch(
                self.models,
                self.worker_id,
                self.settings.lease_seconds,
                limit=self.batch_size,
                window=BATCH_LOOKAHEAD * self.batch_size,
            )
        if claims:
            with about_tasks(*(claim.task.task_id for claim in claims)):
                await self._run_batch(claims, client)
            return
        queued = (
            None if self._prefetch.full else self.store.wait_for_task(self.settings.poll_interval)
        )
        await self._prefetch.wait(queued, self.settings.poll_interval)

    def stop_engine(self) -> None:
        """Make the engine give up at its next step; its tasks go back to the queue."""
        self._stopping.set()

    def cancel(self, task_id: str) -> bool:
        """Stop `task_id` at its next denoising step, or its downloads now; it fails as
        cancelled, the rest of its batch goes back to the queue. Whether this worker holds it."""
        if task_id not in self._running and not self._prefetch.holds(task_id):
            return False
        self._cancelled.add(task_id)
        self._prefetch.cancel(task_id)
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run_batch(self, claims: Sequence[Claim], client: httpx.AsyncClient) -> None:
        """Run `claims` in one engine call, each then ending on its own; a task with
        references goes to the background to fetch them first."""
        ready = []
        for claim in claims:
            reporter = self._reporter(claim)
            if claim.task.input.image_urls:
                self._prefetch.start(claim.task.task_id, self._fetch(claim, reporter, client))
            else:
                ready.append((claim, reporter))
        try:
            jobs = [
                job
                for claim, reporter in ready
                if (job := await self._prepare(claim, reporter, client))
            ]
        except asyncio.CancelledError:
            for claim, reporter in ready:  # those that ended already stay as they are
                await self._let_go(claim, reporter, None)
            raise
        if jobs:
            await self._run_jobs(jobs)

    async def _fetch(
        self, claim: Claim, reporter: ProgressReporter, client: httpx.AsyncClient
    ) -> _Job | None:
        """`_prepare`, in the background: if cancelled, the task fails as cancelled
        when asked to, else (the worker is stopping) it goes back to the queue."""
        task_id = claim.task.task_id
        try:
            return await self._prepare(claim, reporter, client)
        except asyncio.CancelledError:
            cancelled = task_id in self._cancelled
            await self._let_go(claim, reporter, CANCELLED_MESSAGE if cancelled else None)
            raise

    async def _prepare(
        self, claim: Claim, reporter: ProgressReporter, client: httpx.AsyncClient
    ) -> _Job | None:
        """The engine job for `claim`; None when it failed the task instead."""
        try:
            request = await engine_request(
                claim.task,
                client=client,
                policy=self.policy,
                settings=self.settings,
                storage=self.storage,
                loras=self.loras,
            )
            return _Job(claim, request, reporter)
        except USER_ERRORS as exc:
            message = str(exc)
        except STOP_SIGNALS:
            raise
        except BaseException as exc:
            logger.exception("task %s failed", claim.task.task_id)
            message = internal_error(exc)
        await self._let_go(claim, reporter, message)
        return None

    async def _run_jobs(self, jobs: Sequence[_Job]) -> None:
        try:
            await self._run_claimed(jobs)
        except asyncio.CancelledError:
            for job in jobs:  # those that ended already stay as they are
                await self.store.release_task(job.claim)
            raise
        finally:
            for job in jobs:
                job.reporter.stop()
            self._running = frozenset()
            self._cancelled.difference_update(job.task_id for job in jobs)

    async def _run_claimed(self, jobs: Sequence[_Job]) -> None:
        try:
            outputs = await self._generate(jobs)
        except Interrupted:
            for job in jobs:
                await self.store.release_task(job.claim)
            return
        except Cancelled as exc:
            for job in jobs:
                if job.task_id in exc.task_ids:
                    await self.store.fail_task(job.claim, str(exc))
                else:
                    await self.store.release_task(job.claim)
            return
        except (TaskStopped, *USER_ERRORS) as exc:
            for job in jobs:
                await self.store.fail_task(job.claim, str(exc))
            return
        except STOP_SIGNALS:
            raise
        except BaseException as exc:
            logger.exception("tasks %s failed", ", ".join(job.task_id for job in jobs))
            for job in jobs:
                await self.store.fail_task(job.claim, internal_error(exc))
            return
        for job, images in zip(jobs, outputs, strict=True):
            with about_tasks(job.task_id):
                await self._finish(job, images)

    async def _generate(self, jobs: Sequence[_Job]) -> list[list[Image.Image]]:
        """The engine's images for each job, in one call; stops at the next step when asked."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.task_timeout
        deadline = None if timeout is None else loop.time() + timeout
        running = frozenset(job.task_id for job in jobs)
        self._running = running

        def on_progress(done: int, total: int) -> None:
            if self._stopping.is_set():
                raise Interrupted("worker is stopping")
            # Membership tests only: the event loop may add to the set meanwhile.
            cancelled = frozenset(task_id for task_id in running if task_id in self._cancelled)
            if cancelled:
                raise Cancelled(cancelled)
            if deadline is not None and loop.time() > deadline:
                raise TaskStopped(
                    f"Task timed out: still denoising after {timeout:g} s (step {done} of "
                    f"{total}); the limit is the task_timeout setting"
                )
            progress = done * DENOISE_SHARE // max(total, 1)
            for job in jobs:
                loop.call_soon_threadsafe(job.reporter.update, progress)

        requests = [job.request for job in jobs]
        # In this context, so that the engine's log lines name the tasks too.
        context = contextvars.copy_context()
        return await loop.run_in_executor(
            self._executor, context.run, generate_batch, self.engine, requests, on_progress
        )

    async def _finish(self, job: _Job, images: Sequence[Image.Image]) -> None:
        """Store `job`'s images and finish its task."""
        task, request = job.claim.task, job.request
        try:
            files = []
            for index, image in enumerate(images):
                data = await asyncio.to_thread(results.encode, image, task.input.output_format)
                record = results.result_file(task.task_id, index, data, task.input.output_format)
                await self.storage.put(record.key, data, record.content_type)
                files.append(record)
        except STOP_SIGNALS:
            raise
        except BaseException as exc:
            logger.exception("task %s failed", task.task_id)
            await self.store.fail_task(job.claim, internal_error(exc))
            return
        outcome = Outcome(
            engine=engine_label(self.engine, task.model),
            seed=request.seed,
            width=request.width,
            height=request.height,
            files=files,
        )
        if not await self.store.finish_task(job.claim, outcome):
            logger.warning("task %s: lease lost before finishing; result discarded", task.task_id)
