"""Who asks, and how much they may send: settled before any route reads a body.

`RequestGuard` is an ASGI middleware in front of every route:

* An `/api/` request (or one of another door's routes, such as Black Forest
  Labs' wire) is authenticated from its headers alone, before a byte of its body
  is read: a request with no key or a bad one gets its 401 at once, however
  large a body it announces, in the error shape of its door.
* A body is bounded while it is read, however it is framed: a `Content-Length`
  past the route's cap is refused before any of it is read, and a chunked body
  the moment it passes the cap; either way with a 413, before anything parses it.

A refusal of a request whose body is chunked or larger than `max_body_bytes`
closes the connection (`Connection: close`): reading the rest only to throw it
away would cost what the cap saves. A smaller body the server reads and drops,
so the connection stays open (closing on unread bytes can make the client's
system reset the connection before it has read the answer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.api.auth import authenticate
from fluxserve.api.doors import Door
from fluxserve.api.envelope import envelope_answer
from fluxserve.api.keycache import KeyCache
from fluxserve.errors import ApiError, StoreUnavailable
from fluxserve.store import ApiKeyRecord

API_PREFIX = "/api/"
API_KEY_SCOPE = "fluxserve.api_key"
"""Where the guard leaves the authenticated key, in the request's scope."""


class BodyTooLarge(HTTPException):
    """A body past its route's cap. An HTTPException, because FastAPI re-raises
    those from its body parsing (anything else becomes a 400 there), so it is
    answered in the error shape of the route's door."""

    def __init__(self, cap: int) -> None:
        super().__init__(
            413,
            f"Request body is larger than {cap} bytes, the most this route accepts",
            headers={"Connection": "close"},
        )


@dataclass(frozen=True)
class BodyCaps:
    """The most bytes of body each route accepts: `by_path`'s, else `default`.

    None for a route that bounds its own body as it reads it (an upload, whose
    refusal names its field).
    """

    default: int
    by_path: Mapping[str, int | None]

    def cap(self, path: str) -> int | None:
        return self.by_path.get(path, self.default)


API_DOOR = Door(lambda path: path.startswith(API_PREFIX), envelope_answer)


class RequestGuard:
    """Authenticates each door's requests and bounds every body, before the app reads it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyCache,
        caps: BodyCaps,
        doors: Sequence[Door] = (API_DOOR,),
    ) -> None:
        self.app = app
        self.keys = keys
        self.caps = caps
        self.doors = doors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        cap = self.caps.cap(path)
        door = next((door for door in self.doors if door.wants_key(path)), None)
        try:
            if door is not None:
                scope[API_KEY_SCOPE] = await authenticate(self.keys, headers)
            if cap is not None and _declared_length(headers) > cap:
                raise BodyTooLarge(cap)
        except (ApiError, HTTPException, StoreUnavailable) as exc:
            response = (envelope_answer if door is None else door.answer)(exc, scope)
            if "transfer-encoding" in headers or _declared_length(headers) > self.caps.default:
                response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive if cap is None else _bounded(receive, cap), send)


def api_key_of(scope: Scope) -> ApiKeyRecord:
    """The key the guard authenticated for this request of a door's routes."""
    record: ApiKeyRecord = scope[API_KEY_SCOPE]
    return record


def _bounded(receive: Receive, cap: int) -> Receive:
    received = 0

    async def bounded() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > cap:
                raise BodyTooLarge(cap)
        return message

    return bounded


def _declared_length(headers: Headers) -> int:
    """The body's length by its Content-Length; 0 when there is none or it is not
    a number (the server refuses a malformed one before the app sees it)."""
    declared = headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()):
        return 0
    # Past 18 digits it is past any cap; int() would refuse thousands of them.
    return int(declared) if len(declared) <= 18 else 10**18
