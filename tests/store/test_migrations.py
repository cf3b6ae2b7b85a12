"""Migrations carry existing data forward, on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from importlib import resources
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fluxserve.store import open_store
from fluxserve.store.schema import api_keys, callbacks, metadata, tasks
from fluxserve.tasks import TERMINAL_EVENTS, NewTask, TaskInput

from conftest import fresh_postgres_database, queue_position

INPUT = TaskInput(prompt="a new task", size="1:1", resolution="1K")


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            yield f"sqlite:///{tmp_path / 'store.db'}"
        else:
            yield await stack.enter_async_context(fresh_postgres_database())


def async_engine(database_url: str) -> AsyncEngine:
    """SQLAlchemy's own engine on the database, to write rows as older versions did."""
    driver = "sqlite+aiosqlite" if database_url.startswith("sqlite") else "postgresql+asyncpg"
    return create_async_engine(driver + database_url[database_url.index(":") :])


def upgrade_to(revision: str) -> Callable[[sa.Connection], None]:
    def run(connection: sa.Connection) -> None:
        config = Config()
        config.set_main_option(
            "script_location", str(resources.files("fluxserve.store") / "migrations")
        )
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    return run


def task_row(task_id: str, status: str) -> dict[str, object]:
    return {
        "task_id": task_id,
        "owner": "key_a",
        "model": "flux-2-pro",
        "status": status,
        "progress": 100,
        "input": TaskInput(prompt="an old task", size="1:1", resolution="1K").to_json(),
        "callback_url": "https://example.com/hook",
        "files": [],
        "attempts": 1,
        "created_at": 1.0,
    }


def callback_row(task_id: str, event_id: str) -> dict[str, object]:
    return {
        "event_id": event_id,
        "task_id": task_id,
        "url": "https://example.com/hook",
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": 1.0,
        "created_at": 1.0,
    }


async def test_callbacks_from_before_0002_keep_their_task_status_as_event_type(
    database_url: str,
) -> None:
    engine = async_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(upgrade_to("0001"))
        for task_id, status in (("task-a", "finished"), ("task-b", "failed")):
            await conn.execute(tasks.insert().values(task_row(task_id, status)))
            await conn.execute(callbacks.insert().values(callback_row(task_id, f"evt_{task_id}")))
    await engine.dispose()

    store = open_store(database_url)
    await store.start()
    try:
        old = await store.get_task("task-a")
        claimed = await store.claim_callbacks(10, 30)
    finally:
        await store.close()
    assert old is not None and old.callback_events == TERMINAL_EVENTS
    assert sorted((r.event_id, r.event_type) for r in claimed) == [
        ("evt_task-a", "finished"),
        ("evt_task-b", "failed"),
    ]


async def test_keys_and_tasks_from_before_0004_get_accounts_and_keep_their_order(
    database_url: str,
) -> None:
    engine = async_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(upgrade_to("0003"))
        await conn.execute(
            api_keys.insert().values(
                key_id="key_0a1b2c", name="old", key_hash="h" * 64, prefix="fsk_old", created_at=1.0
            )
        )
        for task_id, status in (("task-a", "finished"), ("task-b", "not_started")):
            await conn.execute(
                tasks.insert().values({**task_row(task_id, status), "owner": "key_0a1b2c"})
            )
    await engine.dispose()

    store = open_store(database_url)
    await store.start()
    try:
        key = await store.key_for_hash("h" * 64)
        assert key is not None and key.account_id is not None
        account = await store.get_account(key.account_id)
        queued = await queue_position(store, "task-b")
        # A new account's task queues behind the old one.
        later = await store.create_task(
            NewTask("task-c", "key_new", "acct_new", "flux-2-pro", INPUT, None, 2.0)
        )
        claims = [await store.claim_task(["flux-2-pro"], "w", 30) for _ in range(2)]
        page = await store.list_tasks(
            key.account_id, status=None, model=None, limit=10, before=None
        )
    finally:
        await store.close()
    assert account is not None and account.email == "key_0a1b2c@localhost"
    assert account.balance == account.held == 0
    assert queued == 1
    assert [c.task.task_id for c in claims if c] == ["task-b", later.task_id]
    assert [t.task_id for t in page.tasks] == ["task-b", "task-a"]


async def test_the_migrations_build_the_tables_schema_py_describes(database_url: str) -> None:
    """A column, index or table added to schema.py needs its migration, and the other way
    round: alembic's comparison of the migrated database with schema.py finds nothing."""
    engine = async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade_to("head"))
            differences = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
    finally:
        await engine.dispose()
    assert differences == []
