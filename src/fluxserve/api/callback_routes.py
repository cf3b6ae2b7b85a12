"""The callback routes: the signing secret, each task's delivery log, and redelivery."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from fluxserve.api.openapi import CallbackLog, EventData, SecretData, answers
from fluxserve.api.routes import KeyDep, RuntimeDep
from fluxserve.store.base import Attempt, CallbackEvent, WebhookSecret
from fluxserve.tasks import format_time
from fluxserve.wire import ok

router = APIRouter()


@router.get("/api/webhooks/secret", **answers(SecretData))
async def webhook_secret(key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """The key's signing secret (`whsec_...`), made on first use."""
    return ok(_secret_data(await rt.webhooks.secrets.current(key.key_id)))


@router.post("/api/webhooks/secret/rotate", **answers(SecretData))
async def rotate_webhook_secret(key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """A new signing secret; the old one keeps signing for the grace period."""
    return ok(_secret_data(await rt.webhooks.secrets.rotate(key.key_id)))


@router.get("/api/generate/callbacks/{task_id}", **answers(CallbackLog, 403, 404))
async def callbacks(task_id: str, key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """The task's callback events, each with every attempt."""
    task, events = await rt.service.callbacks(key, task_id)
    return ok(
        {
            "task_id": task.task_id,
            "callback_url": task.callback_url,
            "callback_events": list(task.callback_events) if task.callback_url else [],
            "events": [_event_data(event) for event in events],
        }
    )


@router.post("/api/generate/callbacks/{task_id}/redeliver", **answers(EventData, 403, 404, 409))
async def redeliver(task_id: str, key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """Send the ended task's callback again: the same event id, on a fresh schedule."""
    return ok(_event_data(await rt.service.redeliver(key, task_id)))


def _secret_data(record: WebhookSecret) -> dict[str, Any]:
    signing = record.previous_signs(time.time())
    return {
        "secret": record.secret,
        "created_time": format_time(record.created_at),
        # When the rotated-out secret stops signing; null once it has.
        "previous_secret_expires_time": _time_or_none(
            record.previous_expires_at if signing else None
        ),
    }


def _event_data(event: CallbackEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "url": event.url,
        "state": event.state.value,
        "created_time": format_time(event.created_at),
        "next_attempt_time": _time_or_none(event.next_attempt_at),
        "delivered_time": _time_or_none(event.delivered_at),
        "attempts": [_attempt_data(attempt) for attempt in event.attempts],
    }


def _attempt_data(attempt: Attempt) -> dict[str, Any]:
    return {
        "time": format_time(attempt.attempted_at),
        "status_code": attempt.status_code,
        "error": attempt.error,
        "duration_ms": round(attempt.duration * 1000),
    }


def _time_or_none(epoch: float | None) -> str | None:
    return None if epoch is None else format_time(epoch)
