"""The OpenAPI document: what each route answers, as it really answers it.

The routes build their answers as dicts, which FastAPI serializes by their
`dict[str, Any]` annotation (in pydantic's core: faster than validating a model
on the way out), so the models here only describe them. A route names its
success body and the error statuses of its own, `answers(Model, 403, 404)`, and
the errors come from one table for every route. The document drops FastAPI's
default 422: a request that does not validate is answered 400 in the error
envelope (see envelope.py), except on Black Forest Labs' wire (bfl_errors.py).
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from fluxserve.api.envelope import error_type
from fluxserve.api.schemas import one_of
from fluxserve.store.base import CallbackState
from fluxserve.tasks import CALLBACK_EVENTS, MODELS, OUTPUT_FORMATS, TaskStatus
from fluxserve.uploads import MIME_TYPES

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
_WHEN: dict[int, dict[str, Any]] = {
    400: {
        "description": "A broken rule or a body that cannot be read; the message names the field"
    },
    401: {"description": "Missing, unknown or revoked API key"},
    402: {"description": "The task's price is more than the account's available credits"},
    403: {"description": "The task belongs to another account"},
    404: {"description": "No such task, file, account or route"},
    409: {"description": "The request conflicts with the task's state or an earlier request"},
    413: {"description": "The request or the file in it is larger than allowed"},
    429: {"description": "Past the key's rate or active-task limit", "headers": _RETRY_AFTER},
    503: {"description": "The database cannot be reached right now", "headers": _RETRY_AFTER},
}

# The wire's time format: UTC, no zone (tasks.format_time).
Time = Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")]


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong; names the field at fault")
    type: str


class ErrorEnvelope(BaseModel):
    """Every error: the HTTP status is `code`."""

    code: int = Field(ge=400, le=599)
    error: ErrorDetail


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error answers a route can give: the error
    envelope, with the `code` and `type` of each status."""
    return {status: _error(status) for status in sorted(statuses)}


def _error(status: int) -> dict[str, Any]:
    exact = {
        "properties": {
            "code": {"const": status},
            "error": {"properties": {"type": {"const": error_type(status)}}},
        }
    }
    return {
        "model": ErrorEnvelope,
        "content": {"application/json": {"schema": exact}},
        **_WHEN[status],
    }


DataT = TypeVar("DataT")


class Ok(BaseModel, Generic[DataT]):
    """The success envelope."""

    code: Literal[200]
    data: DataT


ANY_ROUTE = (413, 503)
"""What any route can answer: a body past its cap (RequestGuard), the store down."""
ANY_API_ROUTE = (401, *ANY_ROUTE)
"""And under /api/, where RequestGuard wants a key first."""


def answers(data: type[BaseModel], *statuses: int) -> dict[str, Any]:
    """An /api/ route's documented answers, as keyword arguments of its decorator:
    `data` inside the success envelope, the error statuses of its own and those of
    every /api/ route."""
    ok: dict[int | str, dict[str, Any]] = {200: {"model": Ok[data]}}  # type: ignore[valid-type]
    return {"responses": {**ok, **errors(*statuses, *ANY_API_ROUTE)}}


class SubmittedData(BaseModel):
    task_id: str
    status: TaskStatus
    created_time: Time


class FileData(BaseModel):
    file_url: str
    file_type: Literal["image"]
    file_name: str
    content_type: str = one_of(tuple(OUTPUT_FORMATS.values()))
    file_size: int = Field(ge=0)


class LoraUsed(BaseModel):
    """A LoRA a task runs with: its `name` or its `url`, and its scale."""

    name: str | SkipJsonSchema[None] = None
    url: str | SkipJsonSchema[None] = None
    scale: float


class StatusData(BaseModel):
    """A task's status; the body of its callbacks too."""

    task_id: str
    status: TaskStatus
    files: list[FileData]
    created_time: Time
    progress: int = Field(ge=0, le=100)
    error_message: str | None
    credits_amount: int = Field(ge=0)
    model: str = one_of(MODELS)
    engine: str | None
    seed: int | None
    # Present only when they apply:
    width: int | SkipJsonSchema[None] = None
    height: int | SkipJsonSchema[None] = None
    queue_position: int | SkipJsonSchema[None] = Field(None, ge=1, description="While queued")
    cancelled: Literal[True] | SkipJsonSchema[None] = None
    files_expired: Literal[True] | SkipJsonSchema[None] = Field(
        None, description="The files were removed after result_retention"
    )
    loras: list[LoraUsed] | SkipJsonSchema[None] = Field(
        None, description="The LoRAs the task runs with, in the order given"
    )


class CancelData(StatusData):
    cancel_requested: Literal[True] | SkipJsonSchema[None] = Field(
        None, description="A running task is still stopping"
    )


class TaskPage(BaseModel):
    tasks: list[StatusData]
    next_cursor: str | None = Field(description="Pass back as `cursor`; null on the last page")


class Balance(BaseModel):
    email: str
    credits_amount: int = Field(description="What new tasks can spend")
    held_credits: int = Field(ge=0, description="What queued and running tasks hold")


class SecretData(BaseModel):
    secret: str = Field(pattern="^whsec_")
    created_time: Time
    previous_secret_expires_time: Time | None


class AttemptData(BaseModel):
    time: Time
    status_code: int | None
    error: str | None
    duration_ms: int = Field(ge=0)


class EventData(BaseModel):
    event_id: str
    event_type: str = one_of(CALLBACK_EVENTS)
    url: str
    state: CallbackState
    created_time: Time
    next_attempt_time: Time | None
    delivered_time: Time | None
    attempts: list[AttemptData]


class CallbackLog(BaseModel):
    task_id: str
    callback_url: str | None
    callback_events: list[str] = Field(json_schema_extra={"items": {"enum": list(CALLBACK_EVENTS)}})
    events: list[EventData]


class UploadData(BaseModel):
    file_id: str
    file_name: str
    original_name: str | None
    file_size: int = Field(ge=0)
    mime_type: str = one_of(tuple(MIME_TYPES.values()))
    upload_path: str | None
    file_url: str
    download_url: str
    upload_time: Time
    expires_at: Time


class WorkerHealth(BaseModel):
    state: str
    engine: str
    error: str | None


class FleetWorker(BaseModel):
    worker_id: str
    state: str
    engine: str | None
    models: list[str]


class Liveness(BaseModel):
    status: Literal["ok", "failing"]
    reason: str | None = Field(default=None, description="Why the process must be restarted")
    worker: WorkerHealth | None = Field(description="This process's worker; null in `api`")


class SchemaRevisions(BaseModel):
    database: str | None
    code: str | None


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    reasons: list[str]
    worker: WorkerHealth | None = Field(description="This process's worker; null in `api`")
    schema_: SchemaRevisions | None = Field(alias="schema", description="Null: no database")
    queue: dict[str, int] | None = Field(description="Queued tasks per model")
    workers: list[FleetWorker] | None


def probe_answers(body: type[BaseModel]) -> dict[str, Any]:
    """A probe's documented answers: `body` with 200 when it passes, 503 when not."""
    return {
        "response_model": None,
        "responses": {
            200: {"model": body},
            503: {"model": body, "description": "The probe fails; the body says why"},
            **errors(413),
        },
    }


FILE_TYPES = sorted({*OUTPUT_FORMATS.values(), *MIME_TYPES.values()})
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FILE_HEADERS = {
    name: {"required": True, "schema": {"type": "string"}}
    for name in ("accept-ranges", "etag", "last-modified", "content-length")
}
_RANGE_HEADER = {"content-range": {"required": True, "schema": {"type": "string"}}}
FILE_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The whole file",
        "content": dict.fromkeys(FILE_TYPES, _BINARY),
        "headers": _FILE_HEADERS,
    },
    206: {
        "description": "The byte range asked for",
        "content": dict.fromkeys(FILE_TYPES, _BINARY),
        "headers": {**_FILE_HEADERS, **_RANGE_HEADER},
    },
    416: {"description": "The range lies past the end of the file", "headers": _RANGE_HEADER},
    **errors(404, 413),
}
METRICS_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The Prometheus text format, or OpenMetrics when `Accept` asks for it",
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/openmetrics-text": {"schema": {"type": "string"}},
        },
    },
    **errors(*ANY_ROUTE),
}


def install_openapi(app: FastAPI) -> None:
    """Serve the document without FastAPI's default 422 answers, which never happen,
    with one operation id per operation, and with each success schema as documented
    alone, not merged with the bare object of the route's `dict` annotation."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():
                # FastAPI gives each method of a route (GET and HEAD of /files)
                # the same operation id; they are told apart below.
                warnings.filterwarnings("ignore", "Duplicate Operation ID")
                schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            ids: set[str] = set()
            for path in schema["paths"].values():
                for method, operation in path.items():
                    # FastAPI's own 422 only: Black Forest Labs' wire answers its own.
                    if operation["responses"].get("422", {}).get("description") == (
                        "Validation Error"
                    ):
                        del operation["responses"]["422"]
                    ok = operation["responses"]["200"].get("content", {}).get("application/json")
                    if ok and "$ref" in ok["schema"]:
                        ok["schema"] = {"$ref": ok["schema"]["$ref"]}
                    if operation["operationId"] in ids:
                        operation["operationId"] += f"_{method}"
                    ids.add(operation["operationId"])
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
