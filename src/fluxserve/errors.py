"""Exceptions raised by fluxserve.

FluxserveError
├── ApiError                  an answer to a client, in the error envelope
│   ├── InvalidRequest        400 invalid_request_error
│   ├── Unauthenticated       401 authentication_error
│   ├── InsufficientCredits   402 insufficient_credits
│   ├── PermissionDenied      403 permission_error
│   ├── NotFound              404 not_found_error
│   ├── Conflict              409 conflict_error
│   ├── PayloadTooLarge       413 invalid_request_error
│   └── RateLimited           429 rate_limit_error, with Retry-After
├── UnsafeURLError            an outbound URL the net guard refuses
├── FetchError                an outbound fetch that failed or returned too much
│   └── ResponseTooLarge      the response was larger than allowed
├── ReferenceImageError       a reference image that is not a usable image
├── StoreUnavailable          the database cannot be reached right now
├── StoreOpenFailed           the database could not be opened when the store started
├── AlreadyStored             a write refused to repeat: its unique key is taken
├── EngineError               the engine could not produce an image
│   └── EngineUnavailable     the engine cannot start (missing extra, no weights)
└── ConfigError               settings that cannot work together
"""

from __future__ import annotations

import math


class FluxserveError(Exception):
    """Root of every error fluxserve raises on purpose."""


class ApiError(FluxserveError):
    """An error answered to the client as `{"code": status, "error": {...}}`."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ApiError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthenticated(ApiError):
    status_code = 401
    error_type = "authentication_error"


class InsufficientCredits(ApiError):
    status_code = 402
    error_type = "insufficient_credits"


class PermissionDenied(ApiError):
    status_code = 403
    error_type = "permission_error"


class NotFound(ApiError):
    status_code = 404
    error_type = "not_found_error"


class Conflict(ApiError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLarge(ApiError):
    status_code = 413
    error_type = "invalid_request_error"


class RateLimited(ApiError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class UnsafeURLError(FluxserveError):
    """The net guard refused a URL: bad scheme, or a private/loopback target."""


class FetchError(FluxserveError):
    """An outbound fetch failed, timed out, or returned more than allowed."""


class ResponseTooLarge(FetchError):
    """An outbound fetch returned more bytes than allowed."""


class ReferenceImageError(FluxserveError):
    """A reference image could not be used (not an image, too large, a bomb)."""


class StoreUnavailable(FluxserveError):
    """The database cannot be reached; the caller retries later (the API answers 503)."""


class StoreOpenFailed(FluxserveError):
    """The store could not start: its database cannot be opened or brought to this
    version's schema (a file that is not a database, a folder that cannot be written,
    a server that refuses). The message names the database and what is wrong, in one
    line, for the command to print instead of a traceback."""


class AlreadyStored(FluxserveError):
    """A write refused to repeat: a row with its unique key (a task id, an email, an
    Idempotency-Key) is stored already."""


class EngineError(FluxserveError):
    """The engine failed to produce an image; the message is shown to the user."""


class EngineUnavailable(EngineError):
    """The engine cannot be started here; the message names the fix."""


class ConfigError(FluxserveError):
    """Settings that cannot work; the message names the setting."""
