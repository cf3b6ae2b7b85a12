"""OpenAI's error shape at the /v1/images/ door, so OpenAI's SDKs raise their own
exceptions: `{"error": {"message", "type", "param", "code"}}` with the status
OpenAI gives (docs/openai-api.md lists them).

Every refusal on the way in is answered in it: the guard's (a bad key, a body
too large, the database away: `OPENAI_DOOR`) and the routes' (`OpenAIRoute`
catches what a route raises, FastAPI's validation errors included).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException

from fluxserve.api.guard import Door
from fluxserve.api.schemas import describe_validation_error
from fluxserve.errors import (
    ApiError,
    InsufficientCredits,
    RateLimited,
    StoreUnavailable,
    Unauthenticated,
)
from fluxserve.openai_images import OpenAIValueError

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/images/"
NO_RETRY = {"x-should-retry": "false"}
"""OpenAI's SDKs retry a 429 and any 5xx unless told not to: where a retry would
only be refused again, or would queue the same images twice, they are told."""


class OpenAIError(Exception):
    """An answer in OpenAI's error shape; `extra` adds fields to its `error`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}

    def response(self) -> JSONResponse:
        error = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
            **self.extra,
        }
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def invalid(param: str | None, message: str) -> OpenAIError:
    """A 400 naming the request field at fault."""
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def translated(exc: ApiError | HTTPException | StoreUnavailable) -> OpenAIError:
    """A fluxserve refusal as OpenAI words it."""
    if isinstance(exc, InsufficientCredits):
        # OpenAI answers an exhausted quota with this 429.
        return OpenAIError(
            429, exc.message, type="insufficient_quota", code="insufficient_quota", headers=NO_RETRY
        )
    if isinstance(exc, RateLimited):
        return OpenAIError(
            429, exc.message, type="requests", code="rate_limit_exceeded", headers=exc.headers
        )
    if isinstance(exc, Unauthenticated):
        return OpenAIError(401, exc.message, code="invalid_api_key")
    if isinstance(exc, StoreUnavailable):
        logger.warning("answering 503: %s", exc)
        message = "The database is unavailable; retry shortly"
        return OpenAIError(503, message, type="server_error", headers={"Retry-After": "1"})
    if isinstance(exc, ApiError):
        status, message, headers = exc.status_code, exc.message, exc.headers
    else:
        status, headers = exc.status_code, dict(exc.headers or {})
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
    code = "request_too_large" if status == 413 else None
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return OpenAIError(status, message, type=kind, code=code, headers=headers)


def openai_refusal(exc: ApiError | HTTPException | StoreUnavailable) -> Response:
    """The guard's refusal of a request through this door."""
    return translated(exc).response()


OPENAI_DOOR = Door(lambda path: path.startswith(OPENAI_PREFIX), openai_refusal)
"""Its key as OpenAI's SDKs send theirs: `Authorization: Bearer <fluxserve API key>`."""


class OpenAIRoute(APIRoute):
    """A route whose every error leaves in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except OpenAIValueError as exc:
                return invalid(exc.param, str(exc)).response()
            except RequestValidationError as exc:
                errors = list(exc.errors())
                return invalid(_param(errors), describe_validation_error(errors)).response()
            except (ApiError, HTTPException, StoreUnavailable) as exc:
                return translated(exc).response()
            except Exception:
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                return OpenAIError(500, "Internal server error", type="server_error").response()

        return answer


def _param(errors: list[Any]) -> str | None:
    """The request field the first validation error is about; None for a body that
    is not JSON (whose error's place is a position in the text)."""
    if not errors or errors[0].get("type") == "json_invalid":
        return None
    loc = [str(part) for part in errors[0].get("loc", ()) if part != "body"]
    return ".".join(loc) or None


# The OpenAPI document's account of these answers.
class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong; names the field at fault")
    type: str
    param: str | None = Field(description="The request field at fault, if one is")
    code: str | None
    task_ids: list[str] | SkipJsonSchema[None] = Field(
        None, description="The tasks the request queued, when it ends without their images"
    )


class OpenAIErrorBody(BaseModel):
    """Every error of the /v1/images/ routes, in OpenAI's shape."""

    error: OpenAIErrorDetail


_WHEN = {
    400: "A field fluxserve cannot honour, or a body that cannot be read; `param` names it",
    401: "Missing, unknown or revoked API key (code invalid_api_key)",
    413: "The request or an image in it is larger than allowed",
    429: "Past the key's rate or active-task limit (code rate_limit_exceeded), or "
    "the account's credits do not cover the images (code insufficient_quota)",
    500: "Every task of the request failed; the message says why",
    503: "The database cannot be reached right now",
    504: "The images were not ready within `openai_wait` seconds; `task_ids` names the "
    "tasks, which go on and can be read through /api/generate/status",
}


def openai_error_answers() -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for every error a /v1/images/ route gives."""
    return {
        status: {"model": OpenAIErrorBody, "description": description}
        for status, description in _WHEN.items()
    }
