"""fluxserve.client against other servers of the wire shape: a small fake of the hosted
API (its documented fields only, no stream, none of fluxserve's additions), and a
server whose event stream drops and resumes."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fluxserve.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    NotFoundError,
    PermissionDeniedError,
    TaskData,
    TaskStatus,
)

from conftest import serve_asgi

KEY = "hosted-key"


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(out, "PNG")
    return out.getvalue()


@dataclass
class HostedFake:
    """The hosted API as its documentation describes it: submit, status (each read moves
    the task on: running, then finished), the upload routes, the balance, and the file.
    Errors in the envelope; no stream, cancel or history: those answer a plain 404."""

    tasks: dict[str, int] = field(default_factory=dict)  # task id -> status reads so far
    paths: Counter[str] = field(default_factory=Counter)
    image: bytes = field(default_factory=_png)

    def app(self) -> ASGIApp:
        inner = Starlette(
            routes=[
                Route("/api/generate/submit", self.submit, methods=["POST"]),
                Route("/api/generate/status/{task_id}", self.status),
                Route("/api/common/upload/stream", self.upload, methods=["POST"]),
                Route("/api/user/balance", self.balance),
                Route("/cdn/{name}", self.file),
            ]
        )

        async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                self.paths[scope["path"]] += 1
            await inner(scope, receive, send)

        return recorded

    def _refused(self, request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            error = {"message": "Invalid API key", "type": "authentication_error"}
            return JSONResponse({"code": 401, "error": error}, status_code=401)
        return None

    async def submit(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        body = await request.json()
        assert set(body) <= {"model", "input", "callback_url"} and body["input"]["prompt"]
        task_id = f"task-unified-1757165031-{len(self.tasks):08d}"
        self.tasks[task_id] = 0
        data = {"task_id": task_id, "status": "not_started", "created_time": "2025-11-12T10:30:00"}
        return JSONResponse({"code": 200, "data": data})

    async def status(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        task_id = request.path_params["task_id"]
        if task_id not in self.tasks:
            error = {"message": "Task not found", "type": "not_found_error"}
            return JSONResponse({"code": 404, "error": error}, status_code=404)
        self.tasks[task_id] += 1
        reads = self.tasks[task_id]
        files = []
        if reads >= 2:
            url = f"{request.base_url}cdn/{task_id}.png"
            files = [
                {
                    "file_url": url,
                    "file_type": "image",
                    "file_name": "image.png",
                    "content_type": "image/png",
                    "file_size": len(self.image),
                }
            ]
        data = {
            "task_id": task_id,
            "status": "finished" if reads >= 2 else "running",
            "files": files,
            "created_time": "2025-11-12T10:30:00",
            "progress": 100 if reads >= 2 else 50,
            "error_message": None,
            "credits_amount": 5,
        }
        return JSONResponse({"code": 200, "data": data})

    async def upload(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        async with request.form() as form:
            upload = form["file"]
            assert not isinstance(upload, str)
            size = len(await upload.read())
        url = f"{request.base_url}cdn/{upload.filename}"
        data = {"file_url": url, "file_name": upload.filename, "file_size": size}
        return JSONResponse({"code": 200, "data": data})

    async def balance(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        return JSONResponse({"code": 200, "data": {"credits_amount": 995}})

    async def file(self, request: Request) -> Response:
        # A CDN: no key wanted, and one sent would be a leak.
        assert "authorization" not in request.headers
        return Response(self.image, media_type="image/png")


@pytest.fixture
async def hosted() -> AsyncIterator[tuple[HostedFake, str]]:
    fake = HostedFake()
    async with serve_asgi(fake.app()) as url:
        yield fake, url


async def test_the_client_works_unchanged_against_the_hosted_api(
    hosted: tuple[HostedFake, str],
) -> None:
    fake, url = hosted
    progress: list[int] = []
    async with AsyncClient(url, KEY, poll_interval=0.01) as client:
        upload = await client.upload(b"fake image bytes", file_name="ref.png")
        assert upload.file_url.endswith("/cdn/ref.png") and upload.file_size == 16
        image = await client.generate(
            "a lighthouse", size="16:9", on_progress=lambda t: progress.append(t.progress)
        )
        assert image.data == fake.image and image.seed is None
        assert image.task.status is TaskStatus.FINISHED and image.task.credits_amount == 5
        assert progress == [50, 100]
        second = await client.submit("flux-2-pro", "a second lighthouse")
        done = await client.wait(second.task_id, timeout=30)
        assert done.status is TaskStatus.FINISHED and done.model is None
        assert (await client.balance()).credits_amount == 995
        with pytest.raises(NotFoundError):
            await client.cancel(second.task_id)
        with pytest.raises(NotFoundError, match="Task not found"):
            await client.wait("task-unified-1-unknown0", timeout=30)
    # The stream was tried once; the client then knew this server has none.
    assert sum(n for path, n in fake.paths.items() if "/stream/" in path) == 1
    assert fake.paths["/api/generate/submit"] == 2


async def test_a_wrong_key_is_an_authentication_error(hosted: tuple[HostedFake, str]) -> None:
    _, url = hosted
    async with AsyncClient(url, "wrong") as client:
        with pytest.raises(AuthenticationError, match="Invalid API key") as refused:
            await client.submit("flux-2-pro", "a lighthouse")
    assert refused.value.status_code == 401 and refused.value.type == "authentication_error"


def _event(name: str, event_id: int, status: str, progress: int) -> str:
    data = {"task_id": "task-1", "status": status, "files": [], "progress": progress}
    envelope = json.dumps({"code": 200, "data": data})
    return f"id: {event_id}\nevent: {name}\ndata: {envelope}\n\n"


@dataclass
class ResumingStream:
    """A stream that sends the status and one progress event, then drops the connection;
    reopened with Last-Event-ID, it goes on from there to the end."""

    resumed_from: list[str | None] = field(default_factory=list)
    status_reads: int = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/generate/stream/{task_id}", self.stream),
                Route("/api/generate/status/{task_id}", self.status),
            ]
        )

    async def stream(self, request: Request) -> Response:
        if request.path_params["task_id"] == "task-of-another":
            error = {"message": "Task belongs to another user", "type": "permission_error"}
            return JSONResponse({"code": 403, "error": error}, status_code=403)
        last = request.headers.get("last-event-id")
        self.resumed_from.append(last)

        async def events() -> AsyncIterator[str]:
            yield ": heartbeat\n\n"
            if last is None:
                yield _event("status", 1, "not_started", 0)
                yield _event("progress", 2, "running", 25)
                return  # dropped before the end
            yield _event("progress", 3, "running", 75)
            yield ": heartbeat\n\n"
            yield _event("finished", 4, "finished", 100)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def status(self, request: Request) -> Response:
        self.status_reads += 1
        return JSONResponse({"code": 200, "data": {"task_id": "task-1", "status": "running"}})


async def test_wait_follows_the_stream_and_resumes_after_the_last_event() -> None:
    server = ResumingStream()
    seen: list[tuple[str, int]] = []
    async with serve_asgi(server.app()) as url, AsyncClient(url, KEY) as client:
        done = await client.wait(
            "task-1", timeout=30, on_progress=lambda t: seen.append((t.status.value, t.progress))
        )
        with pytest.raises(PermissionDeniedError, match="another user"):
            await client.wait("task-of-another", timeout=30)
    assert isinstance(done, TaskData) and done.status is TaskStatus.FINISHED
    assert seen == [("not_started", 0), ("running", 25), ("running", 75), ("finished", 100)]
    assert server.resumed_from == [None, "2"]
    assert server.status_reads == 0, "the stream alone told the story"


async def test_the_sync_client_follows_the_stream_too() -> None:
    server = ResumingStream()
    async with serve_asgi(server.app()) as url:

        def run() -> TaskData:
            with Client(url, KEY) as client:
                return client.wait("task-1", timeout=30)

        done = await asyncio.to_thread(run)
    assert done.progress == 100 and server.resumed_from == [None, "2"]
