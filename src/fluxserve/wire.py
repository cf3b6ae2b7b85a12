"""The JSON shapes of the wire contract that more than one piece sends."""

from __future__ import annotations

import json
from typing import Any

from fluxserve.storage import Storage
from fluxserve.tasks import Task, TaskStatus, format_time


def ok(data: dict[str, Any]) -> dict[str, Any]:
    """The success envelope."""
    return {"code": 200, "data": data}


def status_data(task: Task, storage: Storage, queue_position: int | None = None) -> dict[str, Any]:
    """The `data` of a status answer, and of a callback body."""
    files = []
    if task.status is TaskStatus.FINISHED and task.files_expired_at is None:
        files = [
            {
                "file_url": storage.url(f.key),
                "file_type": "image",
                "file_name": f.file_name,
                "content_type": f.content_type,
                "file_size": f.file_size,
            }
            for f in task.files
        ]
    data: dict[str, Any] = {
        "task_id": task.task_id,
        "status": task.status.value,
        "files": files,
        "created_time": format_time(task.created_at),
        "progress": 100 if task.status is TaskStatus.FINISHED else task.progress,
        "error_message": task.error_message,
        "credits_amount": task.credits_amount,
        # Extensions beyond the hosted API's shape.
        "model": task.model,
        "engine": task.engine,
        "seed": task.seed if task.seed is not None else task.input.seed,
    }
    if task.width and task.height:
        data["width"], data["height"] = task.width, task.height
    if queue_position is not None:
        data["queue_position"] = queue_position
    if task.cancelled:
        data["cancelled"] = True
    if task.input.loras:
        data["loras"] = [lora.to_json() for lora in task.input.loras]
    if task.files_expired_at is not None:
        data["files_expired"] = True  # retention removed them: see result_retention
    return data


def status_body(task: Task, storage: Storage, queue_position: int | None = None) -> dict[str, Any]:
    """The whole status answer: what GET status returns and a callback POSTs."""
    return ok(status_data(task, storage, queue_position))


def encode(body: dict[str, Any]) -> bytes:
    """A body's bytes: how GET status, a callback and a stream event all write the same JSON."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
