"""`Client`: the operations of `flows`, performed with a blocking `httpx.Client`."""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx
from httpx_sse import EventSource

from fluxserve.client import flows
from fluxserve.client.flows import Flow, GeneratedImage, LoraList, Progress, TaskOptions
from fluxserve.protocol import Balance, FileInfo, SubmittedTask, TaskData, TaskPage, UploadedFile

T = TypeVar("T")


class Client:
    """A fluxserve (or any server of the same wire shape) from blocking code.

    `base_url` and `api_key` default to FLUXSERVE_URL and FLUXSERVE_API_KEY.
    Reads and downloads are retried `max_retries` times on a connection error or
    a 503, submits too (under an Idempotency-Key); `wait` follows the task's
    event stream when `use_stream` and the server has one, else reads its status
    every `poll_interval` seconds. `transport` is handed to httpx (for instance
    `httpx.WSGITransport`, or a mock).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        poll_interval: float = 1.0,
        use_stream: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http, self._cfg = flows.connect(
            httpx.Client,
            base_url,
            api_key,
            timeout,
            transport,
            max_retries,
            poll_interval,
            use_stream,
        )

    def submit(self, model: str, prompt: str, **options: Unpack[TaskOptions]) -> SubmittedTask:
        """Queue a task; `options` are its input fields (size, resolution, seed,
        loras, ...)."""
        return self._run(flows.submit(self._cfg, model, prompt, options))

    def status(self, task_id: str) -> TaskData:
        return self._run(flows.status(self._cfg, task_id))

    def wait(
        self, task_id: str, *, timeout: float | None = None, on_progress: Progress | None = None
    ) -> TaskData:
        """The task once finished or failed; WaitTimeoutError after `timeout` seconds."""
        return self._run(flows.wait(self._cfg, task_id, timeout, on_progress))

    def generate(
        self,
        prompt: str,
        *,
        model: str = "flux-2-pro",
        timeout: float | None = None,
        on_progress: Progress | None = None,
        **options: Unpack[TaskOptions],
    ) -> GeneratedImage:
        """Submit, wait and download: the image's bytes, seed and task."""
        return self._run(flows.generate(self._cfg, prompt, model, timeout, on_progress, options))

    def cancel(self, task_id: str) -> TaskData:
        return self._run(flows.cancel(self._cfg, task_id))

    def tasks(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskPage:
        """One page of the account's tasks; pass `next_cursor` as `cursor` for the next."""
        query = {"status": status, "model": model, "limit": limit, "cursor": cursor}
        return self._run(flows.tasks(self._cfg, query))

    def upload(
        self,
        source: str | Path | bytes,
        *,
        file_name: str | None = None,
        upload_path: str | None = None,
    ) -> UploadedFile:
        """Upload an image from a file path, bytes, or an http(s) URL the server fetches."""
        return self._run(flows.upload(self._cfg, source, file_name, upload_path))

    def loras(self) -> LoraList:
        """The LoRAs a task may name in `loras`, and what LoRAs the server accepts."""
        return self._run(flows.loras(self._cfg))

    def balance(self) -> Balance:
        return self._run(flows.balance(self._cfg))

    def download(self, source: str | TaskData | FileInfo) -> bytes:
        """A file's bytes: by URL, FileInfo, or a finished task (its first file)."""
        return self._run(flows.download(self._cfg, source))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, flow: Flow[T]) -> T:
        reply: Any = None
        while True:
            try:
                step = flow.send(reply)
            except StopIteration as stop:
                result: T = stop.value
                return result
            reply = self._perform(step)

    def _perform(self, step: flows.Step) -> Any:
        if isinstance(step, flows.Pause):
            time.sleep(step.seconds)
            return None
        try:
            if isinstance(step, flows.Send):
                return self._http.send(step.request)
            return self._listen(step)
        except httpx.TransportError as exc:
            return exc

    def _listen(self, step: flows.Listen) -> httpx.Response | None:
        response = self._http.send(step.request, stream=True)
        try:
            if not flows.is_event_stream(response):
                response.read()
                return response
            for event in EventSource(response).iter_sse():
                if step.on_event(event):
                    break
            return None
        finally:
            response.close()
