"""Result files in a local folder, served by fluxserve itself under `/files/`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from fluxserve.storage.base import check_key, valid_key

FILES_ROUTE = "/files"


class LocalStorage:
    """Files under `root`; their URLs start with `base_url` + `/files/`.

    A file is written in full beside `root`, in `<root>.partial/`, then moved
    into place: a writer killed midway leaves its partial file there, never
    among the files served, and `remove_stale_partials` clears it later.
    """

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        self.partials = root.with_name(root.name + ".partial")
        self.base_url = base_url.rstrip("/")
        self.file_mode = 0o666 & ~_umask()

    def path_for(self, key: str) -> Path | None:
        """The file's path, or None when `key` is invalid (it could step outside the root)."""
        try:
            return self._path(key)
        except ValueError:
            return None

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        # The content type is not kept: the /files route derives it from the name.
        await asyncio.to_thread(
            _write_atomically, self._path(key), data, self.partials, self.file_mode
        )

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(_read_or_none, self._path(key))

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(_unlink_if_file, self._path(key))

    def url(self, key: str) -> str:
        return f"{self.base_url}{FILES_ROUTE}/{quote(check_key(key))}"

    def key_for_url(self, url: str) -> str | None:
        try:
            parts = urlsplit(url)
        except ValueError:
            return None
        base = urlsplit(self.base_url)
        folder = f"{base.path}{FILES_ROUTE}/"
        same_origin = (parts.scheme.lower(), parts.netloc.lower()) == (
            base.scheme.lower(),
            base.netloc.lower(),
        )
        if not same_origin or not parts.path.startswith(folder):
            return None
        return valid_key(unquote(parts.path.removeprefix(folder)))

    async def remove_stale_partials(self, started_before: float) -> int:
        """Delete partial files begun before `started_before` (epoch seconds): their
        writers are gone, as a write takes milliseconds. Returns how many."""
        return await asyncio.to_thread(_remove_older, self.partials, started_before)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))


def _umask() -> int:
    """The process's umask. Reading it means setting it: done once, at start-up."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomically(path: Path, data: bytes, partials: Path, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partials.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=partials)
    try:
        # mkstemp makes the file private (0600); a result has the mode any new
        # file gets, so a web server running as another user can serve the folder.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# A key that names a folder, or runs through a file, holds no file here, just as
# it holds no object in a bucket; so those errors mean "missing" too.
_NO_FILE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except _NO_FILE:
        return None


def _unlink_if_file(path: Path) -> None:
    with contextlib.suppress(*_NO_FILE):
        path.unlink()


def _remove_older(folder: Path, before: float) -> int:
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file() and entry.stat().st_mtime < before:
                    os.unlink(entry.path)
                    removed += 1
    return removed
