"""Uploaded images: judged by their bytes, named safely, stored until they expire.

An upload is stored under `uploads/[<upload_path>/]<file_id>/<file_name>`. The
random `file_id` keeps the key, and so its URL, unguessable (local files are
served to whoever has the URL), and the name's extension follows the image's
real format, whatever the client called it.
"""

from __future__ import annotations

import asyncio
import binascii
import secrets
import time
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from fluxserve.errors import (
    FetchError,
    InvalidRequest,
    PayloadTooLarge,
    ReferenceImageError,
    ResponseTooLarge,
    UnsafeURLError,
)
from fluxserve.net_fetch import fetch_bytes
from fluxserve.net_policy import NetPolicy
from fluxserve.netguard import guarded_client
from fluxserve.references import (
    Base64TooLarge,
    decode_base64_payload,
    decode_image,
    sniff_format,
)
from fluxserve.settings import Settings
from fluxserve.storage import Storage, check_key
from fluxserve.store import Store
from fluxserve.store.base import UploadRecord

UPLOADS_FOLDER = "uploads"
MAX_PATH_LENGTH = 255  # the upload_path column's width, in characters
MAX_NAME_BYTES = 255  # most file systems' limit on one name, in bytes of UTF-8
DEFAULT_STEM = "image"

MIME_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}
# Replaced by the real format's extension; any other suffix is part of the name.
_IMAGE_SUFFIXES = frozenset({"jpg", "jpeg", "jpe", "png", "gif", "webp"})


@dataclass(frozen=True)
class Destination:
    """Where an upload goes: the checked `upload_path` and `file_name` of a request."""

    upload_path: str | None
    file_name: str | None


def destination(upload_path: str | None, file_name: str | None) -> Destination:
    """The request's folder and name, or a 400 naming the field that tries to leave its folder."""
    if upload_path:
        problem = _path_problem(upload_path)
        if problem:
            raise InvalidRequest(f"upload_path {problem}")
    if file_name is not None:
        problem = _name_problem(file_name)
        if problem:
            raise InvalidRequest(f"file_name {problem}")
    return Destination(upload_path or None, file_name)


def _path_problem(path: str) -> str | None:
    if len(path) > MAX_PATH_LENGTH:
        return f"must be at most {MAX_PATH_LENGTH} characters"
    if _has_control(path):
        return "must not contain control characters or lone surrogates"
    if "\\" in path:
        return "must not contain backslashes; separate folders with '/'"
    if path.startswith("/"):
        return "must be a relative folder, not start with '/'"
    segments = path.split("/")
    if "" in segments:
        return "must not have empty segments ('//' or a trailing '/')"
    if "." in segments or ".." in segments:
        return "must not contain '.' or '..' segments"
    if any(_utf8_length(segment) > MAX_NAME_BYTES for segment in segments):
        return f"must not have a folder name longer than {MAX_NAME_BYTES} bytes (UTF-8)"
    return None


def _name_problem(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if _has_control(name):
        return "must not contain control characters or lone surrogates"
    if _utf8_length(name) > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes long (UTF-8)"
    if "/" in name or "\\" in name:
        return "must be a plain file name, without '/' or '\\'"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    return None


def _has_control(text: str) -> bool:
    # A lone surrogate (Cs) has no UTF-8 form: no file system or database takes it.
    return any(unicodedata.category(char) in ("Cc", "Cs") for char in text)


def _utf8_length(text: str) -> int:
    return len(text.encode())


def _cut(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8, never inside a character."""
    return text.encode()[:max_bytes].decode(errors="ignore")


def client_name(name: str | None) -> str | None:
    """The last part of a name a client's software chose (a form's file name, a URL's
    path), with control characters and lone surrogates dropped; None when nothing
    usable is left."""
    if not name:
        return None
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(
        char for char in last if unicodedata.category(char) not in ("Cc", "Cs")
    ).strip()
    return None if cleaned in ("", ".", "..") else _cut(cleaned, MAX_NAME_BYTES)


def stored_name(name: str, image_format: str) -> str:
    """`name` with the extension of `image_format` (JPEG, PNG, GIF or WEBP)."""
    extension = _EXTENSIONS[image_format]
    stem, dot, suffix = name.rpartition(".")
    if not (dot and suffix.lower() in _IMAGE_SUFFIXES):
        stem = name
    stem = stem or DEFAULT_STEM
    return f"{_cut(stem, MAX_NAME_BYTES - len(extension) - 1)}.{extension}"


def decode_base64(text: str, max_bytes: int) -> bytes:
    """The bytes of plain base64 or a `data:image/...;base64,` URL; 413 past `max_bytes`."""
    payload = text
    if text[:5].lower() == "data:":
        header, sep, payload = text[5:].partition(",")
        params = [param.strip().lower() for param in header.split(";")]
        if not sep or not params[0].startswith("image/") or "base64" not in params[1:]:
            raise InvalidRequest(
                "base64_data must be plain base64 or a 'data:image/...;base64,' URL"
            )
    if not payload.strip():
        raise InvalidRequest("base64_data holds no data")
    try:
        return decode_base64_payload(payload, max_bytes)
    except Base64TooLarge as exc:
        raise PayloadTooLarge(
            f"base64_data holds more than {max_bytes} bytes, the most allowed"
        ) from exc
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"base64_data is not valid base64: {exc}") from exc


def image_format(data: bytes, *, max_pixels: int, field: str) -> str:
    """JPEG, PNG, GIF or WEBP, by the bytes, once they decode within `max_pixels`; else a 400."""
    try:
        # The header's size is checked before any pixel is decoded: a bomb stops there.
        decode_image(data, max_pixels=max_pixels).close()
    except ReferenceImageError as exc:
        raise InvalidRequest(f"{field}: {exc}") from exc
    found = sniff_format(data)
    assert found is not None  # decode_image accepts only these formats
    return found


class Uploads:
    """Stores uploads for accounts, and fetches the images of url uploads."""

    def __init__(self, store: Store, storage: Storage, settings: Settings, policy: NetPolicy):
        self.store = store
        self.storage = storage
        self.settings = settings
        self.policy = policy

    async def save(
        self,
        account_id: str,
        data: bytes,
        where: Destination,
        *,
        field: str,
        original_name: str | None,
    ) -> UploadRecord:
        """Check that `data` is an image, then record and store it; `field` names it in errors."""
        found = await self.check(data, field=field)
        return await self.keep(account_id, data, where, found, original_name=original_name)

    async def check(self, data: bytes, *, field: str) -> str:
        """The image format of `data` (see `image_format`), decoded off the event loop."""
        return await asyncio.to_thread(
            image_format, data, max_pixels=self.settings.max_reference_pixels, field=field
        )

    async def keep(
        self,
        account_id: str,
        data: bytes,
        where: Destination,
        found: str,
        *,
        original_name: str | None,
    ) -> UploadRecord:
        """Record and store `data`, an image of format `found` that `check` accepted."""
        original = client_name(original_name)
        name = stored_name(where.file_name or original or DEFAULT_STEM, found)
        file_id = secrets.token_hex(16)
        folders = where.upload_path.split("/") if where.upload_path else []
        try:
            key = check_key("/".join([UPLOADS_FOLDER, *folders, file_id, name]))
        except ValueError as exc:
            raise InvalidRequest(f"upload_path or file_name is not usable: {exc}") from exc
        now = time.time()
        upload = UploadRecord(
            file_id=file_id,
            account_id=account_id,
            key=key,
            file_name=name,
            original_name=original,
            file_size=len(data),
            mime_type=MIME_TYPES[found],
            upload_path=where.upload_path,
            created_at=now,
            expires_at=now + self.settings.upload_retention,
        )
        # Recorded first: should storing fail, retention still finds the key.
        await self.store.add_upload(upload)
        await self.storage.put(key, data, upload.mime_type)
        return upload

    async def fetch(self, url: str) -> bytes:
        """The bytes at `url`: read from storage when it is ours, else fetched through the guard."""
        limit = self.settings.max_stream_upload_bytes
        too_large = f"file_url holds more than {limit} bytes, the most allowed"
        key = self.storage.key_for_url(url)
        if key is not None:
            data = await self.storage.get(key)
            if data is None:
                raise InvalidRequest("file_url: the file is no longer stored here")
            if len(data) > limit:
                raise PayloadTooLarge(too_large)
            return data
        timeout = self.settings.fetch_timeout
        try:
            async with guarded_client(self.policy, timeout=timeout) as client:
                fetched = await fetch_bytes(
                    client, url, policy=self.policy, max_bytes=limit, total_timeout=timeout
                )
        except UnsafeURLError as exc:
            raise InvalidRequest(f"file_url is not allowed: {exc}") from exc
        except ResponseTooLarge as exc:
            raise PayloadTooLarge(too_large) from exc
        except FetchError as exc:
            raise InvalidRequest(f"file_url: {exc}") from exc
        return fetched.content


def url_file_name(url: str) -> str | None:
    """The file name a URL's path ends with, if any."""
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    return client_name(unquote(path))
