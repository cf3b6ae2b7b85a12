"""The storage port: put a file under a key, read or delete it, hand out a URL for it."""

from __future__ import annotations

from typing import Protocol


class Storage(Protocol):
    """A place for result and uploaded files. Keys are relative, `/`-separated paths.

    Every method refuses a key that `check_key` refuses, with ValueError.
    """

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, atomically: readers never see half a file."""

    async def get(self, key: str) -> bytes | None:
        """The file's bytes, or None when there is no file under `key`."""

    async def delete(self, key: str) -> None:
        """Remove the file under `key`; a missing file is not an error."""

    def url(self, key: str) -> str:
        """An absolute URL a user can download the file from."""
        ...

    def key_for_url(self, url: str) -> str | None:
        """The key behind `url` when it is one of this storage's own URLs, else None.

        Lets fluxserve read its own files directly instead of fetching them over
        HTTP. The key is unguessable, so knowing the URL is what grants access.
        """
        ...


def check_key(key: str) -> str:
    """`key` itself, or ValueError when it is not a plain relative path.

    Segments are checked one by one rather than normalised: in a bucket `a//b`
    and `a/./b` are keys of their own, so folding them locally would make the
    two backends disagree, and `..` would step outside a folder.
    """
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: empty, '.' and '..' segments are refused")
    if "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}: no file or object name holds a NUL")
    return key


def valid_key(key: str) -> str | None:
    """`key` itself when `check_key` accepts it, else None."""
    try:
        return check_key(key)
    except ValueError:
        return None
