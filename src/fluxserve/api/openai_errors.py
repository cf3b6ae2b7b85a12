"""OpenAI's error shape at the /v1/images/ door, so OpenAI's SDKs raise their own
exceptions: `{"error": {"message", "type", "param", "code"}}` with the status
OpenAI gives (docs/openai-api.md lists them).

Every error of a request through this door is answered in it: the guard's
refusals (a bad key, a body too large, the database away: `OPENAI_DOOR`) and
whatever a route raises (`OpenAIRoute`), FastAPI's validation errors and an
unexpected error (500) included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.types import Scope

from fluxserve.api.doors import Door, Refused, door_route, refused
from fluxserve.api.schemas import describe_validation_error
from fluxserve.openai_images import OpenAIValueError

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


class AfterQueued(Exception):
    """`error`, raised once the request's tasks were queued. Its answer names them
    (`task_ids`) and carries `x-should-retry: false`: the tasks go on, and the
    request sent again would queue them a second time."""

    def __init__(self, error: Exception, task_ids: Sequence[str]) -> None:
        super().__init__(str(error))
        self.error = error
        self.task_ids = list(task_ids)


def invalid(param: str | None, message: str) -> OpenAIError:
    """A 400 naming the request field at fault."""
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def openai_answer(exc: Exception, scope: Scope) -> Response:
    """Any error in OpenAI's shape, with the status and code OpenAI gives it."""
    return _as_openai_error(exc, scope).response()


def _as_openai_error(exc: Exception, scope: Scope) -> OpenAIError:
    if isinstance(exc, AfterQueued):
        return _after_queued(_as_openai_error(exc.error, scope), exc)
    if isinstance(exc, OpenAIValueError):
        return invalid(exc.param, str(exc))
    if isinstance(exc, RequestValidationError):
        errors = list(exc.errors())
        return invalid(_param(errors), describe_validation_error(errors))
    if isinstance(exc, OpenAIError):
        return exc
    return _translated(refused(exc, scope))


def _after_queued(answer: OpenAIError, queued: AfterQueued) -> OpenAIError:
    """`answer` naming the queued tasks, not to be retried. Where it is fluxserve's
    own refusal (the database away, say), its message says what became of them."""
    message = answer.message
    if not isinstance(queued.error, OpenAIError):
        message = (
            f"The images were queued as tasks {', '.join(queued.task_ids)}, but this answer "
            f"failed: {message}. They go on: read each with "
            "GET /api/generate/status/{task_id} and the same API key; sending this request "
            "again would queue them again."
        )
    return OpenAIError(
        answer.status,
        message,
        type=answer.type,
        param=answer.param,
        code=answer.code,
        headers=NO_RETRY,
        extra={**answer.extra, "task_ids": queued.task_ids},
    )


_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}


def _translated(refusal: Refused) -> OpenAIError:
    """A fluxserve refusal as OpenAI words it."""
    status, message = refusal.status, refusal.message
    if status == 402:  # OpenAI answers an exhausted quota with this 429.
        kind = "insufficient_quota"
        return OpenAIError(429, message, type=kind, code=kind, headers=NO_RETRY)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    kind = "requests" if status == 429 else kind
    code = _CODES.get(status)
    return OpenAIError(status, message, type=kind, code=code, headers=refusal.headers)


OPENAI_DOOR = Door(lambda path: path.startswith(OPENAI_PREFIX), openai_answer)
"""Its key as OpenAI's SDKs send theirs: `Authorization: Bearer <fluxserve API key>`."""
OpenAIRoute = door_route(openai_answer)


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
    503: "The database cannot be reached right now; once the request's tasks were "
    "queued, `task_ids` names them",
    504: "The images were not ready within `openai_wait` seconds; `task_ids` names the "
    "tasks, which go on and can be read through /api/generate/status",
}


def openai_error_answers() -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for every error a /v1/images/ route gives."""
    return {
        status: {"model": OpenAIErrorBody, "description": description}
        for status, description in _WHEN.items()
    }
