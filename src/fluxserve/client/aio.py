"""`AsyncClient`: the operations of `flows`, performed with an `httpx.AsyncClient`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx
from httpx_sse import EventSource

from fluxserve.client import flows
from fluxserve.client.flows import Flow, GeneratedImage, LoraList, Progress, TaskOptions
from fluxserve.protocol import Balance, FileInfo, SubmittedTask, TaskData, TaskPage, UploadedFile

T = TypeVar("T")


class AsyncClient:
    """`Client` for asyncio code: the same arguments and methods, awaited; `transport`
    is an httpx async transport (`httpx.ASGITransport` runs an app in process)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        poll_interval: float = 1.0,
        use_stream: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http, self._cfg = flows.connect(
            httpx.AsyncClient,
            base_url,
            api_key,
            timeout,
            transport,
            max_retries,
            poll_interval,
            use_stream,
        )

    async def submit(
        self, model: str, prompt: str, **options: Unpack[TaskOptions]
    ) -> SubmittedTask:
        """Queue a task; `options` are its input fields (size, resolution, seed,
        loras, ...)."""
        return await self._run(flows.submit(self._cfg, model, prompt, options))

    async def status(self, task_id: str) -> TaskData:
        return await self._run(flows.status(self._cfg, task_id))

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - Client's signature; ends in WaitTimeoutError
        on_progress: Progress | None = None,
    ) -> TaskData:
        """The task once finished or failed; WaitTimeoutError after `timeout` seconds."""
        return await self._run(flows.wait(self._cfg, task_id, timeout, on_progress))

    async def generate(
        self,
        prompt: str,
        *,
        model: str = "flux-2-pro",
        timeout: float | None = None,  # noqa: ASYNC109 - as in wait
        on_progress: Progress | None = None,
        **options: Unpack[TaskOptions],
    ) -> GeneratedImage:
        """Submit, wait and download: the image's bytes, seed and task."""
        return await self._run(
            flows.generate(self._cfg, prompt, model, timeout, on_progress, options)
        )

    async def cancel(self, task_id: str) -> TaskData:
        return await self._run(flows.cancel(self._cfg, task_id))

    async def tasks(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskPage:
        """One page of the account's tasks; pass `next_cursor` as `cursor` for the next."""
        query = {"status": status, "model": model, "limit": limit, "cursor": cursor}
        return await self._run(flows.tasks(self._cfg, query))

    async def upload(
        self,
        source: str | Path | bytes,
        *,
        file_name: str | None = None,
        upload_path: str | None = None,
    ) -> UploadedFile:
        """Upload an image from a file path, bytes, or an http(s) URL the server fetches."""
        return await self._run(flows.upload(self._cfg, source, file_name, upload_path))

    async def loras(self) -> LoraList:
        """The LoRAs a task may name in `loras`, and what LoRAs the server accepts."""
        return await self._run(flows.loras(self._cfg))

    async def balance(self) -> Balance:
        return await self._run(flows.balance(self._cfg))

    async def download(self, source: str | TaskData | FileInfo) -> bytes:
        """A file's bytes: by URL, FileInfo, or a finished task (its first file)."""
        return await self._run(flows.download(self._cfg, source))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self, flow: Flow[T]) -> T:
        reply: Any = None
        while True:
            try:
                step = flow.send(reply)
            except StopIteration as stop:
                result: T = stop.value
                return result
            reply = await self._perform(step)

    async def _perform(self, step: flows.Step) -> Any:
        if isinstance(step, flows.Pause):
            await asyncio.sleep(step.seconds)
            return None
        try:
            if isinstance(step, flows.Send):
                return await self._http.send(step.request)
            return await self._listen(step)
        except httpx.TransportError as exc:
            return exc

    async def _listen(self, step: flows.Listen) -> httpx.Response | None:
        response = await self._http.send(step.request, stream=True)
        try:
            if not flows.is_event_stream(response):
                await response.aread()
                return response
            async for event in EventSource(response).aiter_sse():
                if step.on_event(event):
                    break
            return None
        finally:
            await response.aclose()
