"""What each HTTP request leaves behind for an operator: its duration in the
metrics, by route template and status, and its task in the log lines it writes."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.logs import bind_task
from fluxserve.metrics import Metrics

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The route label of a request no route matched (a 404): the raw path would let
# any client make new series.
UNMATCHED = "unmatched"


def request_histogram(metrics: Metrics) -> Histogram:
    return metrics.histogram(
        "fluxserve_http_request_seconds",
        "HTTP requests, from their first byte in to their last byte out, by route "
        "template (not the path: a task id is no label) and status code.",
        ("route", "status"),
        REQUEST_BUCKETS,
    )


class RequestMetrics:
    """ASGI middleware timing every HTTP request into `histogram`."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app answers: an exception becomes a 500 outside

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            # The router puts the matched route in the scope (a 405 too).
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            self.histogram.labels(route=template, status=str(status)).observe(
                time.perf_counter() - started
            )


async def task_of_request(request: Request) -> None:
    """A dependency of every route: a route about one task (its path names a
    `task_id`) logs that id with each line, the access log's included."""
    task_id = request.path_params.get("task_id")
    if task_id is not None:
        bind_task(task_id)
