"""Every client operation, written once as a generator of steps that a driver performs.

A flow yields what it needs done and is sent back the outcome: `Send` a request
(the response, or the transport error), `Pause`, or `Listen` to an event stream.
`Client` performs the steps with `httpx.Client`, `AsyncClient` with
`httpx.AsyncClient`; requests, retries, waiting and parsing live here alone, so
the two clients cannot behave differently.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import httpx
from httpx_sse import ServerSentEvent
from pydantic import ValidationError

from fluxserve import __version__
from fluxserve.client.errors import (
    APIConnectionError,
    FluxserveError,
    ServerError,
    TaskFailedError,
    WaitTimeoutError,
    error_from,
    retry_after,
)
from fluxserve.protocol import (
    Balance,
    FileInfo,
    LoraList,
    SubmittedTask,
    TaskData,
    TaskLora,
    TaskPage,
    TaskStatus,
    UploadedFile,
    WireModel,
)

T = TypeVar("T")
M = TypeVar("M", bound=WireModel)

DEFAULT_URL = "http://127.0.0.1:8000"
# A stream with no byte for this long (heartbeats included) is taken as lost and reopened.
STREAM_SILENCE = 60.0
MAX_BACKOFF = 8.0


@dataclass(frozen=True)
class Send:
    """Send `request` and read its body; answered with the response or the transport error."""

    request: httpx.Request


@dataclass(frozen=True)
class Pause:
    """Sleep; answered with None."""

    seconds: float


@dataclass(frozen=True)
class Listen:
    """Open `request` as an event stream and hand each event to `on_event` until it says
    stop (True) or the stream ends: answered with None. A response that is not an event
    stream is answered with its body read; a lost connection with the transport error."""

    request: httpx.Request
    on_event: Callable[[ServerSentEvent], bool]


Step = Send | Pause | Listen
Flow = Generator[Step, Any, T]


class LoraOption(TypedDict, total=False):
    """One of `loras`: a `name` (see `loras()`) or a `url`, and a `scale` (default 1)."""

    name: str
    url: str
    scale: float


class TaskOptions(TypedDict, total=False):
    """Keyword arguments of `submit` and `generate`: the task's `input` fields, its
    callback, and an `Idempotency-Key` (one is made when not given). Any other
    keyword goes into `input` as it is."""

    size: str
    resolution: str
    image_urls: Sequence[str]
    seed: int
    output_format: str
    steps: int
    guidance: float
    loras: Sequence[LoraOption | TaskLora]
    callback_url: str
    callback_events: Sequence[str]
    idempotency_key: str


@dataclass
class Config:
    """What every flow needs: how to build a request, and the client's choices."""

    build: Callable[..., httpx.Request]  # the httpx client's build_request
    api_key: str | None
    max_retries: int
    poll_interval: float
    use_stream: bool
    stream_missing: bool = False  # learnt: this server has no stream route

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        """A request to the API, with the key."""
        headers = dict(kwargs.pop("headers", None) or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return self.build(method, path, headers=headers, **kwargs)


def connection(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """The server and key: the arguments, else FLUXSERVE_URL and FLUXSERVE_API_KEY;
    the server defaults to `fluxserve serve`'s own address."""
    url = base_url or os.environ.get("FLUXSERVE_URL") or DEFAULT_URL
    return url.rstrip("/"), api_key or os.environ.get("FLUXSERVE_API_KEY") or None


H = TypeVar("H", httpx.Client, httpx.AsyncClient)


def connect(
    http_class: type[H],
    base_url: str | None,
    api_key: str | None,
    timeout: float,
    transport: Any,
    max_retries: int,
    poll_interval: float,
    use_stream: bool,
) -> tuple[H, Config]:
    """A client's httpx client and Config, from its constructor's arguments."""
    url, key = connection(base_url, api_key)
    http = http_class(
        base_url=url,
        timeout=timeout,
        transport=transport,
        headers={"User-Agent": f"fluxserve-client/{__version__}"},
    )
    return http, Config(http.build_request, key, max_retries, poll_interval, use_stream)


@dataclass(frozen=True)
class GeneratedImage:
    """What `generate` returns: the image's bytes and the task that made it."""

    data: bytes
    task: TaskData

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def seed(self) -> int | None:
        return self.task.seed

    @property
    def content_type(self) -> str | None:
        return self.task.files[0].content_type

    def __bytes__(self) -> bytes:
        return self.data

    def save(self, path: str | Path) -> Path:
        """Write the image to `path`; returns it."""
        target = Path(path)
        target.write_bytes(self.data)
        return target


def is_event_stream(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "")
    return response.status_code == 200 and content_type.startswith("text/event-stream")


def backoff(attempt: int, response: httpx.Response | None) -> float:
    """Seconds before retry number `attempt + 1`: the server's Retry-After, else doubling."""
    told = None if response is None else retry_after(response)
    return min(MAX_BACKOFF, told if told is not None else 0.5 * 2**attempt)


def call(cfg: Config, request: httpx.Request, *, retry: bool) -> Flow[httpx.Response]:
    """Send `request`; when `retry`, again after a connection error or a 503, up to
    `max_retries` times. An error answer raises its exception."""
    attempt = 0
    while True:
        reply = yield Send(request)
        failed = isinstance(reply, httpx.TransportError) or reply.status_code == 503
        if retry and failed and attempt < cfg.max_retries:
            yield Pause(backoff(attempt, None if isinstance(reply, Exception) else reply))
            attempt += 1
            continue
        if isinstance(reply, httpx.TransportError):
            raise APIConnectionError(
                f"{request.method} {request.url} got no answer: {reply!r}"
            ) from reply
        if reply.is_error:
            raise error_from(reply)
        return reply


def parse(response: httpx.Response, model: type[M]) -> M:
    """The envelope's `data` as `model`; an envelope whose `code` is an error raises it
    (some servers answer errors with HTTP 200)."""
    try:
        body = json.loads(response.content)
        code = body.get("code", 200)
        if code != 200 or "data" not in body:
            raise error_from(response, status=code if isinstance(code, int) else 500)
        return model.model_validate(body["data"])
    except (ValueError, AttributeError, ValidationError) as exc:
        raise ServerError(
            f"unexpected answer from {response.url}: {exc}",
            status_code=response.status_code,
            error_type="server_error",
        ) from exc


def submit(cfg: Config, model: str, prompt: str, options: TaskOptions) -> Flow[SubmittedTask]:
    """POST submit, retried safely under an Idempotency-Key."""
    fields: dict[str, Any] = dict(options)
    key = fields.pop("idempotency_key", None) or uuid.uuid4().hex
    body: dict[str, Any] = {"model": model}
    for name in ("callback_url", "callback_events"):
        value = fields.pop(name, None)
        if value is not None:
            body[name] = list(value) if name == "callback_events" else value
    if fields.get("image_urls") is not None:
        fields["image_urls"] = list(fields["image_urls"])
    if fields.get("loras") is not None:
        fields["loras"] = [
            lora.model_dump(exclude_none=True) if isinstance(lora, TaskLora) else dict(lora)
            for lora in fields["loras"]
        ]
    body["input"] = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
    request = cfg.api("POST", "/api/generate/submit", json=body, headers={"Idempotency-Key": key})
    return parse((yield from call(cfg, request, retry=True)), SubmittedTask)


def status(cfg: Config, task_id: str) -> Flow[TaskData]:
    request = cfg.api("GET", f"/api/generate/status/{task_id}")
    return parse((yield from call(cfg, request, retry=True)), TaskData)


def cancel(cfg: Config, task_id: str) -> Flow[TaskData]:
    request = cfg.api("POST", f"/api/generate/cancel/{task_id}")
    return parse((yield from call(cfg, request, retry=False)), TaskData)


def tasks(cfg: Config, query: Mapping[str, Any]) -> Flow[TaskPage]:
    params = {name: value for name, value in query.items() if value is not None}
    request = cfg.api("GET", "/api/generate/tasks", params=params)
    return parse((yield from call(cfg, request, retry=True)), TaskPage)


def balance(cfg: Config) -> Flow[Balance]:
    request = cfg.api("GET", "/api/user/balance")
    return parse((yield from call(cfg, request, retry=True)), Balance)


def loras(cfg: Config) -> Flow[LoraList]:
    request = cfg.api("GET", "/api/loras")
    return parse((yield from call(cfg, request, retry=True)), LoraList)


def upload(
    cfg: Config,
    source: str | Path | bytes,
    file_name: str | None,
    upload_path: str | None,
) -> Flow[UploadedFile]:
    """An http(s) URL is fetched by the server; a path or bytes is sent as multipart.
    Not retried: a second try would store the file twice."""
    fields = {k: v for k, v in (("upload_path", upload_path), ("file_name", file_name)) if v}
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        request = cfg.api("POST", "/api/common/upload/url", json={"file_url": source, **fields})
    else:
        if isinstance(source, bytes | bytearray | memoryview):
            content, name = bytes(source), file_name or "image"
        else:
            content, name = Path(source).read_bytes(), file_name or Path(source).name
        request = cfg.api(
            "POST", "/api/common/upload/stream", files={"file": (name, content)}, data=fields
        )
    return parse((yield from call(cfg, request, retry=False)), UploadedFile)


def download(cfg: Config, source: str | TaskData | FileInfo) -> Flow[bytes]:
    """A file's bytes, from its URL, a FileInfo, or a finished task (its first file).
    Sent without the API key: a file URL is its own credential, and may be another host's."""
    if isinstance(source, TaskData):
        if not source.files:
            why = "its files have expired" if source.files_expired else f"it is {source.status}"
            raise FluxserveError(f"task {source.task_id} has no file to download: {why}")
        source = source.files[0]
    url = source.file_url if isinstance(source, FileInfo) else source
    return (yield from call(cfg, cfg.build("GET", url), retry=True)).content


class _Watch:
    """What `wait` has seen of one task: its latest status, and the stream's last event id."""

    def __init__(self, task_id: str, deadline: float, on_progress: Progress | None) -> None:
        self.task_id = task_id
        self.deadline = deadline
        self.on_progress = on_progress
        self.task: TaskData | None = None
        self.last_event_id: str | None = None

    @property
    def ended(self) -> bool:
        return self.task is not None and self.task.status.terminal

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def see(self, task: TaskData) -> None:
        before = self.task
        self.task = task
        changed = before is None or (before.status, before.progress) != (task.status, task.progress)
        if changed and self.on_progress is not None:
            self.on_progress(task)

    def on_event(self, event: ServerSentEvent) -> bool:
        if event.id:
            self.last_event_id = event.id
        if event.data:
            try:
                task = TaskData.model_validate(json.loads(event.data)["data"])
            except (ValueError, KeyError, TypeError, ValidationError) as exc:
                raise ServerError(
                    f"unexpected {event.event} event: {exc}",
                    status_code=200,
                    error_type="server_error",
                ) from exc
            self.see(task)
        return self.ended or self.remaining() <= 0

    def timed_out(self, timeout: float) -> WaitTimeoutError:
        return WaitTimeoutError(self.task_id, timeout, self.task)


Progress = Callable[[TaskData], object]


def wait(
    cfg: Config, task_id: str, timeout: float | None, on_progress: Progress | None
) -> Flow[TaskData]:
    """Until the task is finished or failed: its event stream where the server has one,
    else status reads every `poll_interval`. `on_progress` sees each new status or progress."""
    limit = math.inf if timeout is None else timeout
    watch = _Watch(task_id, time.monotonic() + limit, on_progress)
    poll_only = not cfg.use_stream or cfg.stream_missing
    drops = 0
    while not watch.ended:
        if watch.remaining() <= 0:
            raise watch.timed_out(limit)
        if poll_only:
            yield from _poll_once(cfg, watch)
            continue
        silence = min(STREAM_SILENCE, max(watch.remaining(), 0.001))
        headers = {"Accept": "text/event-stream"}
        if watch.last_event_id:
            headers["Last-Event-ID"] = watch.last_event_id
        request = cfg.api(
            "GET",
            f"/api/generate/stream/{task_id}",
            headers=headers,
            timeout=httpx.Timeout(STREAM_SILENCE, read=silence),
        )
        seen = watch.last_event_id
        reply = yield Listen(request, watch.on_event)
        if isinstance(reply, httpx.Response) and reply.status_code != 503:
            if reply.is_error and reply.status_code not in (404, 405):
                raise error_from(reply)
            # A 204: nothing after the event last seen. A 404, 405 or a page that is no
            # event stream: no stream here (a hosted server, an older fluxserve). The
            # status says the rest; for an unknown task, its 404 says so.
            yield from _poll_once(cfg, watch)
            if reply.status_code != 204:
                poll_only = cfg.stream_missing = True
        elif not watch.ended and watch.remaining() > 0:
            # Lost, or ended early (a restart): reopen after the event last seen. Failing
            # again and again with no event: the status read says what is wrong.
            drops = 0 if watch.last_event_id != seen else drops + 1
            poll_only = drops > cfg.max_retries
            if not poll_only:
                yield Pause(min(backoff(drops, None), watch.remaining()))
    assert watch.task is not None
    return watch.task


def _poll_once(cfg: Config, watch: _Watch) -> Flow[None]:
    watch.see((yield from status(cfg, watch.task_id)))
    if not watch.ended and watch.remaining() > 0:
        yield Pause(min(cfg.poll_interval, watch.remaining()))


def generate(
    cfg: Config,
    prompt: str,
    model: str,
    timeout: float | None,
    on_progress: Progress | None,
    options: TaskOptions,
) -> Flow[GeneratedImage]:
    """Submit, wait, download the first file; a failed task raises TaskFailedError."""
    submitted = yield from submit(cfg, model, prompt, options)
    task = yield from wait(cfg, submitted.task_id, timeout, on_progress)
    if task.status is TaskStatus.FAILED:
        raise TaskFailedError(task)
    return GeneratedImage((yield from download(cfg, task)), task)
