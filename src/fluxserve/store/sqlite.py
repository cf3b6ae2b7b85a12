"""The embedded database: SQLite in WAL mode, one file, one machine, on sqlite3.

A process holds two connections on the event loop: a reader and the writer.
Writes in one process take turns on a lock. A transaction begins with
`BEGIN IMMEDIATE` on the loop, which fails at once while another process holds
the write lock; it then waits for the lock on a thread, under SQLite's busy
timeout. Its statements (indexed, microseconds each) run on the loop; a COMMIT
that syncs waits for the disk on a thread. A read is an indexed lookup on the
reader, less than one hand-off to a thread; one that finds the database locked
goes to a thread instead. Checkpoints of the WAL run on a thread too. Waiters see
another process's commits by watching `PRAGMA data_version`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, closing, suppress
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from fluxserve.errors import StoreUnavailable
from fluxserve.store import migrate
from fluxserve.store.base import SqliteSynchronous
from fluxserve.store.connection import Compiled, Connection, Statements
from fluxserve.store.driver_errors import driver_errors, opening
from fluxserve.store.wakeups import TASKS, Wakeups

T = TypeVar("T")
logger = logging.getLogger(__name__)

COMMIT_POLL = 0.005
"""Seconds between looks for another process's commit while a worker waits for a task."""
CHANGE_POLL = 0.05
"""Seconds between looks for another process's commit while streams watch tasks: what
they show is for people, and each commit seen costs one read of the watched tasks."""
CHECKPOINT_EVERY = 200
"""Commits between two checkpoints of the WAL, which run on a thread."""
LOCK_WAIT = 10.0
"""Seconds a connection off the loop waits for a lock another process holds."""


def _configure(connection: sqlite3.Connection, synchronous: SqliteSynchronous) -> None:
    """Set the PRAGMAs of a connection; every connection the store opens, on whatever
    path and in whatever process, gets them here, since SQLite keeps them per connection.

    WAL lets readers run beside the one writer. `synchronous`: with `full`, each
    commit syncs the WAL to the disk before it returns, so it survives a power cut;
    with `normal`, the WAL is synced only at checkpoints, so a power cut or an OS
    crash can lose the last commits (a process crash cannot).
    """
    connection.execute("PRAGMA journal_mode=WAL").close()
    connection.execute(f"PRAGMA synchronous={synchronous.upper()}").close()


def _connect(path: Path, synchronous: SqliteSynchronous, lock_wait: float) -> sqlite3.Connection:
    """A sqlite3 connection, autocommit until BEGIN; used by one thread at a time,
    whichever (the store's lock makes sure of that)."""
    connection = sqlite3.connect(
        path, timeout=lock_wait, isolation_level=None, check_same_thread=False
    )
    _configure(connection, synchronous)
    return connection


def _migrate(path: Path, synchronous: SqliteSynchronous) -> None:
    """Run the migrations, one process at a time (BEGIN IMMEDIATE waits for the others)."""
    engine = sa.create_engine(
        "sqlite://",
        creator=partial(_connect, path, synchronous, LOCK_WAIT),
        poolclass=sa.pool.NullPool,
    )
    sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    try:
        with engine.begin() as connection:
            migrate.upgrade(connection)
    finally:
        engine.dispose()


def _open_writer(path: Path, synchronous: SqliteSynchronous) -> sqlite3.Connection:
    """The loop's writer: it never waits for a lock on the loop (see `_begin`), and
    leaves checkpoints to a thread (see `_checkpoint`)."""
    writer = _connect(path, synchronous, lock_wait=0)
    writer.execute("PRAGMA wal_autocheckpoint=0").close()
    return writer


def _open_reader(path: Path, synchronous: SqliteSynchronous) -> sqlite3.Connection:
    """The loop's reader: it never waits for a lock (see `SqliteDatabase.all`)."""
    reader = _connect(path, synchronous, lock_wait=0)
    reader.execute("PRAGMA query_only=ON").close()
    return reader


def _run(connection: sqlite3.Connection, statement: Compiled, params: Mapping[str, Any]) -> Any:
    """(rows, rows changed) of one statement. Closing the cursor ends a read at once:
    an open one would pin its snapshot, hiding later commits and holding back checkpoints."""
    with (
        driver_errors(),
        closing(connection.execute(statement.sql, statement.arguments(params))) as cursor,
    ):
        rows = cursor.fetchall()
        return rows, cursor.rowcount


def _read_waiting(
    path: Path, synchronous: SqliteSynchronous, statement: Compiled, params: Mapping[str, Any]
) -> Any:
    """A read that waits for a lock, on a thread, on a connection of its own (whose
    opening may meet the lock too)."""
    with driver_errors(), closing(_connect(path, synchronous, LOCK_WAIT)) as connection:
        return _run(connection, statement, params)


def _begin_waiting(writer: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE under SQLite's busy timeout: on a thread, while another process writes."""
    writer.execute(f"PRAGMA busy_timeout={round(LOCK_WAIT * 1000)}").close()
    try:
        with driver_errors():
            writer.execute("BEGIN IMMEDIATE").close()
    finally:
        writer.execute("PRAGMA busy_timeout=0").close()


def _commit(writer: sqlite3.Connection) -> None:
    with driver_errors():  # a full disk, an I/O error
        writer.execute("COMMIT").close()


def _checkpoint(path: Path, synchronous: SqliteSynchronous) -> None:
    """Copy what the WAL holds into the database file, as far as readers allow."""
    with closing(_connect(path, synchronous, LOCK_WAIT)) as connection:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


async def _on_thread(work: Callable[[], T]) -> T:
    """`work()` on a thread; if the caller is cancelled meanwhile, it still waits for
    `work` to return (the connection is the thread's until then), however often it is
    cancelled, then is cancelled."""
    running = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        while not running.done():
            with suppress(asyncio.CancelledError):
                await asyncio.wait([running])
        raise


class _Writer:
    """The writer's `Connection` inside a transaction: each statement on the loop."""

    def __init__(self, writer: sqlite3.Connection, statements: Statements) -> None:
        self._writer = writer
        self._statements = statements

    def _rows(self, statement: Any, params: Mapping[str, Any]) -> Any:
        compiled = self._statements.compiled(statement, params)
        rows, count = _run(self._writer, compiled, params)
        return compiled, rows, count

    async def one(self, statement: Any, **params: Any) -> Any:
        compiled, rows, _ = self._rows(statement, params)
        return compiled.shape(rows[0]) if rows else None

    async def all(self, statement: Any, **params: Any) -> list[Any]:
        compiled, rows, _ = self._rows(statement, params)
        return [compiled.shape(row) for row in rows]

    async def execute(self, statement: Any, **params: Any) -> int:
        _, rows, count = self._rows(statement, params)
        return max(count, len(rows))


class SqliteDatabase:
    """SQLite at `sqlite:///PATH`; see the module's docstring."""

    name = "sqlite"
    max_seq = 2**63 - 1  # SQLite's integer primary key: 64 bits

    def __init__(self, database_url: str, synchronous: SqliteSynchronous = "full") -> None:
        self.url = database_url
        self._path = Path(database_url.removeprefix("sqlite:///"))
        self._synchronous = synchronous
        self._statements = Statements(sqlite_dialect.dialect())
        self._lock = asyncio.Lock()
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._commits_since_checkpoint = 0
        self._checkpointing: asyncio.Task[None] | None = None
        self._seen_version: int | None = 0
        self._changes_seen_version: int | None = 0
        self._commit_watcher: asyncio.Task[None] | None = None
        self.wakeups = Wakeups()

    async def start(self) -> None:
        with opening(str(self._path)):
            self._path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_migrate, self._path, self._synchronous)
            self._reader = _open_reader(self._path, self._synchronous)
            self._writer = _open_writer(self._path, self._synchronous)
        self._seen_version = self._changes_seen_version = self._data_version()

    async def close(self) -> None:
        if self._commit_watcher is not None:
            self._commit_watcher.cancel()
            await asyncio.gather(self._commit_watcher, return_exceptions=True)
            self._commit_watcher = None
        async with self._lock:
            if self._checkpointing is not None:
                await self._checkpointing
            for connection in (self._reader, self._writer):
                if connection is not None:
                    connection.close()
            self._reader = self._writer = None

    def _started(self, connection: sqlite3.Connection | None) -> sqlite3.Connection:
        if connection is None:
            raise RuntimeError("store not started")
        return connection

    async def one(self, statement: Any, **params: Any) -> Any:
        rows = await self.all(statement, **params)
        return rows[0] if rows else None

    async def all(self, statement: Any, **params: Any) -> list[Any]:
        if not statement.is_select:
            async with self.transaction() as conn:
                return await conn.all(statement, **params)
        compiled = self._statements.compiled(statement, params)
        try:
            rows, _ = _run(self._started(self._reader), compiled, params)
        except StoreUnavailable:
            # Locked (another process recovering the WAL, say): wait on a thread instead.
            rows, _ = await asyncio.to_thread(
                _read_waiting, self._path, self._synchronous, compiled, params
            )
        return [compiled.shape(row) for row in rows]

    async def execute(self, statement: Any, **params: Any) -> int:
        async with self.transaction() as conn:
            return await conn.execute(statement, **params)

    @asynccontextmanager
    async def transaction(
        self, wake: Sequence[str] = (), changes: list[str] | None = None
    ) -> AsyncIterator[Connection]:
        async with self._lock:
            writer = self._started(self._writer)
            try:
                try:
                    writer.execute("BEGIN IMMEDIATE").close()
                except sqlite3.OperationalError:  # another process writes: wait off the loop
                    await _on_thread(lambda: _begin_waiting(writer))
                yield _Writer(writer, self._statements)
                await self._commit(writer)
            except BaseException:
                if writer.in_transaction:
                    writer.execute("ROLLBACK").close()
                raise
            self._count_commit()
        self.wakeups.wake(*wake)
        if changes:
            self.wakeups.changes.add(changes)

    async def _commit(self, writer: sqlite3.Connection) -> None:
        """A commit that syncs waits for the disk (from a fraction of a millisecond to
        milliseconds), so it runs on a thread: the loop serves requests meanwhile, and
        the submits that arrive gather for the next group commit. One that does not
        sync takes microseconds, on the loop."""
        if self._synchronous == "full":
            await _on_thread(lambda: _commit(writer))
        else:
            _commit(writer)

    def _count_commit(self) -> None:
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint >= CHECKPOINT_EVERY and self._checkpointing is None:
            self._commits_since_checkpoint = 0
            self._checkpointing = asyncio.create_task(self._checkpoint_on_thread())

    async def _checkpoint_on_thread(self) -> None:
        try:
            await asyncio.to_thread(_checkpoint, self._path, self._synchronous)
        except sqlite3.Error as exc:
            logger.warning("WAL checkpoint failed (%s); the next one tries again", exc)
        finally:
            self._checkpointing = None

    async def notify(self, *channels: str) -> None:
        self.wakeups.wake(*channels)  # other processes see the commit (`_wake_on_commit`)

    async def wait(self, channel: str, at_most: float) -> None:
        if channel != TASKS:
            await self.wakeups.wait(channel, at_most)
            return
        # A submit in another process wakes no one here: watch for its commit.
        watcher = asyncio.create_task(self._wake_on_commit())
        try:
            await self.wakeups.wait(channel, at_most)
        finally:
            watcher.cancel()
            # Commits from here on are ones the caller's next claim may not see.
            self._seen_version = self._data_version()

    async def _wake_on_commit(self) -> None:
        """Wake the task waiters once another connection commits (this process's own too)."""
        while True:
            if self._data_version() != self._seen_version:
                self.wakeups.wake(TASKS)
                return
            await asyncio.sleep(COMMIT_POLL)

    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        if self._commit_watcher is None:
            self._commit_watcher = asyncio.create_task(self._watch_commits())
        return await self.wakeups.changes.take(at_most)

    async def _watch_commits(self) -> None:
        """Say that any task may have changed whenever another connection has committed:
        another process's commit names no task here. (This process's own commits count
        too; their tasks are named as well, so a look finds those changes done.)"""
        while True:
            await asyncio.sleep(CHANGE_POLL)
            version = self._data_version()
            if version != self._changes_seen_version:
                self._changes_seen_version = version
                self.wakeups.changes.set()

    def _data_version(self) -> int | None:
        """Changes whenever another connection commits to the database; None while the
        database is locked (another process recovering the WAL, say), which differs
        from every version seen: whoever watches is told of a commit that may have been."""
        reader = self._started(self._reader)
        try:
            with driver_errors(), closing(reader.execute("PRAGMA data_version")) as cursor:
                version: int = cursor.fetchone()[0]
        except StoreUnavailable:
            return None
        return version
