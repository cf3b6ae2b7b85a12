"""Durable state: tasks (the queue), API keys and the callback outbox."""

from __future__ import annotations

from fluxserve.errors import ConfigError
from fluxserve.store.base import ApiKeyRecord, CallbackRecord, Store


def open_store(database_url: str) -> Store:
    """The store for `database_url` (`sqlite:///path`), not yet started."""
    if database_url.startswith("sqlite:"):
        from fluxserve.store.sql import SqlStore

        return SqlStore(database_url)
    raise ConfigError(f"database_url: unsupported scheme in {database_url!r}; use sqlite:///path")


__all__ = ["ApiKeyRecord", "CallbackRecord", "Store", "open_store"]
