"""JSON request bodies, read the same way at every front door.

A body fails only as JSON that does not validate, or as malformed JSON, each
answered by the door's own rule for it; never as FastAPI's 400 "There was an
error parsing the body", which says nothing of what was wrong.

An integer too long for Python to convert (over 4300 digits) is read as
infinity, which every number field refuses by name, as it refuses 1e400, and a
field the server does not know ignores, as it ignores any other value; bytes
that are not UTF-8 and arrays or objects nested past Python's recursion limit
are malformed JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response


def parse_json(body: bytes) -> Any:
    """`body` as JSON; a `json.JSONDecodeError` for anything that is not."""
    try:
        return json.loads(body, parse_int=_integer)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise json.JSONDecodeError(f"Not JSON: {exc}", "", 0) from exc


def _integer(digits: str) -> int | float:
    try:
        return int(digits)
    except ValueError:  # past sys.get_int_max_str_digits()
        return float(digits)


class JsonBodyRequest(Request):
    """A request whose JSON body is read by `parse_json`."""

    async def json(self) -> Any:
        return parse_json(await self.body())


class JsonBodyRoute(APIRoute):
    """A route whose JSON body FastAPI reads through `JsonBodyRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_through(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return read_through
