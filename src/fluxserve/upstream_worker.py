"""A worker that runs tasks at Black Forest Labs' API: many in flight at once, no GPU.

Each claimed task is followed by its own coroutine, up to `bfl_max_in_flight` at
once (BFL's concurrency limit): references are fetched through the net guard and
sent as base64, the upstream task is created, and its id and polling URL are kept
with the task before anything else, so that a worker killed and restarted follows
the same upstream task and BFL charges once. Then the task is polled (BFL's
progress becomes the task's), and the sample is copied into fluxserve's storage at
once: BFL's delivery URL expires 10 minutes after the task is Ready.

A 429 backs off and keeps the task; the network and 5xx are retried with backoff
until the task's deadline (`task_timeout`, else `UPSTREAM_TIMEOUT`); the rest of
BFL's refusals fail the task with a message that says why (see `engines/bfl.py`).
A cancel stops the polling at once; a worker that stops hands its tasks back with
their upstream task, for the next worker to follow.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, Unpack

import httpx
from PIL import Image

from fluxserve import results
from fluxserve.engine_stops import Cancelled, TaskStopped
from fluxserve.engines.bfl import (
    BflEngine,
    Polled,
    UpstreamBusy,
    UpstreamFailed,
    UpstreamUnavailable,
    request_body,
)
from fluxserve.errors import StoreUnavailable
from fluxserve.logs import about_tasks, context_about
from fluxserve.netguard import guarded_client
from fluxserve.prefetch import engine_request
from fluxserve.progress_reporter import ProgressReporter
from fluxserve.references import sniff_format
from fluxserve.store.base import Outcome
from fluxserve.tasks import Claim, Task
from fluxserve.waits import set_or_timeout
from fluxserve.worker_base import (
    DENOISE_SHARE,
    STOP_SIGNALS,
    USER_ERRORS,
    WorkerBase,
    WorkerParts,
    internal_error,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

UPSTREAM_TIMEOUT = 15 * 60.0
"""Seconds an upstream task may take when `task_timeout` is unset."""
FIRST_BACKOFF, LAST_BACKOFF = 1.0, 30.0


class _Deadline:
    """When a followed task gives up, and the event that cancels it sooner."""

    def __init__(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.seconds = seconds
        self.at = loop.time() + seconds
        self.cancelled = asyncio.Event()

    async def pause(self, seconds: float, waiting_for: str) -> None:
        """Sleep `seconds`, or less: a cancel raises `Cancelled`, the deadline `TaskStopped`."""
        left = self.at - asyncio.get_running_loop().time()
        await set_or_timeout(self.cancelled, max(0.0, min(seconds, left)))
        self.check(waiting_for)

    def check(self, waiting_for: str) -> None:
        if self.cancelled.is_set():
            raise Cancelled(frozenset())
        if asyncio.get_running_loop().time() >= self.at:
            raise TaskStopped(
                f"Task timed out: {waiting_for} after {self.seconds:g} s; the limit is "
                "the task_timeout setting"
            )


class UpstreamWorker(WorkerBase[BflEngine]):
    """Claims tasks for `models` and runs each at Black Forest Labs' API."""

    def __init__(self, *, engine: BflEngine, **parts: Unpack[WorkerParts]) -> None:
        super().__init__(engine=engine, **parts)
        self._following: dict[str, tuple[asyncio.Task[None], _Deadline]] = {}
        self._slot_freed = asyncio.Event()

    async def _load(self) -> None:
        self.engine.load()

    def cancel(self, task_id: str) -> bool:
        following = self._following.get(task_id)
        if following is None:
            return False
        self._cancelled.add(task_id)
        following[1].cancelled.set()
        return True

    async def _claim_and_run_forever(self) -> None:
        timeout = self.settings.fetch_timeout
        async with (
            self.engine.client() as upstream,
            guarded_client(self.policy, timeout=timeout) as references,
        ):
            try:
                while True:
                    try:
                        await self._claim_next(upstream, references)
                    except StoreUnavailable as exc:
                        logger.warning("worker %s: %s; retrying", self.worker_id, exc)
                        await asyncio.sleep(self.settings.poll_interval)
            finally:
                # Each hands its task back, upstream task and all, as it ends.
                running = [task for task, _ in self._following.values()]
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

    async def _claim_next(self, upstream: httpx.AsyncClient, references: httpx.AsyncClient) -> None:
        """Follow one more task if a slot is free and one is queued, else wait for either."""
        if len(self._following) >= self.settings.bfl_max_in_flight:
            self._slot_freed.clear()
            await set_or_timeout(self._slot_freed, self.settings.poll_interval)
            return
        claim = await self.store.claim_task(
            self.models, self.worker_id, self.settings.lease_seconds
        )
        if claim is None:
            await self.store.wait_for_task(self.settings.poll_interval)
            return
        task_id = claim.task.task_id
        deadline = _Deadline(self.settings.task_timeout or UPSTREAM_TIMEOUT)
        follow = self._follow(claim, deadline, upstream, references)
        running = asyncio.create_task(follow, context=context_about(task_id))
        self._following[task_id] = (running, deadline)

    async def _follow(
        self,
        claim: Claim,
        deadline: _Deadline,
        upstream: httpx.AsyncClient,
        references: httpx.AsyncClient,
    ) -> None:
        """Run `claim` upstream to its end; on a stop, hand it back."""
        task_id = claim.task.task_id
        reporter = self._reporter(claim)
        try:
            with about_tasks(task_id):
                outcome = await self._run(claim, deadline, reporter, upstream, references)
                reporter.stop()
                if not await self.store.finish_task(claim, outcome):
                    logger.warning("task %s: lease lost before finishing", task_id)
        except STOP_SIGNALS:
            await self._let_go(claim, reporter, None)
            raise
        except (UpstreamFailed, Cancelled, TaskStopped, *USER_ERRORS) as exc:
            await self._let_go(claim, reporter, str(exc))
        except StoreUnavailable as exc:
            # Its lease runs out and the sweeper hands it back, upstream task and all.
            logger.warning("task %s: left to the sweeper: %s", task_id, exc)
        except BaseException as exc:
            logger.exception("task %s failed", task_id)
            await self._let_go(claim, reporter, internal_error(exc))
        finally:
            reporter.stop()
            self._cancelled.discard(task_id)
            del self._following[task_id]
            self._slot_freed.set()

    async def _run(
        self,
        claim: Claim,
        deadline: _Deadline,
        reporter: ProgressReporter,
        upstream: httpx.AsyncClient,
        references: httpx.AsyncClient,
    ) -> Outcome:
        task = claim.task
        made = task.upstream
        if made is None:
            made = await self._create(claim, deadline, references, upstream)
        else:
            logger.info("task %s: following upstream task %s again", task.task_id, made["id"])
        polled = await self._retrying(
            deadline, "polling upstream", lambda: self.engine.poll(upstream, made["polling_url"])
        )
        while polled.sample is None:
            reporter.update(int(polled.progress * DENOISE_SHARE))
            await deadline.pause(self.settings.bfl_poll_interval, "upstream still pending")
            polled = await self._retrying(
                deadline,
                "polling upstream",
                lambda: self.engine.poll(upstream, made["polling_url"]),
            )
        reporter.update(DENOISE_SHARE)
        return await self._store_sample(task, polled, made, deadline, upstream)

    async def _create(
        self,
        claim: Claim,
        deadline: _Deadline,
        references: httpx.AsyncClient,
        upstream: httpx.AsyncClient,
    ) -> dict[str, Any]:
        """Create the upstream task and keep it with the task before anything else."""
        task = claim.task
        request = await engine_request(
            task,
            client=references,
            policy=self.policy,
            settings=self.settings,
            storage=self.storage,
        )
        route = self.settings.models[task.model]
        body = request_body(route, task.model, request, task.input.output_format, task.input.bfl)
        endpoint = route.upstream_endpoint(task.model)
        deadline.check("creating the upstream task")
        created = await self._retrying(
            deadline,
            "creating the upstream task",
            lambda: self.engine.create(upstream, endpoint, body),
        )
        made = {**created, "seed": request.seed, "width": request.width, "height": request.height}
        while True:
            try:
                if not await self.store.record_upstream(claim, made):
                    raise TaskStopped("Task lost its lease while creating the upstream task")
                return made
            except StoreUnavailable as exc:
                # Paid for already: keep trying, or a restart would pay again.
                logger.warning("task %s: upstream task not saved yet: %s", task.task_id, exc)
                await asyncio.sleep(self.settings.poll_interval)

    async def _store_sample(
        self,
        task: Task,
        polled: Polled,
        made: dict[str, Any],
        deadline: _Deadline,
        upstream: httpx.AsyncClient,
    ) -> Outcome:
        sample = polled.sample or ""
        data = await self._retrying(
            deadline, "reading the upstream sample", lambda: self.engine.sample(upstream, sample)
        )
        output_format = task.input.output_format
        if sniff_format(data) != output_format.upper():
            data = await asyncio.to_thread(_reencoded, data, output_format)
        record = results.result_file(task.task_id, 0, data, output_format)
        await self.storage.put(record.key, data, record.content_type)
        return Outcome(
            engine=self.engine.name,
            seed=polled.seed if polled.seed is not None else made["seed"],
            width=made["width"],
            height=made["height"],
            files=[record],
        )

    async def _retrying(
        self, deadline: _Deadline, doing: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """`call`, again after a backoff while upstream is busy or unreachable."""
        backoff = FIRST_BACKOFF
        while True:
            deadline.check(doing)
            try:
                return await call()
            except UpstreamBusy as exc:
                wait, why = exc.retry_after or backoff, str(exc)
            except UpstreamUnavailable as exc:
                wait, why = backoff, str(exc)
            logger.warning("%s: %s; again in %g s", doing, why, wait)
            await deadline.pause(wait, f"{doing} ({why})")
            backoff = min(backoff * 2, LAST_BACKOFF)


def _reencoded(data: bytes, output_format: str) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return results.encode(image, output_format)
