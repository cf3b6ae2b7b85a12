"""Result files in a local folder, served by fluxserve itself under `/files/`."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import quote

FILES_ROUTE = "/files"


class LocalStorage:
    """Files under `root`; their URLs start with `base_url` + `/files/`."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/")

    def path_for(self, key: str) -> Path | None:
        """The file's path, or None when `key` would step outside the root."""
        parts = PurePosixPath(key).parts
        if not parts or any(part in ("..", "") or part.startswith("/") for part in parts):
            return None
        return self.root.joinpath(*parts)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path_for(key)
        if path is None:
            raise ValueError(f"invalid storage key {key!r}")
        await asyncio.to_thread(_write_atomically, path, data)

    def url(self, key: str) -> str:
        return f"{self.base_url}{FILES_ROUTE}/{quote(key)}"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
