"""One signed POST of one callback event, and what came of it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from fluxserve import __version__
from fluxserve.bfl_wire import SIGNATURE_HEADER, signature
from fluxserve.errors import UnsafeURLError
from fluxserve.store.base import Attempt
from fluxserve.tasks import BflOptions, Task
from fluxserve.webhooks.retry import RETRY_AFTER_STATUS, is_retryable, parse_retry_after
from fluxserve.webhooks.signing import WebhookSecrets, signature_header
from fluxserve.wire import encode

Render = Callable[[Task], dict[str, Any]]
"""A task's callback body: its status answer at that moment."""

EVENT_HEADER = "webhook-event"
"""Names the event (running, progress, finished, failed). Not signed: the body's
`status` is, and a `progress` event is a `running` body with a higher progress."""


@dataclass(frozen=True)
class Event:
    """What to POST: the event's id and type, where, for whom, and the body. A task
    of Black Forest Labs' wire (`bfl`) is signed as BFL signs, with its own secret."""

    event_id: str
    event_type: str
    url: str
    owner: str
    body: dict[str, Any]
    bfl: BflOptions | None = None


@dataclass(frozen=True)
class Sent:
    """An attempt, whether the event is worth another, and when the receiver asked for it."""

    attempt: Attempt
    retryable: bool = False
    retry_after: float | None = None
    unanswered: str = "error"  # without an answer: `timeout`, `refused` or `error`

    @property
    def outcome(self) -> str:
        """What came of it, in a few words for a metric's label: `2xx` to `5xx` or `unanswered`."""
        code = self.attempt.status_code
        return self.unanswered if code is None else f"{code // 100}xx"


class Sender:
    """Signs and POSTs events through the net guard, within `timeout` seconds in all."""

    def __init__(
        self, client: httpx.AsyncClient, secrets: WebhookSecrets, *, timeout: float
    ) -> None:
        self.client = client
        self.secrets = secrets
        self.timeout = timeout

    async def send(self, event: Event) -> Sent:
        """POST once; never raises for anything the receiver or the network does."""
        body = encode(event.body)
        headers = {"content-type": "application/json", "user-agent": f"fluxserve/{__version__}"}
        headers.update(await self._signed(event, body))
        started, clock = time.time(), time.monotonic()

        def attempt(status_code: int | None, error: str | None) -> Attempt:
            return Attempt(started, time.monotonic() - clock, status_code, error)

        try:
            # The client's timeout is per read; this one bounds the whole
            # attempt, so a receiver that drips bytes cannot hold a slot.
            async with asyncio.timeout(self.timeout):
                response = await self._post(event.url, body, headers)
        except UnsafeURLError as exc:
            return Sent(attempt(None, f"refused: {exc}"), unanswered="refused")
        except (TimeoutError, httpx.TimeoutException):
            timed_out = attempt(None, f"timed out after {self.timeout:g}s")
            return Sent(timed_out, retryable=True, unanswered="timeout")
        except Exception as exc:
            # httpx's own errors, and whatever else the client or the resolver
            # raises: the attempt failed, and the schedule decides what follows.
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return Sent(attempt(None, reason), retryable=True)
        code = response.status_code
        if 200 <= code < 300:
            return Sent(attempt(code, None))
        retry_after = None
        if code in RETRY_AFTER_STATUS:
            retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        return Sent(attempt(code, f"HTTP {code}"), is_retryable(code), retry_after)

    async def _signed(self, event: Event, body: bytes) -> dict[str, str]:
        """The headers that say what the event is and prove who sent it."""
        if event.bfl is not None:
            secret = event.bfl.webhook_secret
            return {} if secret is None else {SIGNATURE_HEADER: signature(secret, body)}
        signing = await self.secrets.signing(event.owner)
        timestamp = int(time.time())
        return {
            "webhook-id": event.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(signing, event.event_id, timestamp, body),
            EVENT_HEADER: event.event_type,
        }

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        request = self.client.build_request("POST", url, content=body, headers=headers)
        # A redirect is the receiver's answer, not an invitation to post
        # elsewhere; and the answer's body is never read, so its size is moot.
        response = await self.client.send(request, stream=True, follow_redirects=False)
        await response.aclose()
        return response
