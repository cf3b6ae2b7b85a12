"""Errors on Black Forest Labs' wire: FastAPI's shape, as BFL's own API answers them.

A request that does not validate is answered 422 with `detail`, a list of
`{loc, msg, type}`; any other refusal keeps fluxserve's status (401, 402, 404,
413, 429, 500, 503...) with `detail` a message. The guard's refusals (a bad key,
a body past its cap) take the same shape on these routes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import Scope

from fluxserve.api.doors import Door, door_route, refused
from fluxserve.bfl_models import BFL_PATHS

GET_RESULT_PATH = "/v1/get_result"
SUBMIT_PATHS = tuple(f"/v1/{path}" for path in BFL_PATHS)
BFL_ROUTES = frozenset({*SUBMIT_PATHS, GET_RESULT_PATH})

# The unified submit names a reference `input.image_urls[i]` and the webhook's URL
# `callback_url`; this wire names them `input_image`, `input_image_2`, ... and
# `webhook_url`.
_IMAGE_URL = re.compile(r"input\.image_urls\[(\d+)\]")
_CALLBACK_URL = re.compile(r"\bcallback_url\b")


def in_bfl_words(message: str, image_fields: Sequence[str]) -> str:
    """`message` with each `input.image_urls[i]` named by the field it came from, and
    `callback_url` as `webhook_url`."""

    def field(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return image_fields[index] if index < len(image_fields) else match.group(0)

    return _CALLBACK_URL.sub("webhook_url", _IMAGE_URL.sub(field, message))


def validation_detail(errors: list[Any]) -> list[dict[str, Any]]:
    """pydantic's errors as FastAPI lists them, without the input they quote (a
    body of base64 images would come back whole)."""
    return [
        {
            "loc": list(error.get("loc", ())),
            "msg": str(error.get("msg", "Invalid value")),
            "type": str(error.get("type", "value_error")),
        }
        for error in errors
    ]


def bfl_answer(exc: Exception, scope: Scope) -> Response:
    """Any error as `{"detail": ...}`: FastAPI's 422 list for a body that does not
    validate, else fluxserve's status with its message."""
    if isinstance(exc, RequestValidationError):
        return JSONResponse({"detail": validation_detail(list(exc.errors()))}, 422)
    refusal = refused(exc, scope)
    return JSONResponse({"detail": refusal.message}, refusal.status, refusal.headers)


BFL_DOOR = Door(lambda path: path in BFL_ROUTES, bfl_answer)
"""The guard's door for these routes: `x-key` (or a bearer token), BFL's error shape."""
BflApiRoute = door_route(bfl_answer)
