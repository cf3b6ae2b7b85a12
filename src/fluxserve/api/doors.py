"""Errors as answers, at each front door: the unified API (envelope.py), Black
Forest Labs' wire (bfl_errors.py) and OpenAI's images API (openai_errors.py).

An error becomes a status, a message and headers in one place (`refused`); each
door writes them in its own shape (its `Answer`). A door's routes use its
`door_route`, so whatever they raise, a surprise (500) included, leaves in that
shape; the request guard answers its own refusals (a bad key, a body too large,
the database away) through the same door.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Scope

from fluxserve.api.json_body import JsonBodyRoute
from fluxserve.errors import ApiError, StoreUnavailable

logger = logging.getLogger(__name__)

Answer = Callable[[Exception, Scope], Response]
"""A door's answer to an error raised while serving the request of `scope`."""


@dataclass(frozen=True)
class Refused:
    """What every door says of an error, in whatever shape it says it."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def refused(exc: Exception, scope: Scope) -> Refused:
    """`exc` as an answer: a refusal keeps its status, message and headers; the
    database away is a 503 to retry; anything else is a 500 that says no more
    (its cause goes to the log)."""
    if isinstance(exc, ApiError):
        return Refused(exc.status_code, exc.message, dict(exc.headers))
    if isinstance(exc, HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        return Refused(exc.status_code, message, dict(exc.headers or {}))
    if isinstance(exc, StoreUnavailable):
        logger.warning("answering 503: %s", exc)
        return Refused(503, "The database is unavailable; retry shortly", {"Retry-After": "1"})
    logger.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
    return Refused(500, "Internal server error")


@dataclass(frozen=True)
class Door:
    """Routes that want an API key, and how their errors are answered."""

    wants_key: Callable[[str], bool]
    answer: Answer


def door_route(answer: Answer) -> type[APIRoute]:
    """A route class whose every error leaves as `answer` writes it, and whose JSON
    bodies are read as every door reads them (`JsonBodyRoute`)."""

    class DoorRoute(JsonBodyRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def answered(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    return answer(exc, request.scope)

            return answered

    return DoorRoute
