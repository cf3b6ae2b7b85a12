"""The wire contract's words and answers, shared by the server and `fluxserve.client`.

This module imports pydantic and the standard library only, so the client can
use it without the server's dependencies. The server takes its vocabularies
from here (models, statuses, output formats, callback events). Its answers it
writes as plain dicts on the hot paths, because building and dumping a model
costs about 15 times the dict per status answer (20 us against 1.5 us,
measured); the test suite checks every kind of answer the server writes
against the models below, field for field, so the two cannot drift apart
unnoticed.

Each model holds the hosted API's documented fields, then fluxserve's
additions as optional fields, and keeps any other field a server sends
(`extra="allow"`): a client built on them works against any server of the
same wire shape.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

MODELS: tuple[str, ...] = ("flux-2-pro", "flux-2-pro-edit", "flux-2-flex", "flux-2-flex-edit")
EDIT_MODELS = frozenset(m for m in MODELS if m.endswith("-edit"))
OUTPUT_FORMATS: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# What a task's callback_url can be told, in the order a task meets them. The
# terminal two go through the durable outbox; the others are best effort.
CALLBACK_EVENTS: tuple[str, ...] = ("running", "progress", "finished", "failed")
TERMINAL_EVENTS: tuple[str, ...] = ("finished", "failed")
"""The default `callback_events`: what the hosted API sends."""


class TaskStatus(StrEnum):
    NOT_STARTED = "not_started"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.FINISHED, TaskStatus.FAILED)


class WireModel(BaseModel):
    """An answer's `data`: the fields below, and whatever else the server sent."""

    model_config = ConfigDict(extra="allow", frozen=True)


class FileInfo(WireModel):
    """One result file of a finished task."""

    file_url: str
    file_type: str = "image"
    file_name: str | None = None
    content_type: str | None = None
    file_size: int | None = None


class TaskLora(WireModel):
    """One LoRA of a task: an `input.loras` entry, and the status data's `loras`."""

    name: str | None = None
    url: str | None = None
    scale: float = 1.0


class TaskData(WireModel):
    """A task's status: GET status, cancel, each history entry, a callback's body."""

    task_id: str
    status: TaskStatus
    files: list[FileInfo] = []
    created_time: str | None = None
    progress: int = 0
    error_message: str | None = None
    credits_amount: int | None = None
    # fluxserve's additions: absent from a hosted server's answers.
    model: str | None = None
    engine: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    queue_position: int | None = None
    cancelled: bool = False
    cancel_requested: bool = False
    files_expired: bool = False
    loras: list[TaskLora] | None = None  # present when the task asked for LoRAs


class SubmittedTask(WireModel):
    """The answer to a submit."""

    task_id: str
    status: TaskStatus = TaskStatus.NOT_STARTED
    created_time: str | None = None


class TaskPage(WireModel):
    """One page of the account's tasks, newest first; `next_cursor` is None on the last."""

    tasks: list[TaskData]
    next_cursor: str | None = None


class UploadedFile(WireModel):
    """An uploaded image: pass its `file_url` in `image_urls`."""

    file_url: str
    file_id: str | None = None
    file_name: str | None = None
    original_name: str | None = None
    file_size: int | None = None
    mime_type: str | None = None
    upload_path: str | None = None
    download_url: str | None = None
    upload_time: str | None = None
    expires_at: str | None = None


class Balance(WireModel):
    """What the account can spend now (`credits_amount`) and what its tasks hold."""

    credits_amount: int
    email: str | None = None
    held_credits: int | None = None


class LoraInfo(WireModel):
    """A LoRA a task may name: `source` is "folder" or "huggingface"."""

    name: str
    source: str
    base_model: str | None = None


class LoraList(WireModel):
    """GET /api/loras: the LoRAs a task may name, and what LoRAs the server accepts."""

    loras: list[LoraInfo]
    max_loras: int | None = None
    urls_allowed: bool | None = None
    models: list[str] = []


class ErrorInfo(WireModel):
    """The `error` of the error envelope."""

    message: str
    type: str
