"""Every error leaves as `{"code": status, "error": {"message", "type"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve.api.schemas import describe_validation_error
from fluxserve.errors import ApiError, StoreUnavailable

logger = logging.getLogger(__name__)

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


def refusal(exc: ApiError | StarletteHTTPException | StoreUnavailable) -> JSONResponse:
    """The answer to an error raised on purpose: a client's mistake, or a 503 while
    the database is away."""
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.message, exc.headers)
    if isinstance(exc, StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        return error_response(exc.status_code, message, dict(exc.headers or {}))
    logger.warning("answering 503: %s", exc)
    return error_response(503, "The database is unavailable; retry shortly", {"Retry-After": "1"})


async def _refused(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError | StarletteHTTPException | StoreUnavailable)
    return refusal(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, describe_validation_error(list(exc.errors())))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "Internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _refused)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _refused)
    app.add_exception_handler(StoreUnavailable, _refused)
    app.add_exception_handler(Exception, _unexpected)
