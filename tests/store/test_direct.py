"""Statements run on the driver itself: the same rows SQLAlchemy's own engine reads and writes."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from fluxserve.store import Store
from fluxserve.store.base import IdempotencyKey, Outcome, SubmitLimits
from fluxserve.store.keys import KEY_BY_HASH
from fluxserve.store.rows import TASK_BY_ID, key_from_row, task_from_row
from fluxserve.store.schema import credit_ledger, idempotency_keys, tasks
from fluxserve.store.store import SqlStore
from fluxserve.store.submits import submit
from fluxserve.tasks import NewTask, ResultFile, TaskInput, TaskStatus

from conftest import queue_task

INPUT = TaskInput(prompt="a red fox in snow", size="1:1", resolution="1K", seed=7)


@asynccontextmanager
async def through_sqlalchemy(store: Store) -> AsyncIterator[AsyncConnection]:
    """A connection of SQLAlchemy's own engine, on the store's database."""
    assert isinstance(store, SqlStore)
    url = sa.engine.make_url(store.db.url)
    driver = "sqlite+aiosqlite" if url.drivername == "sqlite" else "postgresql+asyncpg"
    engine = create_async_engine(url.set(drivername=driver))
    try:
        async with engine.connect() as conn:
            yield conn
    finally:
        await engine.dispose()


async def test_a_task_and_its_queue_position_come_back_together(store: Store) -> None:
    first = await queue_task(store)
    await queue_task(store, "flux-2-flex")
    third = await queue_task(store)
    found = await store.get_task_and_position(third)
    assert found is not None
    task, position = found
    assert (task.task_id, task.status, position) == (third, TaskStatus.NOT_STARTED, 2)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == first
    assert await store.get_task_and_position(first) == (await store.get_task(first), None)
    assert await store.get_task_and_position("task-unified-0-missing0") is None


async def test_rows_read_on_the_driver_equal_those_read_through_sqlalchemy(store: Store) -> None:
    await store.create_key("key_1", "alice", "hash_1", "fsk_abc", "acct_a")
    task_id = await queue_task(store, callback="https://example.com/hook", seed=7)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    image = ResultFile(f"results/{task_id}/image.png", "image.png", "image/png", 1234)
    assert await store.finish_task(claim, Outcome("tiny", 7, 1024, 1024, [image]))

    async with through_sqlalchemy(store) as conn:
        task_row = (await conn.execute(TASK_BY_ID, {"task_id": task_id})).first()
        key_row = (await conn.execute(KEY_BY_HASH, {"key_hash": "hash_1"})).first()
    assert await store.get_task(task_id) == task_from_row(task_row)
    assert await store.key_for_hash("hash_1") == key_from_row(key_row)
    found = await store.get_task_and_position(task_id)
    assert found == (task_from_row(task_row), None)


async def test_a_submit_writes_the_same_rows_whichever_way_it_is_written(store: Store) -> None:
    assert isinstance(store, SqlStore)
    await store.create_account("acct_a", "alice@example.com")
    await store.grant_credits("acct_a", 100, None)
    limits = SubmitLimits(per_minute=10, concurrent=10)

    def priced(task_id: str) -> NewTask:
        return NewTask(task_id, "key_a", "acct_a", "flux-2-pro", INPUT, None, 1000.0, price=7)

    # With limits: in a transaction of its own (PostgreSQL: the turn, task, hold and
    # key in one statement within it).
    checked = await store.create_task(
        priced("task-checked"), limits=limits, idempotency=IdempotencyKey("k1", "h1", 60)
    )
    # Without limits, PostgreSQL writes it all in one statement, outside a transaction.
    alone = await store.create_task(
        priced("task-alone"), idempotency=IdempotencyKey("k3", "h1", 60)
    )
    assert alone == dataclasses.replace(checked, task_id="task-alone")
    # Statement by statement, as SQLite writes it.
    async with store.db.transaction() as conn:
        stepwise = await submit(
            conn, priced("task-stepwise"), limits, IdempotencyKey("k2", "h1", 60)
        )
    assert stepwise == dataclasses.replace(checked, task_id="task-stepwise")

    async with through_sqlalchemy(store) as conn:
        rows: dict[str, dict[str, Any]] = {
            row.task_id: row._asdict()
            for row in await conn.execute(tasks.select().order_by(tasks.c.seq))
        }
        ledger = (
            await conn.execute(
                sa.select(credit_ledger.c.task_id, credit_ledger.c.kind, credit_ledger.c.amount)
                .where(credit_ledger.c.kind == "hold")
                .order_by(credit_ledger.c.task_id)
            )
        ).all()
        keys = (
            await conn.execute(
                sa.select(idempotency_keys.c.idempotency_key, idempotency_keys.c.task_id).order_by(
                    idempotency_keys.c.idempotency_key
                )
            )
        ).all()
    first, second, third = rows["task-checked"], rows["task-alone"], rows["task-stepwise"]
    assert [second["vtime"], third["vtime"]] == [first["vtime"] + 1, first["vtime"] + 2]
    ignored = {"task_id", "seq", "vtime"}
    assert {k: v for k, v in first.items() if k not in ignored} == {
        k: v for k, v in second.items() if k not in ignored
    }
    assert {k: v for k, v in first.items() if k not in ignored} == {
        k: v for k, v in third.items() if k not in ignored
    }
    assert [tuple(row) for row in ledger] == [
        ("task-alone", "hold", 7),
        ("task-checked", "hold", 7),
        ("task-stepwise", "hold", 7),
    ]
    assert [tuple(row) for row in keys] == [
        ("k1", "task-checked"),
        ("k2", "task-stepwise"),
        ("k3", "task-alone"),
    ]
    account = await store.get_account("acct_a")
    assert account is not None and account.held == 21
    assert await store.get_task("task-checked") == checked
