"""Rows to records: one mapping from a table row to the object the store hands out."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from fluxserve.store.base import ApiKeyRecord
from fluxserve.store.schema import tasks
from fluxserve.tasks import TERMINAL_EVENTS, ResultFile, Task, TaskInput, TaskStatus

TASK_BY_ID = tasks.select().where(tasks.c.task_id == sa.bindparam("task_id"))


def task_from_row(row: Any) -> Task:
    return Task(
        task_id=row.task_id,
        owner=row.owner,
        model=row.model,
        input=TaskInput.from_json(row.input),
        callback_url=row.callback_url,
        status=TaskStatus(row.status),
        progress=row.progress,
        created_at=row.created_at,
        engine=row.engine,
        seed=row.seed,
        width=row.width,
        height=row.height,
        error_message=row.error_message,
        files=tuple(ResultFile.from_json(f) for f in row.files),
        attempts=row.attempts,
        started_at=row.started_at,
        finished_at=row.finished_at,
        callback_events=tuple(row.callback_events or TERMINAL_EVENTS),
        account_id=row.account_id,
        price=row.price,
        cancelled_at=row.cancelled_at,
        files_expired_at=row.files_expired_at,
        upstream=row.upstream,
    )


def key_from_row(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        row.key_id, row.name, row.prefix, row.created_at, row.revoked_at, row.account_id
    )
