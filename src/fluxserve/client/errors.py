"""What the client raises: one tree, mapped from the error envelope's `type`.

FluxserveError
├── APIConnectionError        the server could not be reached (after the retries)
├── APIError                  the server answered `{"code": status, "error": {...}}`
│   ├── InvalidRequestError   400, 413: invalid_request_error; the message names the field
│   ├── AuthenticationError   401 authentication_error
│   ├── InsufficientCreditsError  402 insufficient_credits
│   ├── PermissionDeniedError 403 permission_error
│   ├── NotFoundError         404 not_found_error
│   ├── ConflictError         409 conflict_error
│   ├── RateLimitError        429 rate_limit_error, with `retry_after` (seconds)
│   └── ServerError           5xx server_error
│       └── UnavailableError  503: the server is up but cannot serve right now
├── TaskFailedError           `generate`: the task ended `failed`; its `error_message`
└── WaitTimeoutError          `wait`: the task had not ended when the timeout came
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from fluxserve.protocol import TaskData


class FluxserveError(Exception):
    """Root of everything the client raises."""


class APIConnectionError(FluxserveError):
    """The request never got an answer: refused, reset, or timed out."""


class APIError(FluxserveError):
    """An answer in the error envelope; `message` is the server's own words."""

    def __init__(self, message: str, *, status_code: int, error_type: str) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = error_type


class InvalidRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class InsufficientCreditsError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class RateLimitError(APIError):
    def __init__(
        self, message: str, *, status_code: int, error_type: str, retry_after: float | None
    ) -> None:
        super().__init__(message, status_code=status_code, error_type=error_type)
        self.retry_after = retry_after
        """Seconds to wait before the next try, from `Retry-After`; None when not sent."""


class ServerError(APIError):
    pass


class UnavailableError(ServerError):
    pass


class TaskFailedError(FluxserveError):
    """The task ended `failed`; `task` is its last status."""

    def __init__(self, task: TaskData) -> None:
        super().__init__(task.error_message or f"task {task.task_id} failed")
        self.task = task


class WaitTimeoutError(FluxserveError):
    """The task was still queued or running at the timeout; `task` is its last status seen."""

    def __init__(self, task_id: str, timeout: float, task: TaskData | None) -> None:
        state = f"still {task.status.value}" if task else "not ended"
        super().__init__(f"task {task_id} {state} after {timeout:g}s")
        self.task_id = task_id
        self.task = task


_BY_TYPE: dict[str, type[APIError]] = {
    "invalid_request_error": InvalidRequestError,
    "authentication_error": AuthenticationError,
    "insufficient_credits": InsufficientCreditsError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "conflict_error": ConflictError,
    "rate_limit_error": RateLimitError,
    "server_error": ServerError,
}
# For answers without the envelope (a proxy's error page) or of a type not listed.
_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_credits",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds, when given as a number (the form fluxserve sends)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def error_from(response: httpx.Response, *, status: int | None = None) -> APIError:
    """The exception for an error answer: by the envelope's `type`, else by the status
    (`status`, for an envelope whose `code` is an error under HTTP 200)."""
    status = response.status_code if status is None else status
    message, kind = f"HTTP {status}", ""
    try:
        error = json.loads(response.content)["error"]
        message, kind = str(error["message"]), str(error["type"])
    except (ValueError, KeyError, TypeError):
        pass
    default = _BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    kind = kind or default
    cls = _BY_TYPE.get(kind) or _BY_TYPE[default]
    if status == 503 and cls is ServerError:
        cls = UnavailableError
    if cls is RateLimitError:
        return RateLimitError(
            message, status_code=status, error_type=kind, retry_after=retry_after(response)
        )
    return cls(message, status_code=status, error_type=kind)
