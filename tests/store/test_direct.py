"""Hot reads and submits on the driver itself: the same rows SQLAlchemy reads and writes."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa

from fluxserve.store import Store
from fluxserve.store.admission import submit
from fluxserve.store.base import IdempotencyKey, Outcome, SubmitLimits
from fluxserve.store.rows import TASK_BY_ID, key_from_row, task_from_row
from fluxserve.store.schema import credit_ledger, idempotency_keys, tasks
from fluxserve.store.sql import SqlStore
from fluxserve.store.sql_accounts import _KEY_BY_HASH
from fluxserve.tasks import NewTask, ResultFile, TaskInput, TaskStatus

from conftest import queue_task

INPUT = TaskInput(prompt="a red fox in snow", size="1:1", resolution="1K", seed=7)


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
    assert isinstance(store, SqlStore)
    await store.create_key("key_1", "alice", "hash_1", "fsk_abc", "acct_a")
    task_id = await queue_task(store, callback="https://example.com/hook", seed=7)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    image = ResultFile(f"results/{task_id}/image.png", "image.png", "image/png", 1234)
    assert await store.finish_task(claim, Outcome("tiny", 7, 1024, 1024, [image]))

    task_row = await SqlStore._fetch_one(store, TASK_BY_ID, task_id=task_id)
    key_row = await SqlStore._fetch_one(store, _KEY_BY_HASH, key_hash="hash_1")
    assert await store.get_task(task_id) == task_from_row(task_row)
    assert await store.key_for_hash("hash_1") == key_from_row(key_row)
    found = await store.get_task_and_position(task_id)
    assert found == (task_from_row(task_row), None)


async def test_a_submit_on_the_driver_writes_what_one_through_sqlalchemy_writes(
    store: Store,
) -> None:
    assert isinstance(store, SqlStore)
    await store.create_account("acct_a", "alice@example.com")
    await store.grant_credits("acct_a", 100, None)
    limits = SubmitLimits(per_minute=10, concurrent=10)

    def priced(task_id: str) -> NewTask:
        return NewTask(task_id, "key_a", "acct_a", "flux-2-pro", INPUT, None, 1000.0, price=7)

    driver = await store.create_task(
        priced("task-driver"), limits=limits, idempotency=IdempotencyKey("k1", "h1", 60)
    )
    # Without limits, PostgreSQL writes it all in one statement, outside a transaction.
    alone = await store.create_task(
        priced("task-alone"), idempotency=IdempotencyKey("k3", "h1", 60)
    )
    assert alone == dataclasses.replace(driver, task_id="task-alone")
    # The same program, run by the base class on a SQLAlchemy connection.
    through_sqlalchemy = await SqlStore._transact_alone(
        store,
        lambda: submit(priced("task-sqlalchemy"), limits, IdempotencyKey("k2", "h1", 60)),
        (),
    )
    assert through_sqlalchemy == dataclasses.replace(driver, task_id="task-sqlalchemy")

    async with store._read() as conn:
        rows = {
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
    first, second, third = rows["task-driver"], rows["task-alone"], rows["task-sqlalchemy"]
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
        ("task-driver", "hold", 7),
        ("task-sqlalchemy", "hold", 7),
    ]
    assert [tuple(row) for row in keys] == [
        ("k1", "task-driver"),
        ("k2", "task-sqlalchemy"),
        ("k3", "task-alone"),
    ]
    account = await store.get_account("acct_a")
    assert account is not None and account.held == 21
    assert await store.get_task("task-driver") == driver
