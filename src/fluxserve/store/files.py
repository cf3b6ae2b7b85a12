"""Uploaded files and file retention.

Retention reads a batch, deletes the files, then writes that they are gone.
Several processes may sweep the same batch at once: deleting a missing file
succeeds, and each write here is safe to repeat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from fluxserve.errors import AlreadyStored
from fluxserve.store.base import UploadRecord
from fluxserve.store.connection import Database
from fluxserve.store.schema import tasks, uploads
from fluxserve.tasks import TaskStatus


def _upload(row: Any) -> UploadRecord:
    return UploadRecord(**{field.name: getattr(row, field.name) for field in _UPLOAD_FIELDS})


_UPLOAD_FIELDS = dataclasses.fields(UploadRecord)


async def add_upload(db: Database, upload: UploadRecord) -> None:
    try:
        await db.execute(uploads.insert().values(dataclasses.asdict(upload)))
    except AlreadyStored:
        # Ours, when a try whose connection was lost as it committed ran again.
        if await get_upload(db, upload.file_id) != upload:
            raise


async def get_upload(db: Database, file_id: str) -> UploadRecord | None:
    row = await db.one(uploads.select().where(uploads.c.file_id == file_id))
    return None if row is None else _upload(row)


async def expired_uploads(db: Database, now: float, limit: int) -> list[UploadRecord]:
    rows = await db.all(
        uploads.select()
        .where(uploads.c.expires_at <= now)
        .order_by(uploads.c.expires_at)
        .limit(limit)
    )
    return [_upload(row) for row in rows]


async def forget_uploads(db: Database, file_ids: Sequence[str]) -> None:
    if file_ids:
        await db.execute(uploads.delete().where(uploads.c.file_id.in_(list(file_ids))))


async def tasks_with_files(db: Database, ended_before: float, limit: int) -> dict[str, list[str]]:
    # Served by ix_tasks_finished (status, finished_at). Failed tasks have no files.
    rows = await db.all(
        sa.select(tasks.c.task_id, tasks.c.files)
        .where(
            tasks.c.status == TaskStatus.FINISHED.value,
            tasks.c.finished_at < ended_before,
            tasks.c.files_expired_at.is_(None),
        )
        .order_by(tasks.c.finished_at)
        .limit(limit)
    )
    return {row.task_id: [file["key"] for file in row.files] for row in rows}


async def mark_files_expired(db: Database, task_ids: Sequence[str], at: float) -> None:
    if task_ids:
        await db.execute(
            tasks.update()
            .where(tasks.c.task_id.in_(list(task_ids)), tasks.c.files_expired_at.is_(None))
            .values(files_expired_at=at)
        )
