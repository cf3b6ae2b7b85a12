"""Deleting files whose time is up: uploads past `expires_at`, and the result files of
tasks that ended more than `result_retention` seconds ago.

Local storage's partial files left by killed writers go too, an hour after they
were begun. Runs in every process's sweeper, in batches. Files go first and records after, so a
sweep cut short leaves records whose files the next sweep deletes again (a missing
file is no error), never files that no record points to.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fluxserve.settings import Settings
from fluxserve.storage import Storage
from fluxserve.storage.local import LocalStorage
from fluxserve.store.ports import Files

BATCH = 100
PARTIAL_FILE_AGE = 3600.0
"""Seconds after which a partial file's writer is surely gone (a write takes milliseconds)."""


@dataclass(frozen=True)
class Swept:
    """What one sweep removed."""

    uploads: int
    tasks: int
    partials: int


async def sweep(
    store: Files, storage: Storage, settings: Settings, now: float | None = None
) -> Swept:
    """Delete every file that has expired at `now` (default: the current time)."""
    now = time.time() if now is None else now
    uploads = await remove_expired_uploads(store, storage, now)
    tasks = 0
    if settings.result_retention is not None:
        tasks = await remove_old_results(store, storage, now - settings.result_retention, now)
    partials = 0
    if isinstance(storage, LocalStorage):
        partials = await storage.remove_stale_partials(now - PARTIAL_FILE_AGE)
    return Swept(uploads=uploads, tasks=tasks, partials=partials)


async def remove_expired_uploads(store: Files, storage: Storage, now: float) -> int:
    """Delete uploads whose `expires_at` has passed; how many."""
    removed = 0
    while True:
        batch = await store.expired_uploads(now, BATCH)
        await asyncio.gather(*(storage.delete(upload.key) for upload in batch))
        await store.forget_uploads([upload.file_id for upload in batch])
        removed += len(batch)
        if len(batch) < BATCH:
            return removed


async def remove_old_results(
    store: Files, storage: Storage, ended_before: float, now: float
) -> int:
    """Delete the files of tasks that finished before `ended_before`; how many tasks."""
    removed = 0
    while True:
        batch = await store.tasks_with_files(ended_before, BATCH)
        await asyncio.gather(*(storage.delete(key) for keys in batch.values() for key in keys))
        await store.mark_files_expired(list(batch), now)
        removed += len(batch)
        if len(batch) < BATCH:
            return removed
