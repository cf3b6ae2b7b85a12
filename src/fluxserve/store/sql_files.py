"""Uploaded files and file retention, on the shared SQL store.

Retention reads a batch, deletes the files, then writes that they are gone.
Several processes may sweep the same batch at once: deleting a missing file
succeeds, and each write here is safe to repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from fluxserve.store.base import UploadRecord
from fluxserve.store.schema import tasks, uploads
from fluxserve.store.sql_base import SqlBase
from fluxserve.tasks import TaskStatus


def _upload(row: Any) -> UploadRecord:
    return UploadRecord(
        file_id=row.file_id,
        account_id=row.account_id,
        key=row.key,
        file_name=row.file_name,
        original_name=row.original_name,
        file_size=row.file_size,
        mime_type=row.mime_type,
        upload_path=row.upload_path,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


class FileQueries(SqlBase):
    """Uploads and the retention of uploaded and result files; mixed into SqlStore."""

    async def add_upload(self, upload: UploadRecord) -> None:
        async with self._write() as conn:
            await conn.execute(
                uploads.insert().values(
                    file_id=upload.file_id,
                    account_id=upload.account_id,
                    key=upload.key,
                    file_name=upload.file_name,
                    original_name=upload.original_name,
                    file_size=upload.file_size,
                    mime_type=upload.mime_type,
                    upload_path=upload.upload_path,
                    created_at=upload.created_at,
                    expires_at=upload.expires_at,
                )
            )

    async def get_upload(self, file_id: str) -> UploadRecord | None:
        async with self._read() as conn:
            row = (await conn.execute(uploads.select().where(uploads.c.file_id == file_id))).first()
        return None if row is None else _upload(row)

    async def expired_uploads(self, now: float, limit: int) -> list[UploadRecord]:
        statement = (
            uploads.select()
            .where(uploads.c.expires_at <= now)
            .order_by(uploads.c.expires_at)
            .limit(limit)
        )
        async with self._read() as conn:
            return [_upload(row) for row in await conn.execute(statement)]

    async def forget_uploads(self, file_ids: Sequence[str]) -> None:
        if not file_ids:
            return
        async with self._write() as conn:
            await conn.execute(uploads.delete().where(uploads.c.file_id.in_(file_ids)))

    async def tasks_with_files(self, ended_before: float, limit: int) -> dict[str, list[str]]:
        # Served by ix_tasks_finished (status, finished_at). Failed tasks have no files.
        statement = (
            sa.select(tasks.c.task_id, tasks.c.files)
            .where(
                tasks.c.status == TaskStatus.FINISHED.value,
                tasks.c.finished_at < ended_before,
                tasks.c.files_expired_at.is_(None),
            )
            .order_by(tasks.c.finished_at)
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(statement)).all()
        return {row.task_id: [file["key"] for file in row.files] for row in rows}

    async def mark_files_expired(self, task_ids: Sequence[str], at: float) -> None:
        if not task_ids:
            return
        async with self._write() as conn:
            await conn.execute(
                tasks.update()
                .where(tasks.c.task_id.in_(task_ids), tasks.c.files_expired_at.is_(None))
                .values(files_expired_at=at)
            )
