"""Every error leaves as `{"code": status, "error": {"message", "type"}}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from fluxserve.api.doors import refused
from fluxserve.api.schemas import describe_validation_error
from fluxserve.errors import ApiError, StoreUnavailable

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_credits",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """The envelope's `type` for an HTTP status."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error envelope; the HTTP status equals `code`."""
    return JSONResponse(
        {"code": status, "error": {"message": message, "type": error_type(status)}},
        status_code=status,
        headers=headers,
    )


def envelope_answer(exc: Exception, scope: Scope) -> Response:
    """Any error in the envelope; a body that does not validate is a 400 naming the field."""
    if isinstance(exc, RequestValidationError):
        return error_response(400, describe_validation_error(list(exc.errors())))
    refusal = refused(exc, scope)
    return error_response(refusal.status, refusal.message, refusal.headers)


async def _answer(request: Request, exc: Exception) -> Response:
    return envelope_answer(exc, request.scope)


def install_error_handlers(app: FastAPI) -> None:
    kinds = (ApiError, RequestValidationError, StarletteHTTPException, StoreUnavailable, Exception)
    for kind in kinds:
        app.add_exception_handler(kind, _answer)
