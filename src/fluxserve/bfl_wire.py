"""Black Forest Labs' wire, as fluxserve answers it: the get_result body, the
webhook body and its signature (docs/bfl-api.md).

Shared by the API's BFL routes and the callback outbox, so a poll and a webhook
of the same task say the same thing.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

from fluxserve.storage import Storage
from fluxserve.tasks import CANCELLED_MESSAGE, Task, TaskStatus

PENDING, READY, ERROR = "Pending", "Ready", "Error"
NOT_FOUND = "Task not found"
REQUEST_MODERATED, CONTENT_MODERATED = "Request Moderated", "Content Moderated"
STATUSES = (NOT_FOUND, PENDING, REQUEST_MODERATED, CONTENT_MODERATED, READY, ERROR)

SIGNATURE_HEADER = "X-BFL-Signature"


def result_status(task: Task) -> str:
    """BFL's word for the task's state. A failure whose message names one of BFL's
    moderation statuses (as an upstream engine reports them) answers that status."""
    if task.status is TaskStatus.FINISHED:
        return READY
    if task.status is not TaskStatus.FAILED:
        return PENDING
    message = (task.error_message or "").lower()
    for moderated in (CONTENT_MODERATED, REQUEST_MODERATED):
        if moderated.lower() in message:
            return moderated
    return ERROR


def _sample(task: Task, storage: Storage) -> str | None:
    if task.files_expired_at is not None or not task.files:
        return None
    return storage.url(task.files[0].key)


def _result(task: Task, storage: Storage) -> dict[str, Any] | None:
    if task.status is not TaskStatus.FINISHED:
        return None
    start, end = task.started_at or task.created_at, task.finished_at or task.created_at
    return {
        "sample": _sample(task, storage),
        "prompt": task.input.prompt,
        "seed": task.seed if task.seed is not None else task.input.seed,
        "start_time": start,
        "end_time": end,
        "duration": max(end - start, 0.0),
    }


def _details(task: Task) -> dict[str, Any] | None:
    if task.status is TaskStatus.FINISHED and task.files_expired_at is not None:
        return {"error": "The result files were removed after the result retention period"}
    if task.status is not TaskStatus.FAILED:
        return None
    message = task.error_message or (CANCELLED_MESSAGE if task.cancelled else "Task failed")
    if result_status(task) in (REQUEST_MODERATED, CONTENT_MODERATED):
        return {"Moderation Reasons": [message]}
    return {"error": message}


def result_body(task: Task, storage: Storage) -> dict[str, Any]:
    """GET /v1/get_result's answer for a task."""
    finished = task.status is TaskStatus.FINISHED
    return {
        "id": task.task_id,
        "status": result_status(task),
        "result": _result(task, storage),
        "progress": 1.0 if finished else task.progress / 100,
        "details": _details(task),
        "preview": None,
    }


def not_found_body(task_id: str) -> dict[str, Any]:
    """GET /v1/get_result's answer for an id that names none of the caller's tasks."""
    return {
        "id": task_id,
        "status": NOT_FOUND,
        "result": None,
        "progress": None,
        "details": None,
        "preview": None,
    }


def webhook_body(task: Task, storage: Storage) -> dict[str, Any]:
    """What an ended task's webhook POSTs: BFL's `id`, `status` and `result`, or
    `error` and `message` for a failure, and when it ended."""
    body: dict[str, Any] = {"id": task.task_id, "status": result_status(task)}
    if task.status is TaskStatus.FINISHED:
        body["result"] = _result(task, storage)
    else:
        body["error"] = "task_failed" if body["status"] == ERROR else "content_policy_violation"
        body["message"] = task.error_message or "Task failed"
    ended = task.finished_at or task.created_at
    body["timestamp"] = datetime.fromtimestamp(ended, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return body


def signature(secret: str, body: bytes) -> str:
    """The `X-BFL-Signature` value: `sha256=` and the hex HMAC-SHA256 of the body,
    keyed with the `webhook_secret` as UTF-8."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
