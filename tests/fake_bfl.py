"""A stand-in for Black Forest Labs' API on 127.0.0.1, as its documentation describes it.

It needs the `x-key` header, answers a create with an id, a polling URL and a cost
(the charge), keeps each task Pending while its prompt says "hold" and `held` is
set, for `pending_polls` polls otherwise, then Ready with a sample served from its
own delivery path. The prompt picks the other endings: "request-moderated",
"content-moderated", "vanish" (the sample answers 404). `busy` and `broke` make the
next creates answer 429 and 402, `failing` the next polls 503.
"""

from __future__ import annotations

import asyncio
import io
import itertools
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

KEY = "bfl-test-key"
COST = 3.0


def sample_png(size: int = 64, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 90)).save(buffer, format=image_format)
    return buffer.getvalue()


def invalid(body: dict[str, Any]) -> str | None:
    """What BFL's validation would refuse in a create's body (a 422), if anything."""
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return "prompt is required"
    if any(body.get(side, 16) % 16 for side in ("width", "height")):
        return "width and height must be multiples of 16"
    if body.get("output_format", "jpeg") not in ("jpeg", "png"):
        return "output_format must be jpeg or png"
    return None


@dataclass
class UpstreamTask:
    task_id: str
    body: dict[str, Any]
    polls: int = 0
    delivered: bool = False


@dataclass
class FakeBfl:
    pending_polls: int = 2
    busy: int = 0  # the next creates answering 429
    broke: bool = False  # creates answer 402
    failing: int = 0  # the next polls answering 503
    tasks: dict[str, UpstreamTask] = field(default_factory=dict)
    charged: float = 0.0
    creates_refused: int = 0
    pending_now: int = 0
    most_pending: int = 0  # the most tasks pending at once, as their polls show
    held: asyncio.Event = field(default_factory=asyncio.Event)
    sample: bytes = field(default_factory=sample_png)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def release(self) -> None:
        """Let every "hold" task turn Ready at its next poll."""
        self.held.set()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/credits", self._credits),
                Route("/v1/get_result", self._get_result),
                Route("/v1/{endpoint}", self._create, methods=["POST"]),
                Route("/delivery/{task_id}/sample.png", self._delivery),
            ]
        )

    def _refused(self, request: Request) -> Response | None:
        if request.headers.get("x-key") != KEY:
            return JSONResponse({"detail": "Not authenticated"}, status_code=403)
        return None

    async def _credits(self, request: Request) -> Response:
        return self._refused(request) or JSONResponse({"credits": 1000.0 - self.charged})

    async def _create(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        if self.broke:
            self.creates_refused += 1
            return JSONResponse({"detail": "Insufficient credits"}, status_code=402)
        if self.busy:
            self.busy -= 1
            self.creates_refused += 1
            return JSONResponse({"detail": "Too many active tasks"}, status_code=429)
        body = await request.json()
        if (problem := invalid(body)) is not None:
            return JSONResponse({"detail": problem}, status_code=422)
        task_id = f"up-{next(self._ids)}"
        self.tasks[task_id] = UpstreamTask(task_id, {**body, "endpoint": request.path_params})
        self.charged += COST
        self.pending_now += 1
        polling_url = str(request.url_for("_get_result").include_query_params(id=task_id))
        return JSONResponse(
            {"id": task_id, "polling_url": polling_url, "cost": COST, "output_mp": 1.0}
        )

    async def _get_result(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        if self.failing:
            self.failing -= 1
            return Response("upstream connect error", status_code=503)
        task = self.tasks.get(request.query_params.get("id", ""))
        if task is None:
            return JSONResponse({"status": "Task not found"})
        task.polls += 1
        prompt = str(task.body.get("prompt"))
        self.most_pending = max(self.most_pending, self.pending_now)
        answer: dict[str, Any] = {"id": task.task_id, "result": None, "progress": None}
        for ending in ("Request Moderated", "Content Moderated"):
            if ending.lower().replace(" ", "-") in prompt:
                return JSONResponse({**answer, "status": ending, "details": {"moderated": 1}})
        waiting = not self.held.is_set() if "hold" in prompt else task.polls <= self.pending_polls
        if waiting:
            progress = min(task.polls / (self.pending_polls + 1), 0.9)
            return JSONResponse({**answer, "status": "Pending", "progress": progress})
        if not task.delivered:
            task.delivered = True
            self.pending_now -= 1
        sample = str(request.url_for("_delivery", task_id=task.task_id))
        result = {"sample": sample, "seed": task.body.get("seed"), "prompt": prompt}
        return JSONResponse({**answer, "status": "Ready", "result": result, "progress": 1.0})

    async def _delivery(self, request: Request) -> Response:
        task = self.tasks.get(request.path_params["task_id"])
        if task is None or "vanish" in str(task.body.get("prompt")):
            return Response("BlobNotFound", status_code=404)
        if task.body.get("output_format", "jpeg") == "jpeg":
            return Response(sample_png(64, "JPEG"), media_type="image/jpeg")
        return Response(self.sample, media_type="image/png")
