"""The account's routes: its balance, its task history, and cancelling a task."""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Query

from fluxserve.api.openapi import Balance, CancelData, TaskPage, answers
from fluxserve.api.routes import KeyDep, RuntimeDep
from fluxserve.api.schemas import one_of
from fluxserve.errors import InvalidRequest, NotFound
from fluxserve.tasks import MODELS, TaskStatus
from fluxserve.wire import ok, status_data

router = APIRouter()

STATUSES = tuple(status.value for status in TaskStatus)
MAX_PAGE = 100
MAX_CURSOR_DIGITS = 19  # enough for any 64-bit seq; more is no cursor this server gave out


@router.get("/api/user/balance", **answers(Balance, 404))
async def balance(key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """The credits the key's account can spend now, and what its tasks hold."""
    account = None if key.account_id is None else await rt.store.get_account(key.account_id)
    if account is None:
        raise NotFound("This API key belongs to no account")
    return ok(
        {"email": account.email, "credits_amount": account.available, "held_credits": account.held}
    )


@router.post("/api/generate/cancel/{task_id}", **answers(CancelData, 403, 404, 409))
async def cancel(task_id: str, key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """Cancel a queued task (it never starts) or a running one (it stops at its next step)."""
    task = await rt.service.cancel(key, task_id)
    for worker in rt.workers:
        # This process runs it: stop now rather than at the next progress write.
        worker.cancel(task_id)
    data = status_data(task, rt.storage)
    if not task.status.terminal:
        data["cancel_requested"] = True
    return ok(data)


@router.get("/api/generate/tasks", **answers(TaskPage, 400))
async def history(
    key: KeyDep,
    rt: RuntimeDep,
    status: Annotated[str | None, one_of(STATUSES, None)] = None,
    model: Annotated[str | None, one_of(MODELS, None)] = None,
    limit: Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": MAX_PAGE})] = 20,
    cursor: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """The account's tasks, newest first; pass `next_cursor` back for the next page."""
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
    if model is not None and model not in MODELS:
        raise InvalidRequest(f"model must be one of {', '.join(MODELS)}")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}")
    page = await rt.service.history(
        key, status=status, model=model, limit=limit, before=_decode_cursor(cursor)
    )
    return ok(
        {
            "tasks": [status_data(task, rt.storage) for task in page.tasks],
            "next_cursor": None if page.next_cursor is None else _encode_cursor(page.next_cursor),
        }
    )


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8
        text = ""
    prefix, _, number = text.partition(":")
    if (
        prefix == "seq"
        and number.isascii()
        and number.isdigit()
        and len(number) <= MAX_CURSOR_DIGITS
    ):
        return int(number)
    raise InvalidRequest("cursor is not one this server gave out; start again without it")
