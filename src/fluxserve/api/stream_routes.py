"""GET /api/generate/stream/{task_id}: a task's status as server-sent events, as it changes.

Events, each with the status answer as its data and the state it shows as its id
(`running.40`, see `task_feed.state_id`): `status` first, with the state on
connect; `progress` at each change of status or progress; then `finished` or
`failed`, and the stream ends. A task that has ended already gets its terminal
event alone. A reconnect that sends `Last-Event-ID` gets no `status`: only
what changed since that state, and the terminal event at once if the task ended
meanwhile; one that names the terminal state is answered 204, which tells an
EventSource to stop reconnecting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from fluxserve.api.openapi import ANY_API_ROUTE, errors
from fluxserve.api.routes import KeyDep, RuntimeDep
from fluxserve.task_feed import Snapshot, Subscription

router = APIRouter()

STREAM_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events, each with the status answer as its data",
        # Per event (OpenAPI 3.2 calls it itemSchema); `data` is the status answer's JSON.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["event", "id", "data"],
                    "properties": {
                        "event": {"enum": ["status", "progress", "finished", "failed"]},
                        "id": {"type": "string"},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                }
            }
        },
    },
    204: {"description": "`Last-Event-ID` names the terminal state: nothing more to send"},
    **errors(400, 403, 404, *ANY_API_ROUTE),
}


@router.get(
    "/api/generate/stream/{task_id}",
    response_class=EventSourceResponse,
    responses=STREAM_ANSWERS,
)
async def stream(
    task_id: str,
    key: KeyDep,
    rt: RuntimeDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> Response:
    """The task's status as server-sent events until it ends; errors as GET status."""
    subscription, first = await rt.feed.open(
        task_id, lambda: rt.service.get_with_position(key, task_id)
    )
    if first.terminal and last_event_id == first.event_id:
        subscription.close()
        return Response(status_code=204)
    return EventSourceResponse(
        _events(subscription, first, last_event_id),
        ping=rt.settings.stream_heartbeat,
        # The generator closes it when it ends; this covers a client gone before
        # the generator ever started, whose own cleanup would then never run.
        background=BackgroundTask(subscription.close),
    )


async def _events(
    subscription: Subscription, snapshot: Snapshot, last_event_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    """Each new state from `snapshot` on, up to and including the terminal one."""
    try:
        shown = last_event_id
        name = "status" if last_event_id is None else "progress"
        while True:
            if snapshot.event_id != shown:
                event = snapshot.status.value if snapshot.terminal else name
                yield ServerSentEvent(snapshot.data, event=event, id=snapshot.event_id)
                shown, name = snapshot.event_id, "progress"
            if snapshot.terminal:
                return
            snapshot = await subscription.next()
    finally:
        subscription.close()
