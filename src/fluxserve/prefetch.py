"""Claimed tasks whose reference images download while the engine runs others.

A worker has one engine. Were a task's references downloaded just before its
engine call, one slow reference host would leave the engine idle, and every task
behind it waiting, for up to `fetch_timeout`. So a task that names references is
claimed, and its downloads started, in the background: the engine takes whatever
is ready first. At most `limit` tasks wait here, fetching or fetched, each under
its own lease, which its progress reporter renews as for a running task.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

import httpx

from fluxserve import reference_shape
from fluxserve.engines.base import GenerationRequest
from fluxserve.errors import EngineError
from fluxserve.logs import context_about
from fluxserve.lora_fetch import LoraSource
from fluxserve.net_policy import NetPolicy
from fluxserve.references import load_references
from fluxserve.settings import Settings
from fluxserve.sizes import dimensions, size_ratio
from fluxserve.storage import Storage
from fluxserve.tasks import Task

logger = logging.getLogger(__name__)


class Prepared(Protocol):
    @property
    def task_id(self) -> str: ...


JobT = TypeVar("JobT", bound=Prepared)


class Prefetch(Generic[JobT]):
    """The worker's claimed tasks that are not at the engine yet: fetching, or ready."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._fetching: dict[str, asyncio.Task[JobT | None]] = {}
        self._ready: deque[JobT] = deque()
        self._changed = asyncio.Event()

    @property
    def full(self) -> bool:
        return len(self._fetching) + len(self._ready) >= self.limit

    def holds(self, task_id: str) -> bool:
        return task_id in self._fetching or any(job.task_id == task_id for job in self._ready)

    def start(self, task_id: str, fetch: Coroutine[Any, Any, JobT | None]) -> None:
        """Run `fetch` in the background; the job it returns turns ready (None: it
        ended the task itself)."""
        running = asyncio.create_task(fetch, context=context_about(task_id))
        self._fetching[task_id] = running
        running.add_done_callback(lambda done: self._fetched(task_id, done))

    def _fetched(self, task_id: str, done: asyncio.Task[JobT | None]) -> None:
        del self._fetching[task_id]
        self._changed.set()
        if done.cancelled():
            return
        if (error := done.exception()) is not None:
            # Its lease runs out and the sweeper hands it back.
            logger.error("task %s: preparing it failed", task_id, exc_info=error)
        elif (job := done.result()) is not None:
            self._ready.append(job)

    def take(self) -> JobT | None:
        """The task fetched longest ago, or None; `wait` then waits for the next."""
        self._changed.clear()
        return self._ready.popleft() if self._ready else None

    def cancel(self, task_id: str) -> bool:
        """Stop `task_id`'s downloads; False when it is not fetching."""
        fetching = self._fetching.get(task_id)
        return fetching is not None and fetching.cancel()

    async def wait(self, other: Awaitable[None] | None, at_most: float) -> None:
        """Return when a fetch has ended since `take`, `other` is done, or after
        `at_most` seconds."""
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._changed.wait())]
        if other is not None:
            waits.append(asyncio.ensure_future(other))
        try:
            await asyncio.wait(waits, timeout=at_most, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def stop(self) -> list[JobT]:
        """Cancel every fetch and wait for it to end; the ready jobs, never run."""
        fetching = list(self._fetching.values())
        for running in fetching:
            running.cancel()
        await asyncio.gather(*fetching, return_exceptions=True)
        ready = list(self._ready)
        self._ready.clear()
        return ready


async def engine_request(
    task: Task,
    *,
    client: httpx.AsyncClient,
    policy: NetPolicy,
    settings: Settings,
    storage: Storage,
    loras: LoraSource | None = None,
) -> GenerationRequest:
    """What `task` asks the engine for, its reference images downloaded and decoded,
    its LoRAs found or fetched (by `loras`)."""
    spec = task.input
    if spec.loras and loras is None:
        raise EngineError("this worker does not load LoRAs")
    lora_files = await loras.resolve(spec.loras, client) if loras and spec.loras else ()
    images = await load_references(
        spec.image_urls,
        client=client,
        policy=policy,
        max_bytes=settings.max_reference_bytes,
        max_pixels=settings.max_reference_pixels,
        total_timeout=settings.fetch_timeout,
        storage=storage,
    )
    reference_shape.check_loaded(images)
    reference = images[0].size if images else None
    if spec.width is not None and spec.height is not None:
        width, height = spec.width, spec.height
    else:
        width, height = dimensions(size_ratio(spec.size, reference), spec.resolution)
    return GenerationRequest(
        prompt=spec.prompt,
        width=width,
        height=height,
        seed=spec.seed if spec.seed is not None else secrets.randbelow(2**32),
        steps=spec.steps,
        guidance=spec.guidance,
        images=tuple(images),
        model=task.model,
        loras=lora_files,
    )
