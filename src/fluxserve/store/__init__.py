"""Durable state: tasks (the queue), accounts and keys, the callback outbox, files."""

from __future__ import annotations

from fluxserve.errors import ConfigError
from fluxserve.store.base import (
    POSTGRES_STATEMENT_TIMEOUT,
    ApiKeyRecord,
    CallbackRecord,
    SqliteSynchronous,
)
from fluxserve.store.ports import Store


def open_store(
    database_url: str,
    *,
    sqlite_synchronous: SqliteSynchronous = "full",
    postgres_statement_timeout: float = POSTGRES_STATEMENT_TIMEOUT,
) -> Store:
    """The store for `database_url` (`sqlite:///path`), not yet started.

    `sqlite_synchronous` applies to SQLite alone; PostgreSQL syncs as its server says.
    `postgres_statement_timeout` applies to PostgreSQL alone (SQLite's statements
    run in this process, with its own bound on waiting for the write lock)."""
    from fluxserve.store.store import SqlStore

    scheme = database_url.partition(":")[0].lower()
    if scheme == "sqlite":
        from fluxserve.store.sqlite import SqliteDatabase

        return SqlStore(SqliteDatabase(database_url, sqlite_synchronous))
    if scheme in ("postgresql", "postgres"):
        from fluxserve.store.postgres import PostgresDatabase

        return SqlStore(PostgresDatabase(database_url, postgres_statement_timeout))
    raise ConfigError(
        f"database_url: unsupported scheme {scheme!r}; use sqlite:///PATH or postgresql://..."
    )


__all__ = ["ApiKeyRecord", "CallbackRecord", "Store", "open_store"]
