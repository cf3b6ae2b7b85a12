"""Black Forest Labs' wire as a front door onto the one queue (docs/bfl-api.md).

`POST /v1/flux-2-*` queues a task through the unified submit's own path
(TaskService.submit) and `GET /v1/get_result` reads any task of the caller's
account, whichever door made it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials

from fluxserve.api.bfl_errors import GET_RESULT_PATH, BflApiRoute, in_bfl_words
from fluxserve.api.bfl_openapi import RESULT_ANSWERS, SUBMIT_ANSWERS
from fluxserve.api.bfl_schemas import BflInputs, inputs_of
from fluxserve.api.guard import api_key_of
from fluxserve.api.routes import BEARER, RuntimeDep
from fluxserve.bfl_models import BFL_PATHS
from fluxserve.bfl_wire import not_found_body, result_body
from fluxserve.errors import ApiError, NotFound, PermissionDenied
from fluxserve.store import ApiKeyRecord
from fluxserve.tasks import Task

router = APIRouter(route_class=BflApiRoute, tags=["Black Forest Labs"])

# Declares the key in the OpenAPI document; RequestGuard checks it.
X_KEY = APIKeyHeader(name="x-key", auto_error=False, description="A fluxserve API key")


async def api_key(
    request: Request,
    _: Annotated[str | None, Security(X_KEY)],
    __: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> ApiKeyRecord:
    # Authenticated by RequestGuard, before the body was read: `x-key`, or a
    # bearer token as on every other route (the document lists either).
    return api_key_of(request.scope)


KeyDep = Annotated[ApiKeyRecord, Depends(api_key)]


def submitted(task: Task, base_url: str) -> dict[str, Any]:
    """BFL's answer to a submit: the id, where to poll it, and what it costs."""
    spec = task.input
    megapixels = None
    if spec.width is not None and spec.height is not None:
        megapixels = spec.width * spec.height / 1_000_000
    return {
        "id": task.task_id,
        "polling_url": f"{base_url}{GET_RESULT_PATH}?id={task.task_id}",
        "cost": float(task.price),
        "input_mp": None,
        "output_mp": megapixels,
    }


def _add_submit(path: str) -> None:
    async def submit(body: BflInputs, key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
        model, task_input = body.task_input(path, rt.settings.bfl_models[path])
        try:
            task = await rt.service.submit(key, model, task_input, body.webhook_url)
        except ApiError as exc:
            exc.message = in_bfl_words(exc.message, [name for name, _ in body.images()])
            raise
        return submitted(task, rt.settings.base_url)

    # The body each path reads: the annotation above is text until FastAPI reads it.
    submit.__annotations__["body"] = inputs_of(path)
    submit.__doc__ = (
        f"Queue a task as BFL's `{path}` does; it runs on the fluxserve model the "
        "`bfl_models` setting names for this path."
    )
    router.add_api_route(
        f"/v1/{path}",
        submit,
        methods=["POST"],
        name=f"bfl_{path.replace('-', '_')}",
        **SUBMIT_ANSWERS,
    )


for _path in BFL_PATHS:
    _add_submit(_path)


@router.get(GET_RESULT_PATH, **RESULT_ANSWERS)
async def get_result(
    key: KeyDep, rt: RuntimeDep, task_id: Annotated[str, Query(alias="id")]
) -> Any:
    """Any task of the caller's account, in BFL's shape; `Task not found` (404) for
    an id that names none of them."""
    try:
        task = await rt.service.get(key, task_id)
    except (NotFound, PermissionDenied):
        return JSONResponse(not_found_body(task_id), status_code=404)
    return result_body(task, rt.storage)
