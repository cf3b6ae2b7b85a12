"""The store contract for uploads and file retention, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from fluxserve.store import Store
from fluxserve.store.base import Outcome, UploadRecord
from fluxserve.tasks import NewTask, ResultFile, TaskInput, new_task_id

INPUT = TaskInput(prompt="a heron at dusk", size="1:1", resolution="1K")


UPLOAD = UploadRecord(
    file_id="",
    account_id="acct_a",
    key="",
    file_name="cat.png",
    original_name="IMG 0001.PNG",
    file_size=1234,
    mime_type="image/png",
    upload_path=None,
    created_at=1_000.0,
    expires_at=0.0,
)


def upload(file_id: str, expires_at: float, **changes: Any) -> UploadRecord:
    key = f"uploads/{file_id}/cat.png"
    return dataclasses.replace(UPLOAD, file_id=file_id, key=key, expires_at=expires_at, **changes)


async def finished_task(store: Store, files: int = 1) -> str:
    """A task run to the end with `files` result files; returns its id."""
    task = await store.create_task(
        NewTask(new_task_id(), "key_a", "acct_a", "flux-2-pro", INPUT, None, time.time())
    )
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == task.task_id
    results = [
        ResultFile(f"results/{task.task_id}/image-{i}.png", f"image-{i}.png", "image/png", 10)
        for i in range(files)
    ]
    assert await store.finish_task(claim, Outcome("tiny", 7, 64, 64, results))
    return task.task_id


async def test_an_upload_round_trips(store: Store) -> None:
    record = upload("a" * 32, 5_000.0, upload_path="avatars/2025", original_name=None)
    await store.add_upload(record)
    assert await store.get_upload("a" * 32) == record
    assert await store.get_upload("b" * 32) is None


async def test_expired_uploads_come_earliest_first_in_batches(store: Store) -> None:
    for file_id, expires_at in [("late", 3_000.0), ("first", 1_000.0), ("second", 2_000.0)]:
        await store.add_upload(upload(file_id, expires_at))
    await store.add_upload(upload("future", 9_000.0))
    assert [u.file_id for u in await store.expired_uploads(2_500.0, 10)] == ["first", "second"]
    assert [u.file_id for u in await store.expired_uploads(5_000.0, 2)] == ["first", "second"]
    assert await store.expired_uploads(500.0, 10) == []


async def test_forgetting_uploads_is_safe_to_repeat(store: Store) -> None:
    await store.add_upload(upload("one", 1_000.0))
    await store.add_upload(upload("two", 1_000.0))
    await store.forget_uploads(["one", "never-was"])
    await store.forget_uploads(["one"])
    await store.forget_uploads([])
    assert await store.get_upload("one") is None
    assert [u.file_id for u in await store.expired_uploads(2_000.0, 10)] == ["two"]


async def test_finished_tasks_list_their_files_until_marked_expired(store: Store) -> None:
    first = await finished_task(store, files=2)
    second = await finished_task(store)
    # A failed and a queued task have no files to expire.
    failing = await store.create_task(
        NewTask(new_task_id(), "key_a", "acct_a", "flux-2-flex", INPUT, None, time.time())
    )
    claim = await store.claim_task(["flux-2-flex"], "w1", 30)
    assert claim is not None and claim.task.task_id == failing.task_id
    assert await store.fail_task(claim, "boom")
    await store.create_task(
        NewTask(new_task_id(), "key_a", "acct_a", "flux-2-pro", INPUT, None, time.time())
    )

    later = time.time() + 60
    assert await store.tasks_with_files(time.time() - 3600, 10) == {}
    assert await store.tasks_with_files(later, 10) == {
        first: [f"results/{first}/image-0.png", f"results/{first}/image-1.png"],
        second: [f"results/{second}/image-0.png"],
    }
    assert list(await store.tasks_with_files(later, 1)) == [first]

    await store.mark_files_expired([first], at=123.0)
    await store.mark_files_expired([first], at=456.0)  # a second sweep changes nothing
    task = await store.get_task(first)
    assert task is not None and task.files_expired_at == 123.0
    assert list(await store.tasks_with_files(later, 10)) == [second]
    untouched = await store.get_task(second)
    assert untouched is not None and untouched.files_expired_at is None


async def test_concurrent_sweeps_mark_each_task_once(store: Store) -> None:
    ids = [await finished_task(store) for _ in range(5)]
    await asyncio.gather(*(store.mark_files_expired(ids, at=float(i)) for i in range(1, 4)))
    marks = {task.files_expired_at for i in ids if (task := await store.get_task(i)) is not None}
    assert len(marks) == 1 and marks <= {1.0, 2.0, 3.0}
    assert await store.tasks_with_files(time.time() + 60, 10) == {}
