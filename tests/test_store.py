"""The store contract: written once, run on every backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from conftest import fresh_postgres_database

from fluxserve.store import Store, open_store
from fluxserve.store.base import Outcome
from fluxserve.tasks import NewTask, ResultFile, TaskInput, TaskStatus, new_task_id

INPUT = TaskInput(prompt="a red fox in snow", size="1:1", resolution="1K")


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'store.db'}"
        else:
            url = await stack.enter_async_context(fresh_postgres_database())
        backend = open_store(url)
        await backend.start()
        stack.push_async_callback(backend.close)
        yield backend


async def add(store: Store, model: str = "flux-2-pro", callback: str | None = None) -> str:
    task = await store.create_task(
        NewTask(new_task_id(), "key_a", model, INPUT, callback, time.time())
    )
    return task.task_id


def outcome() -> Outcome:
    return Outcome(
        "tiny", 7, 1024, 1024, [ResultFile("results/x/image.png", "image.png", "image/png", 10)]
    )


async def test_round_trip(store: Store) -> None:
    task_id = await add(store, callback="https://example.com/hook")
    task = await store.get_task(task_id)
    assert task is not None
    assert task.status is TaskStatus.NOT_STARTED
    assert task.input == INPUT and task.callback_url == "https://example.com/hook"
    assert await store.get_task("task-unified-0-missing0") is None


async def test_claims_oldest_first_and_only_served_models(store: Store) -> None:
    first = await add(store, "flux-2-flex")
    second = await add(store, "flux-2-pro")
    third = await add(store, "flux-2-pro")
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == second
    assert claim.task.status is TaskStatus.RUNNING and claim.task.attempts == 1
    claim = await store.claim_task(["flux-2-pro", "flux-2-flex"], "w1", 30)
    assert claim is not None and claim.task.task_id == first
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == third
    assert await store.claim_task(["flux-2-pro", "flux-2-flex"], "w1", 30) is None


async def test_concurrent_claims_never_share_a_task(store: Store) -> None:
    ids = {await add(store) for _ in range(20)}
    claims = await asyncio.gather(
        *(store.claim_task(["flux-2-pro"], f"w{i}", 30) for i in range(30))
    )
    claimed = [c.task.task_id for c in claims if c is not None]
    assert sorted(claimed) == sorted(ids)


async def test_finish_is_one_write_and_happens_once(store: Store) -> None:
    task_id = await add(store, callback="https://example.com/hook")
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    assert await store.finish_task(claim, outcome())
    assert not await store.finish_task(claim, outcome())
    assert not await store.fail_task(claim, "too late")
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.FINISHED and task.progress == 100
    assert task.files == tuple(outcome().files) and task.seed == 7
    callbacks = await store.claim_callbacks(10, 30)
    assert [c.task_id for c in callbacks] == [task_id]


async def test_no_callback_row_without_a_callback_url(store: Store) -> None:
    await add(store)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.fail_task(claim, "boom")
    assert await store.claim_callbacks(10, 30) == []
    assert await store.next_callback_at() is None


async def test_progress_only_rises_and_needs_the_lease(store: Store) -> None:
    task_id = await add(store)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    assert await store.report_progress(claim, 40, 30)
    assert await store.report_progress(claim, 20, 30)
    task = await store.get_task(task_id)
    assert task is not None and task.progress == 40
    await store.release_task(claim)
    assert not await store.report_progress(claim, 60, 30)


async def test_expired_leases_are_requeued_then_failed(store: Store) -> None:
    task_id = await add(store, callback="https://example.com/hook")
    for attempt in range(1, 3):
        claim = await store.claim_task(["flux-2-pro"], "w1", 0.01)
        assert claim is not None and claim.task.attempts == attempt
        await asyncio.sleep(0.02)
        assert await store.requeue_expired(max_attempts=2) == ((1, 0) if attempt < 2 else (0, 1))
        # The lost worker's late result is discarded.
        assert not await store.finish_task(claim, outcome())
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.FAILED
    assert task.error_message and "worker running this task was lost" in task.error_message
    assert [c.task_id for c in await store.claim_callbacks(10, 30)] == [task_id]


async def test_release_hands_back_without_spending_an_attempt(store: Store) -> None:
    task_id = await add(store)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.release_task(claim)
    again = await store.claim_task(["flux-2-pro"], "w2", 30)
    assert again is not None and again.task.task_id == task_id and again.task.attempts == 1


async def test_callback_attempts_are_recorded(store: Store) -> None:
    await add(store, callback="https://example.com/hook")
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.finish_task(claim, outcome())
    [record] = await store.claim_callbacks(10, 30)
    assert await store.claim_callbacks(10, 30) == []  # held while in flight
    retry_at = time.time() + 0.05
    await store.record_attempt(
        record.callback_id, delivered=False, error="HTTP 500", retry_at=retry_at
    )
    assert await store.next_callback_at() == pytest.approx(retry_at)
    await asyncio.sleep(0.06)
    [again] = await store.claim_callbacks(10, 30)
    assert again.event_id == record.event_id and again.attempts == 1
    await store.record_attempt(again.callback_id, delivered=True, error=None, retry_at=None)
    assert await store.next_callback_at() is None


async def test_keys(store: Store) -> None:
    await store.create_key("key_1", "alice", "h" * 64, "fsk_abcdef")
    record = await store.key_for_hash("h" * 64)
    assert record is not None and record.name == "alice" and record.revoked_at is None
    assert await store.revoke_key("key_1")
    assert not await store.revoke_key("key_1")
    record = await store.key_for_hash("h" * 64)
    assert record is not None and record.revoked_at is not None
    assert [k.key_id for k in await store.list_keys()] == ["key_1"]


async def test_queue_position_counts_the_queued_tasks_of_the_model_ahead(store: Store) -> None:
    first = await add(store)
    await add(store, "flux-2-flex")
    third = await add(store)
    assert await store.queue_position(first) == 1
    assert await store.queue_position(third) == 2
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == first
    assert await store.queue_position(first) is None
    assert await store.queue_position(third) == 1
