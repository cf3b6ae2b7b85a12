"""Durable state: tasks (the queue), accounts and keys, the callback outbox, files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fluxserve.errors import ConfigError
from fluxserve.store.base import (
    POSTGRES_STATEMENT_TIMEOUT,
    ApiKeyRecord,
    CallbackRecord,
    SqliteSynchronous,
)
from fluxserve.store.ports import Store

if TYPE_CHECKING:
    from fluxserve.settings import Settings


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


def store_for(settings: Settings) -> Store:
    """The store `settings` describe (`database_url` and its database's own settings),
    not yet started: the one every process and command opens."""
    return open_store(
        settings.resolved_database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        postgres_statement_timeout=settings.postgres_statement_timeout,
    )


__all__ = ["ApiKeyRecord", "CallbackRecord", "Store", "open_store", "store_for"]
