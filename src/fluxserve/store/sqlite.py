"""The embedded store: SQLite in WAL mode, one file, one machine."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from fluxserve.store.base import SqliteSynchronous
from fluxserve.store.direct import Program, Step, run
from fluxserve.store.driver_errors import driver_errors
from fluxserve.store.group_commit import GroupCommit
from fluxserve.store.sql import SqlStore
from fluxserve.store.wakeups import TASKS

T = TypeVar("T")
logger = logging.getLogger(__name__)

COMMIT_POLL = 0.005
"""Seconds between looks for another process's commit while a worker waits for a task."""
CHANGE_POLL = 0.05
"""Seconds between looks for another process's commit while streams watch tasks: what
they show is for people, and each commit seen costs one read of the watched tasks."""
CHECKPOINT_EVERY = 200
"""Commits on the loop between two checkpoints of the WAL, which run on a thread."""
BEGIN_RETRIES = (0.0005, 0.001, 0.002, 0.004)
"""Pauses, in seconds, between tries on the loop for a write lock another process holds;
a longer wait goes to a thread, on SQLite's own busy handler."""


LOCK_WAIT = 10.0
"""Seconds a connection off the loop waits for a lock another connection holds
(an `api` process beside a `worker`), instead of failing at once."""


def _configure(connection: Any, synchronous: SqliteSynchronous, lock_wait: float) -> None:
    """Set the PRAGMAs of a connection; every connection the store opens, on whatever
    path and in whatever process, gets them here, since SQLite keeps them per connection.

    WAL lets readers run beside the one writer. `synchronous`: with `full`, each
    commit syncs the WAL to the disk before it returns, so it survives a power cut;
    with `normal`, the WAL is synced only at checkpoints, so a power cut or an OS
    crash can lose the last commits (a process crash cannot).
    """
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.execute(f"PRAGMA busy_timeout={round(lock_wait * 1000)}")
    finally:
        cursor.close()


def _connect(path: Path, synchronous: SqliteSynchronous, lock_wait: float) -> sqlite3.Connection:
    """A sqlite3 connection, autocommit until BEGIN; usable from one thread at a time,
    whichever (the store's locks make sure of that)."""
    connection = sqlite3.connect(
        path, timeout=LOCK_WAIT, isolation_level=None, check_same_thread=False
    )
    _configure(connection, synchronous, lock_wait)
    return connection


def _open_writer(path: Path, synchronous: SqliteSynchronous) -> sqlite3.Connection:
    """The loop's writer: it never waits for a lock (see `_begin_on_loop`). It leaves
    checkpoints, which write the WAL back into the database file and sync it
    (milliseconds), to a thread: see `_checkpoint`."""
    writer = _connect(path, synchronous, lock_wait=0)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    return writer


def _commit(connection: sqlite3.Connection) -> None:
    with driver_errors():  # a full disk, an I/O error
        connection.execute("COMMIT")


def _checkpoint(path: Path, synchronous: SqliteSynchronous) -> None:
    """Copy what the WAL holds into the database file, as far as readers allow."""
    with closing(_connect(path, synchronous, LOCK_WAIT)) as connection:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _open_reader(path: Path, synchronous: SqliteSynchronous) -> sqlite3.Connection:
    """The loop's reader: it never waits for a lock (see `_fetch_one`)."""
    reader = _connect(path, synchronous, lock_wait=0)
    reader.execute("PRAGMA query_only=ON")
    return reader


class SqliteStore(SqlStore):
    """SQLite through aiosqlite, with hot reads and submits on sqlite3 in the event loop.

    Writes in one process take turns on a lock, so they never wait on SQLite's
    sleeping busy handler. A hot read (a key or a task by its id) is an indexed
    lookup that takes microseconds on WAL, less than one hand-off to a thread; one
    that would wait for a lock goes to a thread instead. A submit's transaction
    is a few such statements: it runs on the loop too, but for a COMMIT that
    syncs, which waits for the disk on a thread. While another process
    holds the write lock, it tries again after short pauses, and after a few
    milliseconds waits for the lock on a thread. Submits that arrive while
    others are written share one transaction (see `group_commit.py`). A worker
    waiting for a task sees another process's commits by watching
    `PRAGMA data_version`.
    """

    def __init__(self, database_url: str, synchronous: SqliteSynchronous = "full") -> None:
        self._path = Path(database_url.removeprefix("sqlite:///"))
        self._synchronous = synchronous
        super().__init__(f"sqlite+aiosqlite:///{self._path}")
        self._write_lock = asyncio.Lock()
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._commits_since_checkpoint = 0
        self._checkpointing: asyncio.Task[None] | None = None
        self._seen_version = 0
        self._changes_seen_version = 0
        self._commit_watcher: asyncio.Task[None] | None = None
        self._submits = GroupCommit(self._transact_alone, per_key=False)

    def _create_engine(self) -> AsyncEngine:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self._url)
        sa.event.listen(
            engine.sync_engine,
            "connect",
            lambda connection, _record: _configure(connection, self._synchronous, LOCK_WAIT),
        )
        return engine

    async def start(self) -> None:
        await super().start()
        self._reader = _open_reader(self._path, self._synchronous)
        self._writer = _open_writer(self._path, self._synchronous)
        self._seen_version = self._changes_seen_version = self._data_version()

    async def close(self) -> None:
        await self._stop_submits()
        if self._commit_watcher is not None:
            self._commit_watcher.cancel()
            await asyncio.gather(self._commit_watcher, return_exceptions=True)
            self._commit_watcher = None
        if self._checkpointing is not None:
            await self._checkpointing
        for connection in (self._reader, self._writer):
            if connection is not None:
                connection.close()
        self._reader = self._writer = None
        await super().close()

    @property
    def reader(self) -> sqlite3.Connection:
        if self._reader is None:
            raise RuntimeError("store not started")
        return self._reader

    @asynccontextmanager
    async def _write(
        self, wake: tuple[str, ...] = (), changes: list[str] | None = None
    ) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock, super()._write(wake, changes) as conn:
            yield conn

    async def _transact_alone(self, program: Callable[[], Program[T]], wake: tuple[str, ...]) -> T:
        async with self._write_lock:
            writer = await self._begin_on_loop()
            if writer is not None:
                try:
                    value = await run(program(), partial(self._execute, writer))
                    await self._commit(writer)
                    self._count_commit()
                except BaseException:
                    if writer.in_transaction:
                        writer.execute("ROLLBACK")
                    raise
        if writer is None:
            return await super()._transact_alone(program, wake)
        self._wake_local(*wake)
        return value

    async def _commit(self, writer: sqlite3.Connection) -> None:
        """COMMIT the loop's writer. A commit that syncs waits for the disk (from a
        fraction of a millisecond to milliseconds), so it runs on a thread: the loop
        serves requests meanwhile, and the submits that arrive gather for the next
        group commit. One that does not sync takes microseconds, on the loop."""
        if self._synchronous != "full":
            _commit(writer)
            return
        committing = asyncio.ensure_future(asyncio.to_thread(_commit, writer))
        try:
            await asyncio.shield(committing)
        except asyncio.CancelledError:
            # The writer is the thread's until COMMIT returns: no ROLLBACK meanwhile.
            await asyncio.wait([committing])
            raise

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

    async def _begin_on_loop(self) -> sqlite3.Connection | None:
        """The loop's writer in a transaction holding the write lock; None when another
        process held it through every try."""
        if self._writer is None:
            raise RuntimeError("store not started")
        for pause in (*BEGIN_RETRIES, None):
            try:
                self._writer.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                if pause is None:
                    return None
                await asyncio.sleep(pause)
            else:
                return self._writer
        return None

    async def _execute(self, connection: sqlite3.Connection, step: Step) -> Any:
        statement = self._compiled_step(step)
        arguments = statement.arguments(step.params)
        with driver_errors(), closing(connection.execute(statement.sql, arguments)) as cursor:
            rows = cursor.fetchall()
        return statement.shape(rows[0] if rows else None)

    async def _fetch_one(self, statement: sa.Select[Any], **params: Any) -> Any | None:
        read = self._compiled(statement)
        try:
            # Closing the cursor ends the read at once: an open one would pin the
            # snapshot, hiding later commits and holding back checkpoints.
            with closing(self.reader.execute(read.sql, read.arguments(params))) as cursor:
                values = cursor.fetchone()
        except sqlite3.OperationalError:
            # Locked (another process recovering the WAL, say): wait on a thread instead.
            return await super()._fetch_one(statement, **params)
        return None if values is None else read.shape(values)

    async def wait_for_task(self, at_most: float) -> None:
        # A submit in another process wakes no one here: watch for its commit.
        watcher = asyncio.create_task(self._wake_on_commit())
        try:
            await super().wait_for_task(at_most)
        finally:
            watcher.cancel()
            # Commits from here on are ones the caller's next claim may not see.
            self._seen_version = self._data_version()

    async def _wake_on_commit(self) -> None:
        """Wake the task waiters once another connection commits (this process's own too)."""
        while True:
            if self._data_version() != self._seen_version:
                self._wake_local(TASKS)
                return
            await asyncio.sleep(COMMIT_POLL)

    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        if self._commit_watcher is None:
            self._commit_watcher = asyncio.create_task(self._watch_commits())
        return await super().task_changes(at_most)

    async def _watch_commits(self) -> None:
        """Say that any task may have changed whenever another connection has committed:
        another process's commit names no task here. (This process's own commits count
        too; their tasks are named as well, so a look finds those changes done.)"""
        while True:
            await asyncio.sleep(CHANGE_POLL)
            version = self._data_version()
            if version != self._changes_seen_version:
                self._changes_seen_version = version
                self._task_changes.set()

    def _data_version(self) -> int:
        """Changes whenever another connection commits to the database."""
        with closing(self.reader.execute("PRAGMA data_version")) as cursor:
            version: int = cursor.fetchone()[0]
        return version
