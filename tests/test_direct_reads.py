"""Hot reads on the driver itself: one round trip, and the same rows SQLAlchemy reads."""

from __future__ import annotations

import time

from fluxserve.store import Store
from fluxserve.store.base import Outcome
from fluxserve.store.rows import key_from_row, task_from_row
from fluxserve.store.sql import _KEY_BY_HASH, _TASK_BY_ID, SqlStore
from fluxserve.tasks import NewTask, ResultFile, TaskInput, TaskStatus, new_task_id

INPUT = TaskInput(prompt="a red fox in snow", size="1:1", resolution="1K", seed=7)


async def add(store: Store, model: str = "flux-2-pro") -> str:
    task = await store.create_task(
        NewTask(
            new_task_id(), "key_a", "acct_a", model, INPUT, "https://example.com/hook", time.time()
        )
    )
    return task.task_id


async def test_a_task_and_its_queue_position_come_back_together(store: Store) -> None:
    first = await add(store)
    await add(store, "flux-2-flex")
    third = await add(store)
    found = await store.get_task_and_position(third)
    assert found is not None
    task, position = found
    assert (task.task_id, task.status, position) == (third, TaskStatus.NOT_STARTED, 2)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == first
    assert await store.get_task_and_position(first) == (await store.get_task(first), None)
    assert await store.get_task_and_position("task-unified-0-missing0") is None


async def test_rows_read_on_the_driver_equal_those_read_through_sqlalchemy(store: Store) -> None:
    assert isinstance(store, SqlStore)
    await store.create_key("key_1", "alice", "hash_1", "fsk_abc", "acct_a")
    task_id = await add(store)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    image = ResultFile(f"results/{task_id}/image.png", "image.png", "image/png", 1234)
    assert await store.finish_task(claim, Outcome("tiny", 7, 1024, 1024, [image]))

    task_row = await SqlStore._fetch_one(store, _TASK_BY_ID, task_id=task_id)
    key_row = await SqlStore._fetch_one(store, _KEY_BY_HASH, key_hash="hash_1")
    assert await store.get_task(task_id) == task_from_row(task_row)
    assert await store.key_for_hash("hash_1") == key_from_row(key_row)
    found = await store.get_task_and_position(task_id)
    assert found == (task_from_row(task_row), None)
