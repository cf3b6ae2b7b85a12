"""The routes of the wire contract (docs/api.md) and the file server (docs/api.md, "Files")."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fluxserve.api.file_response import file_response
from fluxserve.api.guard import api_key_of
from fluxserve.api.json_body import JsonBodyRoute
from fluxserve.api.openapi import (
    FILE_ANSWERS,
    METRICS_ANSWERS,
    Liveness,
    Readiness,
    StatusData,
    SubmittedData,
    answers,
    probe_answers,
)
from fluxserve.api.schemas import SubmitBody
from fluxserve.errors import NotFound
from fluxserve.probes import Probe, liveness, readiness
from fluxserve.runtime import Runtime
from fluxserve.storage.local import FILES_ROUTE, LocalStorage
from fluxserve.store import ApiKeyRecord
from fluxserve.tasks import format_time
from fluxserve.wire import ok

router = APIRouter(route_class=JsonBodyRoute)
JSON = "application/json"


async def runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency on a worker thread, a hand-off
    # that costs more than the rest of a status read.
    rt: Runtime = request.app.state.runtime
    return rt


# Declares the key in the OpenAPI document; RequestGuard checks it.
BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


async def api_key(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
) -> ApiKeyRecord:
    # Authenticated by RequestGuard, before the body was read.
    return api_key_of(request.scope)


RuntimeDep = Annotated[Runtime, Depends(runtime)]
KeyDep = Annotated[ApiKeyRecord, Depends(api_key)]


SUBMIT_PATH = "/api/generate/submit"


@router.post(SUBMIT_PATH, **answers(SubmittedData, 400, 402, 409, 429))
async def submit(
    body: SubmitBody,
    key: KeyDep,
    rt: RuntimeDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict[str, Any]:
    """Queue a task; answered once it is committed. A repeated Idempotency-Key
    answers its first task again."""
    task = await rt.service.submit(
        key,
        body.model,
        body.task_input(),
        body.callback_url,
        body.task_callback_events(),
        idempotency=None if idempotency_key is None else (idempotency_key, body.digest()),
    )
    return ok(
        {
            "task_id": task.task_id,
            "status": task.status.value,
            "created_time": format_time(task.created_at),
        }
    )


@router.get("/api/generate/status/{task_id}", **answers(StatusData, 403, 404))
async def status(task_id: str, key: KeyDep, rt: RuntimeDep) -> Response:
    """The task's status, progress and, once finished, its files."""
    task, position = await rt.service.get_with_position(key, task_id)
    # Rendered by the runtime, not FastAPI: a stream event carries these same bytes.
    return Response(rt.render_status(task, position), media_type=JSON)


@router.api_route(
    FILES_ROUTE + "/{key:path}",
    methods=["GET", "HEAD"],
    response_class=Response,
    responses=FILE_ANSWERS,
)
async def download(
    key: str,
    request: Request,
    rt: RuntimeDep,
    range_header: Annotated[str | None, Header(alias="range")] = None,
    if_range: Annotated[str | None, Header()] = None,
) -> Response:
    """A stored file, or one byte range of it; its key is unguessable, so the URL
    itself is the credential."""
    # Only local storage is served here; S3 hands out its own (presigned) URLs.
    path = rt.storage.path_for(key) if isinstance(rt.storage, LocalStorage) else None
    response = (
        None
        if path is None
        else file_response(path, range_header, if_range, with_body=request.method != "HEAD")
    )
    if response is None:
        raise NotFound("File not found")
    return response


@router.get("/health", **probe_answers(Liveness))
async def health(rt: RuntimeDep) -> JSONResponse:
    """Liveness: 200 while the process lives, 503 once it must be restarted. No database."""
    return _answer(liveness(rt))


@router.get("/ready", **probe_answers(Readiness))
async def ready(rt: RuntimeDep) -> JSONResponse:
    """Readiness: 200 when this process should be sent work, else 503 with the reasons."""
    return _answer(await readiness(rt))


def _answer(probe: Probe) -> JSONResponse:
    return JSONResponse(probe.body, status_code=probe.status_code)


# A plain Response: errors take their media type from the route's class, and
# they are JSON whatever the route's success is.
@router.get("/metrics", response_class=Response, responses=METRICS_ANSWERS)
async def metrics(
    rt: RuntimeDep, accept: Annotated[str | None, Header(include_in_schema=False)] = None
) -> Response:
    """The metrics in the Prometheus text format (or OpenMetrics, when `Accept` asks)."""
    body, content_type = await rt.metrics.render(accept)
    return Response(body, headers={"content-type": content_type})
