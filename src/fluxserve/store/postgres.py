"""The database for many machines: PostgreSQL on one asyncpg pool.

Claims use `FOR UPDATE SKIP LOCKED`, so workers on many machines never take the
same task. A transaction that makes work NOTIFYs in its BEGIN's round trip; a
dedicated LISTEN connection wakes this process's idle workers and dispatchers at
once, and reconnects when the database restarts, or after any other failure
(polling covers the gap). It listens only on the channels this process waits
on: an API process is not sent a NOTIFY for every task the fleet queues.

Every pooled statement is bounded by the statement timeout (see `_bounded`): one
held up by a row that a stuck transaction locked, or by a network that dropped
it, is `StoreUnavailable`, which the API answers 503 and the loops retry. So is
a wait of as long for a connection from the pool, every one of them held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.ext.asyncio import create_async_engine

from fluxserve.errors import ConfigError, StoreUnavailable
from fluxserve.store import migrate
from fluxserve.store.base import POSTGRES_STATEMENT_TIMEOUT
from fluxserve.store.connection import Connection, Statements
from fluxserve.store.driver_errors import (
    ASYNCPG_BUSY,
    ASYNCPG_UNAVAILABLE,
    TIMED_OUT,
    driver_errors,
    opening,
)
from fluxserve.store.wakeups import TASK_CHANGES, Wakeups

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError(
        "database_url is PostgreSQL, which needs asyncpg: pip install 'fluxserve[postgres]'"
    ) from exc

logger = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATE_LOCK = 0x464C5558_02
"""Key of the advisory lock concurrent starts take turns on; arbitrary, fluxserve's own."""
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
POOL_SIZE = 20
CLIENT_GRACE = 1.0
"""Seconds the client waits past the server's own statement_timeout before giving up."""

_ANNOUNCE = sa.select(
    sa.func.pg_notify(
        TASK_CHANGES, sa.func.unnest(sa.bindparam("task_ids", type_=ARRAY(sa.String)))
    )
)

_NOTIFY = sa.select(sa.func.pg_notify(sa.bindparam("channel", type_=sa.String), ""))


def _notify_sql(channels: Sequence[str]) -> str:
    return "".join(f"SELECT pg_notify('{channel}', '');" for channel in channels)


def _setter(*events: asyncio.Event) -> Any:
    def set_all(_connection: Any) -> None:
        for event in events:
            event.set()

    return set_all


def _bounded(statement_timeout: float) -> dict[str, Any]:
    """The pool's connection options that bound each statement, on both ends.

    The server's statement_timeout ends a statement that waits on a row lock or
    runs long: the server stops it and lets go of its locks at once, and the
    connection stays sound, so nothing reconnects. But it cannot end a wait for
    an answer that never comes (a network that drops packets, a hung server):
    asyncpg's command_timeout, a moment later, ends that on the client, asking
    the server to cancel or else closing the connection. The LISTEN connection
    is not pooled and has neither: it is idle by design.
    """
    milliseconds = max(1, round(statement_timeout * 1000))  # 0 would be no bound at all
    return {
        "server_settings": {"statement_timeout": str(milliseconds)},
        "command_timeout": statement_timeout + CLIENT_GRACE,
    }


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """Pooled connections run single statements or whole transactions, so there is
    nothing to reset on release."""


class _Pooled:
    """A pooled connection's `Connection`."""

    def __init__(self, connection: asyncpg.Connection, statements: Statements) -> None:
        self._connection = connection
        self._statements = statements

    async def one(self, statement: Any, **params: Any) -> Any:
        compiled = self._statements.compiled(statement, params)
        with driver_errors():
            row = await self._connection.fetchrow(compiled.sql, *compiled.arguments(params))
        return None if row is None else compiled.shape(row)

    async def all(self, statement: Any, **params: Any) -> list[Any]:
        compiled = self._statements.compiled(statement, params)
        with driver_errors():
            rows = await self._connection.fetch(compiled.sql, *compiled.arguments(params))
        return [compiled.shape(row) for row in rows]

    async def execute(self, statement: Any, **params: Any) -> int:
        compiled = self._statements.compiled(statement, params)
        with driver_errors():
            status = await self._connection.execute(compiled.sql, *compiled.arguments(params))
        count = status.rpartition(" ")[2]  # "UPDATE 3", "INSERT 0 1"
        return int(count) if count.isdigit() else 0


class PostgresDatabase:
    """PostgreSQL at `postgresql://user:password@host:port/database`."""

    name = "postgresql"
    max_seq = 2**31 - 1  # `seq` is a 32-bit integer column here

    def __init__(
        self, database_url: str, statement_timeout: float = POSTGRES_STATEMENT_TIMEOUT
    ) -> None:
        url = sa.engine.make_url(database_url)
        self.url = database_url
        self.statement_timeout = statement_timeout
        self._url = url
        self.dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._statements = Statements(asyncpg_dialect.dialect())
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._channels: set[str] = set()
        self._channels_changed = asyncio.Event()
        self.wakeups = Wakeups()

    async def start(self) -> None:
        # Migrations alone run on SQLAlchemy's engine, as alembic needs; then it goes.
        # They take as long as they take (and wait on another process's): unbounded.
        engine = create_async_engine(self._url.set(drivername="postgresql+asyncpg"))
        try:
            with opening(self._url.render_as_string(hide_password=True)):
                async with engine.begin() as conn:
                    # Several processes starting at once would race to create the tables.
                    await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATE_LOCK)))
                    await conn.run_sync(migrate.upgrade)
        finally:
            await engine.dispose()
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=POOL_SIZE,
            reset=_keep_session,
            **_bounded(self.statement_timeout),
        )

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def _started(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store not started")
        return self._pool

    async def _once_more(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, and once more on new connections if its connection was lost.

        After a restart every pooled connection is dead: all are replaced. A read
        is safe to run again, and so is a write that refuses to repeat. A database
        out of connection slots, or one that broke a deadlock, keeps them: each one
        given up would need a slot back. A statement that timed out is not run
        again: it would most likely wait as long once more.
        """
        try:
            return await attempt()
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, TIMED_OUT):
                raise
            if not isinstance(exc.__cause__, ASYNCPG_BUSY):
                await self._started.expire_connections()
        return await attempt()

    async def _run(self, statement: Any, params: Mapping[str, Any], how: str) -> Any:
        async def attempt() -> Any:
            with driver_errors():
                async with self._started.acquire(timeout=self.statement_timeout) as connection:
                    return await getattr(_Pooled(connection, self._statements), how)(
                        statement, **params
                    )

        return await self._once_more(attempt)

    async def one(self, statement: Any, **params: Any) -> Any:
        return await self._run(statement, params, "one")

    async def all(self, statement: Any, **params: Any) -> list[Any]:
        return list(await self._run(statement, params, "all"))

    async def execute(self, statement: Any, **params: Any) -> int:
        return int(await self._run(statement, params, "execute"))

    @asynccontextmanager
    async def transaction(
        self, wake: Sequence[str] = (), changes: list[str] | None = None
    ) -> AsyncIterator[Connection]:
        async def begin() -> asyncpg.Connection:
            with driver_errors():
                connection = await self._started.acquire(timeout=self.statement_timeout)
                try:
                    # BEGIN and the NOTIFYs in one round trip, before the body: its
                    # statements may lock a row that others wait for (an account's),
                    # so as little as possible follows them before COMMIT.
                    await connection.execute("BEGIN;" + _notify_sql(wake))
                except BaseException:
                    await self._started.release(connection)
                    raise
                return connection

        connection = await self._once_more(begin)
        pooled = _Pooled(connection, self._statements)
        try:
            with driver_errors():
                try:
                    yield pooled
                    if changes:
                        await pooled.all(_ANNOUNCE, task_ids=changes)
                    await connection.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(OSError, *ASYNCPG_UNAVAILABLE):
                        await connection.execute("ROLLBACK")
                    raise
        finally:
            await self._started.release(connection)
        self.wakeups.wake(*wake)

    async def notify(self, *channels: str) -> None:
        for channel in channels:
            await self.one(_NOTIFY, channel=channel)
        self.wakeups.wake(*channels)

    async def wait(self, channel: str, at_most: float) -> None:
        self._listen_to(channel)
        await self.wakeups.wait(channel, at_most)

    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        self._listen_to(TASK_CHANGES)
        return await self.wakeups.changes.take(at_most)

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
            # This process's own changes come back here too: they are told once.
            self.wakeups.changes.add((payload,))
        else:
            self.wakeups.wake(channel)

    async def _listen_forever(self) -> None:
        """LISTEN until cancelled. After any failure, the database's or not, it logs
        it and connects again after a pause: a listener that ended would leave the
        waiters to their polls, and this process's streams blind to others' changes."""
        failures = 0
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(self.dsn)
                closed = asyncio.Event()
                connection.add_termination_listener(_setter(closed, self._channels_changed))
                if failures:
                    logger.info("LISTEN connection restored")
                failures = 0
                await self._listen_on(connection, closed)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("LISTEN connection failed (%s); polling meanwhile", exc)
            except Exception:
                logger.exception("LISTEN connection broke; polling meanwhile")
            finally:
                if connection is not None:
                    # A close that fails or hangs must not end the listener.
                    with contextlib.suppress(Exception):
                        await connection.close(timeout=CLIENT_GRACE)
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
                self.wakeups.wake(channel)
            await self._channels_changed.wait()
