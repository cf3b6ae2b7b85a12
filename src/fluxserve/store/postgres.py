"""The store for many machines: PostgreSQL through asyncpg.

Claims use `FOR UPDATE SKIP LOCKED` (in the shared SQL), so workers on many
machines never take the same task. Each write that makes work NOTIFYs; a
dedicated LISTEN connection wakes this process's idle workers and dispatchers at
once, and reconnects when the database restarts (polling covers the gap). It
listens only on the channels this process waits on: an API process is not sent
a NOTIFY for every task the fleet queues. One sweeper at a time: an advisory
lock held for the transaction. Hot reads (a key, a task by its id) and submits
skip SQLAlchemy: prepared statements on a plain asyncpg pool, one round trip each.
Submits that arrive together share one transaction per account (see
`group_commit.py`), so a busy API process commits and NOTIFYs once for many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from fluxserve.errors import ConfigError, StoreUnavailable
from fluxserve.store.coalesce import Coalescer
from fluxserve.store.direct import CompiledStatement, Program, Step, run
from fluxserve.store.driver_errors import ASYNCPG_UNAVAILABLE, Errors, driver_errors
from fluxserve.store.group_commit import GroupCommit, Write
from fluxserve.store.rows import task_from_row
from fluxserve.store.schema import tasks
from fluxserve.store.sql import TASK_AND_POSITION, SqlStore
from fluxserve.store.wakeups import CALLBACKS, TASK_CHANGES, TASKS
from fluxserve.tasks import Task, TaskStatus

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError(
        "database_url is PostgreSQL, which needs asyncpg: pip install 'fluxserve[postgres]'"
    ) from exc

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Keys of the advisory locks; arbitrary, fixed, fluxserve's own.
SWEEP_LOCK = 0x464C5558_01
MIGRATE_LOCK = 0x464C5558_02
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
DRIVER_POOL_SIZE = 10
# A connection the server dropped, or one that cannot reach it.
CONNECTION_LOST: Errors = (OSError, *ASYNCPG_UNAVAILABLE)


RANKED_FROM = 8
"""Status reads arriving together that share one pass over their queues, at the least."""


def _tasks_and_positions() -> sa.Select[Any]:
    """Tasks by their ids and, for the queued ones, their queue positions, from one
    pass over the front of their queues, up to the furthest of them."""
    ids = sa.bindparam("task_ids", type_=ARRAY(sa.String))
    wanted = tasks.select().where(tasks.c.task_id == sa.any_(ids)).cte("wanted")
    waiting = wanted.c.status == TaskStatus.NOT_STARTED.value
    position = sa.func.count().over(
        partition_by=tasks.c.model, order_by=(tasks.c.vtime, tasks.c.seq)
    )
    ranked = (
        sa.select(tasks.c.seq, position.label("position"))
        .where(
            tasks.c.status == TaskStatus.NOT_STARTED.value,
            tasks.c.model.in_(sa.select(wanted.c.model).where(waiting)),
            tasks.c.vtime
            <= sa.select(sa.func.max(wanted.c.vtime)).where(waiting).scalar_subquery(),
        )
        .cte("ranked")
    )
    return sa.select(wanted, ranked.c.position.label("queue_position")).select_from(
        wanted.outerjoin(ranked, ranked.c.seq == wanted.c.seq)
    )


_TASKS_AND_POSITIONS = _tasks_and_positions()
_ANNOUNCE = sa.text(
    "SELECT pg_notify(:channel, task_id) FROM unnest(:task_ids) AS task_id"
).bindparams(sa.bindparam("task_ids", type_=ARRAY(sa.String)))


def _notify_sql(channels: tuple[str, ...]) -> str:
    return "".join(f"SELECT pg_notify('{channel}', '');" for channel in channels)


def _setter(*events: asyncio.Event) -> Any:
    def set_all(_connection: Any) -> None:
        for event in events:
            event.set()

    return set_all


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """Driver connections run single SELECTs or whole transactions, so there is
    nothing to reset on release."""


class PostgresStore(SqlStore):
    """PostgreSQL; `database_url` is `postgresql://user:password@host:port/database`."""

    WRITES_IN_WITH = True
    MAX_SEQ = 2**31 - 1  # `seq` is a 32-bit integer column here

    def __init__(self, database_url: str) -> None:
        url = sa.engine.make_url(database_url)
        super().__init__(
            url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        )
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._listener: asyncio.Task[None] | None = None
        self._channels: set[str] = set()
        self._channels_changed = asyncio.Event()
        self._driver: asyncpg.Pool | None = None
        self._status_reads: Coalescer[str, Any] = Coalescer(self._tasks_and_positions)
        self._submits = GroupCommit(self._transact_alone, self._write_alone, per_key=True)

    def _create_engine(self) -> AsyncEngine:
        # pre_ping replaces connections that died with a database restart.
        return create_async_engine(self._url, pool_pre_ping=True, pool_size=10, max_overflow=10)

    async def start(self) -> None:
        await super().start()
        self._driver = await asyncpg.create_pool(
            self._dsn, min_size=0, max_size=DRIVER_POOL_SIZE, reset=_keep_session
        )

    async def close(self) -> None:
        await self._status_reads.close()
        await self._stop_submits()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._driver is not None:
            await self._driver.close()
            self._driver = None
        await super().close()

    async def get_task_and_position(self, task_id: str) -> tuple[Task, int | None] | None:
        # Status reads are the hot path of a busy service: those that arrive
        # while others run are answered together (see `coalesce.py`).
        row = await self._status_reads.get(task_id)
        return None if row is None else (task_from_row(row), row.queue_position or None)

    async def _tasks_and_positions(self, task_ids: list[str]) -> dict[str, Any]:
        """Each task's row with its queue position. A few are counted one by one;
        more share one pass over the front of their queues."""
        if len(task_ids) < RANKED_FROM:
            rows = await asyncio.gather(
                *(self._fetch_one(TASK_AND_POSITION, task_id=task_id) for task_id in task_ids)
            )
        else:
            rows = await self._fetch(_TASKS_AND_POSITIONS, task_ids=task_ids)
        return {row.task_id: row for row in rows if row is not None}

    async def _fetch_one(self, statement: sa.Select[Any], **params: Any) -> Any | None:
        rows = await self._fetch(statement, **params)
        return rows[0] if rows else None

    async def _fetch(self, statement: sa.Select[Any], **params: Any) -> list[Any]:
        """The rows of a hot read, run on the pool."""
        read = self._compiled(statement)
        return await self._on_pool(partial(self._fetch_on_pool, read, params))

    async def _on_pool(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, and once more on new connections if its connection was lost.

        After a restart every pooled connection is dead: all are replaced. A read
        is safe to run again, and so is a program, whose writes refuse to repeat
        when the first try took (see `SqlBase._transact`).
        """
        try:
            with driver_errors():
                return await attempt()
        except StoreUnavailable:
            await self._driver_pool.expire_connections()
        with driver_errors():
            return await attempt()

    async def _fetch_on_pool(self, read: CompiledStatement, params: dict[str, Any]) -> list[Any]:
        async with self._driver_pool.acquire() as connection:
            rows = await connection.fetch(read.sql, *read.arguments(params))
        return [read.shape(row) for row in rows]

    async def _transact_alone(self, program: Callable[[], Program[T]], wake: tuple[str, ...]) -> T:
        value = await self._on_pool(partial(self._transact_on_pool, program, wake))
        self._wake_local(*wake)
        return value

    async def _transact_on_pool(
        self, program: Callable[[], Program[T]], wake: tuple[str, ...]
    ) -> T:
        async with self._driver_pool.acquire() as connection:
            try:
                # BEGIN and the NOTIFYs in one round trip, before the program: its
                # statements may lock a row that other submits wait for (the
                # account's), so as little as possible follows them before COMMIT.
                await connection.execute("BEGIN;" + _notify_sql(wake))
                value = await run(program(), partial(self._execute, connection))
            except BaseException:
                with contextlib.suppress(*CONNECTION_LOST):
                    await connection.execute("ROLLBACK")
                raise
            await connection.execute("COMMIT")
        return value

    async def _write_alone(self, write: Write) -> Any:
        value = await self._on_pool(partial(self._statement_on_pool, write.program, write.wake))
        self._wake_local(*write.wake)
        return value

    async def _statement_on_pool(
        self, program: Callable[[], Program[T]], wake: tuple[str, ...]
    ) -> T:
        """A program that writes in one statement, committed on its own; its NOTIFYs follow."""
        async with self._driver_pool.acquire() as connection:
            value = await run(program(), partial(self._execute, connection))
            if wake:
                await connection.execute(_notify_sql(wake))
        return value

    async def _execute(self, connection: asyncpg.Connection, step: Step) -> Any:
        statement = self._compiled_step(step)
        arguments = statement.arguments(step.params)
        with driver_errors():
            return statement.shape(await connection.fetchrow(statement.sql, *arguments))

    @property
    def _driver_pool(self) -> asyncpg.Pool:
        if self._driver is None:
            raise RuntimeError("store not started")
        return self._driver

    async def _before_migrations(self, conn: AsyncConnection) -> None:
        # Several processes starting at once would race to create the tables.
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK})

    async def _notify(self, conn: AsyncConnection, channels: tuple[str, ...]) -> None:
        for channel in channels:
            await conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": channel})

    async def _announce(self, conn: AsyncConnection, task_ids: list[str]) -> None:
        await conn.execute(_ANNOUNCE, {"channel": TASK_CHANGES, "task_ids": task_ids})

    def _changed_locally(self, task_ids: list[str]) -> None:
        """Nothing: the NOTIFY comes back to this process's LISTEN too, and a second
        wake-up for the same change would cost a second read."""

    async def _take_sweep_turn(self, conn: AsyncConnection) -> bool:
        taken = await conn.scalar(
            sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SWEEP_LOCK}
        )
        return bool(taken)

    async def wait_for_task(self, at_most: float) -> None:
        self._listen_to(TASKS)
        await super().wait_for_task(at_most)

    async def wait_for_callback(self, at_most: float) -> None:
        self._listen_to(CALLBACKS)
        await super().wait_for_callback(at_most)

    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        self._listen_to(TASK_CHANGES)
        return await super().task_changes(at_most)

    def _listen_to(self, channel: str) -> None:
        """LISTEN on `channel` from now on (the first wait on it asks)."""
        if channel in self._channels:
            return
        self._channels.add(channel)
        self._channels_changed.set()
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen_forever(), name="pg-listen")

    def _on_notification(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == TASK_CHANGES:
            self._task_changes.add((payload,))
        else:
            self._wake_local(channel)

    async def _listen_forever(self) -> None:
        failures = 0
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(self._dsn)
                closed = asyncio.Event()
                connection.add_termination_listener(_setter(closed, self._channels_changed))
                if failures:
                    logger.info("LISTEN connection restored")
                failures = 0
                await self._listen_on(connection, closed)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("LISTEN connection failed (%s); polling meanwhile", exc)
            finally:
                if connection is not None and not connection.is_closed():
                    await connection.close()
            await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
            failures += 1

    async def _listen_on(self, connection: asyncpg.Connection, closed: asyncio.Event) -> None:
        """LISTEN on each channel as it is asked for, until the connection closes."""
        listening: set[str] = set()
        while not closed.is_set():
            self._channels_changed.clear()
            for channel in self._channels - listening:
                await connection.add_listener(channel, self._on_notification)
                listening.add(channel)
                # Anything notified while no one listened is found by one look now.
                self._wake_local(channel)
            await self._channels_changed.wait()
