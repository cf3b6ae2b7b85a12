"""The SQL store's connection handling, shared by its parts and both dialects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache, partial
from importlib import resources
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fluxserve.store.direct import CompiledStatement, Program, Step, run
from fluxserve.store.driver_errors import driver_errors
from fluxserve.store.group_commit import GroupCommit
from fluxserve.store.wakeups import CALLBACKS, TASK_CHANGES, TASKS, TaskChanges
from fluxserve.tasks import Task

T = TypeVar("T")


class SqlBase:
    """Connections, transactions and wake-ups: what every part of the SQL store uses.

    The dialects override the engine, how writers take turns, how a write wakes
    other processes, and how hot reads and hot transactions reach the driver.
    """

    WRITES_IN_WITH = False
    """Whether one statement may write to several tables (PostgreSQL's data-modifying WITH)."""

    MAX_SEQ = 2**63 - 1
    """The largest `seq` the tasks table can hold (SQLite's integer primary key: 64 bits)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: AsyncEngine | None = None
        self._events = {TASKS: asyncio.Event(), CALLBACKS: asyncio.Event()}
        self._task_changes = TaskChanges()
        self._compiled_statements: dict[tuple[Any, tuple[str, ...]], CompiledStatement] = {}
        self._submits: GroupCommit | None = None  # a dialect's group commit, if it has one
        self._end_listeners: list[Callable[[Task], None]] = []

    def _create_engine(self) -> AsyncEngine:
        raise NotImplementedError

    async def start(self) -> None:
        self._engine = self._create_engine()
        async with self._write() as conn:
            await self._before_migrations(conn)
            await conn.run_sync(_upgrade)

    async def schema_revision(self) -> str | None:
        async with self._read() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )

    def schema_head(self) -> str | None:
        return _head()

    async def _before_migrations(self, conn: AsyncConnection) -> None:
        """Make concurrent starts take turns at migrating, where the dialect needs it."""

    async def _stop_submits(self) -> None:
        """Stop the group commit, if any: submits still waiting get CancelledError."""
        if self._submits is not None:
            await self._submits.close()

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("store not started")
        return self._engine

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        with driver_errors():
            async with self.engine.connect() as conn:
                yield conn

    async def _fetch_one(self, statement: sa.Select[Any], **params: Any) -> Any | None:
        """The first row of a hot read; the dialects run it on their driver directly."""
        async with self._read() as conn:
            return (await conn.execute(statement, params)).first()

    def _compiled(self, statement: Any, column_keys: tuple[str, ...] = ()) -> CompiledStatement:
        """`statement` compiled for this store's dialect, once."""
        compiled = self._compiled_statements.get((statement, column_keys))
        if compiled is None:
            compiled = CompiledStatement.of(statement, self.engine.dialect, column_keys)
            self._compiled_statements[statement, column_keys] = compiled
        return compiled

    def _compiled_step(self, step: Step) -> CompiledStatement:
        columns = tuple(step.params) if isinstance(step.statement, sa.Insert) else ()
        return self._compiled(step.statement, columns)

    async def _transact(
        self,
        program: Callable[[], Program[T]],
        wake: tuple[str, ...] = (),
        *,
        together: str | None = None,
    ) -> T:
        """Run a program (see `direct.py`) as one transaction, and wake `wake` after it.

        `program` makes the generator, so a dialect may start over on a fresh
        connection when the first one turns out dead, not knowing whether a
        write took: a program's writes must refuse to repeat (a unique key).
        `together` marks a program that refuses before it writes and locks no
        rows but those of that key (an account): where the dialect has a group
        commit, it may run in one transaction with others arriving at the same
        time, or, where it writes in one statement (PostgreSQL), commit on its own.
        """
        if together is None or self._submits is None:
            return await self._transact_alone(program, wake)
        return await self._submits.write(program, wake, together)

    async def _transact_alone(self, program: Callable[[], Program[T]], wake: tuple[str, ...]) -> T:
        """A program as a transaction of its own. Here it runs through SQLAlchemy;
        the dialects run it on their driver."""
        async with self._write(wake) as conn:
            return await run(program(), partial(_execute, conn))

    @asynccontextmanager
    async def _write(
        self, wake: tuple[str, ...] = (), changes: list[str] | None = None
    ) -> AsyncIterator[AsyncConnection]:
        """A transaction; when it commits, wake whoever waits on the `wake` channels,
        and whoever watches the tasks whose ids the transaction put in `changes`
        (those whose status or progress it changed)."""
        with driver_errors():
            async with self.engine.begin() as conn:
                yield conn
                await self._notify(conn, wake)
                if changes:
                    await self._announce(conn, changes)
        self._wake_local(*wake)
        if changes:
            self._changed_locally(changes)

    def watch_endings(self, listener: Callable[[Task], None]) -> None:
        self._end_listeners.append(listener)

    @asynccontextmanager
    async def _ending(
        self, wake: tuple[str, ...] = (), changes: list[str] | None = None
    ) -> AsyncIterator[tuple[AsyncConnection, list[Task]]]:
        """A `_write` that may end tasks: those put in its list are told to the
        `watch_endings` listeners once it commits."""
        ended: list[Task] = []
        async with self._write(wake, changes) as conn:
            yield conn, ended
        for task in ended:
            for listener in self._end_listeners:
                listener(task)

    async def _notify(self, conn: AsyncConnection, channels: tuple[str, ...]) -> None:
        """Tell other processes, inside the transaction; in-process waiters need nothing."""

    async def _announce(self, conn: AsyncConnection, task_ids: list[str]) -> None:
        """Tell other processes, inside the transaction, that these tasks changed."""

    def _changed_locally(self, task_ids: list[str]) -> None:
        """Tell this process's watchers, once committed, that these tasks changed."""
        self._task_changes.add(task_ids)

    def _wake_local(self, *channels: str) -> None:
        """Wake this process's waiters on `channels`. A wake-up on TASK_CHANGES
        without ids says that any task may have changed."""
        for channel in channels:
            if channel == TASK_CHANGES:
                self._task_changes.set()
            else:
                self._events[channel].set()

    async def _take_sweep_turn(self, conn: AsyncConnection) -> bool:
        """Whether this transaction may sweep now; one sweeper at a time."""
        return True


async def _execute(conn: AsyncConnection, step: Step) -> Any:
    """One step on a SQLAlchemy connection: its first row, or None."""
    result = await conn.execute(step.statement, dict(step.params))
    return result.first() if result.returns_rows else None


def _config() -> Config:
    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("fluxserve.store") / "migrations")
    )
    return config


@cache
def _head() -> str | None:
    """The newest migration this version of the code has: read from its files once."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def _upgrade(connection: sa.Connection) -> None:
    config = _config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
