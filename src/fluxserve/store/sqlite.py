"""The embedded store: SQLite in WAL mode, one file, one machine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from fluxserve.store.sql import SqlStore


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer; busy_timeout makes a second
    # process (an `api` beside a `worker`) wait for the lock instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class SqliteStore(SqlStore):
    """SQLite through aiosqlite. Writes in one process take turns on a lock, so
    they never wait on SQLite's sleeping busy handler. Other processes on the same
    file are woken by polling (`poll_interval`)."""

    def __init__(self, database_url: str) -> None:
        self._path = Path(database_url.removeprefix("sqlite:///"))
        super().__init__(f"sqlite+aiosqlite:///{self._path}")
        self._write_lock = asyncio.Lock()

    def _create_engine(self) -> AsyncEngine:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self._url)
        sa.event.listen(engine.sync_engine, "connect", _on_connect)
        return engine

    @asynccontextmanager
    async def _write(self, wake: tuple[str, ...] = ()) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock, super()._write(wake) as conn:
            yield conn
