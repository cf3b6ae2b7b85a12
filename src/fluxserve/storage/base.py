"""The storage port: put a file under a key, hand out a URL for it."""

from __future__ import annotations

from typing import Protocol


class Storage(Protocol):
    """A place for result files. Keys are relative, `/`-separated paths."""

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, atomically: readers never see half a file."""

    def url(self, key: str) -> str:
        """An absolute URL a user can download the file from."""
        ...
