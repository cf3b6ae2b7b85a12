"""POST /api/common/upload/{stream,base64,url}: store an image, answer where it is.

Request bodies are read in chunks and refused with a 413 as soon as they grow
past what the limit allows, so no upload holds more than that in memory.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import JsonDict
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from fluxserve.api.json_body import JsonBodyRoute, parse_json
from fluxserve.api.openapi import UploadData, answers
from fluxserve.api.routes import KeyDep, RuntimeDep
from fluxserve.api.schemas import NOT_JSON, describe_validation_error
from fluxserve.errors import InvalidRequest, PayloadTooLarge
from fluxserve.storage import Storage
from fluxserve.store import ApiKeyRecord
from fluxserve.store.base import UploadRecord
from fluxserve.tasks import format_time
from fluxserve.uploads import (
    MAX_NAME_BYTES,
    MAX_PATH_LENGTH,
    Uploads,
    decode_base64,
    destination,
    url_file_name,
)
from fluxserve.wire import ok

PREFIX = "/api/common/upload"
router = APIRouter(prefix=PREFIX, route_class=JsonBodyRoute)

# Room for what surrounds the image in a body: multipart framing and text fields,
# or a JSON object's other fields.
BODY_OVERHEAD = 64 * 1024
MAX_TEXT_FIELDS, MAX_TEXT_FIELD = 8, 4 * 1024  # well within BODY_OVERHEAD
MAX_URL_LENGTH = 2048
# The routes that read their bodies themselves, in chunks, within their own limits.
SELF_BOUNDED_PATHS = (f"{PREFIX}/stream", f"{PREFIX}/base64")


def base64_body_cap(max_bytes: int) -> int:
    """The most bytes of JSON body that can carry an image of `max_bytes` in base64."""
    # base64 takes 4 characters per 3 bytes; a tenth more for line breaks.
    return max_bytes * 4 // 3 * 11 // 10 + BODY_OVERHEAD


# What destination() accepts, for the OpenAPI document: no control characters
# (category Cc), no backslash; a name holds no '/' and is not '.' or '..'; a
# path's segments are not empty, '.' or '..'.
_PLAIN = r"[^\x00-\x1f\x7f-\x9f/\\]"
_NOT_DOT = r"[^\x00-\x1f\x7f-\x9f/\\.]"
_SEGMENT = rf"(?:{_NOT_DOT}|{_NOT_DOT}{_PLAIN}|\.{_NOT_DOT}|{_PLAIN}{{3,}})"
UPLOAD_PATH_SCHEMA: JsonDict = {
    "maxLength": MAX_PATH_LENGTH,
    "pattern": rf"^(?:{_SEGMENT}(?:/{_SEGMENT})*)?$",
    "description": f"Folders, '/'-separated; each name at most {MAX_NAME_BYTES} bytes of UTF-8",
}
FILE_NAME_SCHEMA: JsonDict = {
    "maxLength": MAX_NAME_BYTES,
    "pattern": rf"^(?:{_NOT_DOT}|\.{_NOT_DOT}|\.\.{_PLAIN}){_PLAIN}*$",
    "description": f"At most {MAX_NAME_BYTES} bytes of UTF-8",
}
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "upload_path": {"type": "string", **UPLOAD_PATH_SCHEMA},
        "file_name": {"type": "string", **FILE_NAME_SCHEMA},
    },
}


class Base64Upload(BaseModel):
    """The body of POST /api/common/upload/base64."""

    model_config = ConfigDict(extra="ignore")

    base64_data: str = Field(json_schema_extra={"minLength": 1})
    upload_path: str | None = Field(None, json_schema_extra=UPLOAD_PATH_SCHEMA)
    file_name: str | None = Field(None, json_schema_extra=FILE_NAME_SCHEMA)


class UrlUpload(BaseModel):
    """The body of POST /api/common/upload/url."""

    model_config = ConfigDict(extra="ignore")

    file_url: str = Field(max_length=MAX_URL_LENGTH)
    upload_path: str | None = Field(None, json_schema_extra=UPLOAD_PATH_SCHEMA)
    file_name: str | None = Field(None, json_schema_extra=FILE_NAME_SCHEMA)


async def uploads(rt: RuntimeDep) -> Uploads:
    return rt.uploads


UploadsDep = Annotated[Uploads, Depends(uploads)]


@router.post(
    "/stream",
    **answers(UploadData, 400),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _MULTIPART_SCHEMA}},
        }
    },
)
async def upload_stream(request: Request, key: KeyDep, up: UploadsDep) -> dict[str, Any]:
    """Store the image sent as the multipart part `file`."""
    limit = up.settings.max_stream_upload_bytes
    form = await _read_form(request, limit)
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InvalidRequest("file is required: send the image as the multipart part 'file'")
        if file.size is not None and file.size > limit:
            raise PayloadTooLarge(f"file is larger than {limit} bytes, the most allowed")
        where = destination(_text(form, "upload_path"), _text(form, "file_name"))
        data = await file.read()
    finally:
        await form.close()
    upload = await up.save(_account(key), data, where, field="file", original_name=file.filename)
    return ok(upload_data(upload, up.storage))


@router.post(
    "/base64",
    **answers(UploadData, 400),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": Base64Upload.model_json_schema()}},
        }
    },
)
async def upload_base64(request: Request, key: KeyDep, up: UploadsDep) -> dict[str, Any]:
    """Store the image sent as `base64_data`: plain base64 or a data:image URL."""
    limit = up.settings.max_base64_upload_bytes
    cap = base64_body_cap(limit)
    body = await _read_body(
        request, cap, f"Request body is larger than {cap} bytes: base64_data too large"
    )
    try:
        # Read as every JSON body is, not by pydantic's own parser: a field this
        # route does not know is ignored whatever number it holds, as at submit.
        payload = Base64Upload.model_validate(parse_json(body))
    except json.JSONDecodeError as exc:
        raise InvalidRequest(NOT_JSON) from exc
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(list(exc.errors()))) from exc
    where = destination(payload.upload_path, payload.file_name)
    data = decode_base64(payload.base64_data, limit)
    upload = await up.save(
        _account(key), data, where, field="base64_data", original_name=payload.file_name
    )
    return ok(upload_data(upload, up.storage))


@router.post("/url", **answers(UploadData, 400))
async def upload_url(body: UrlUpload, key: KeyDep, up: UploadsDep) -> dict[str, Any]:
    """Fetch the image at `file_url` (through the net guard) and store it."""
    where = destination(body.upload_path, body.file_name)
    data = await up.fetch(body.file_url)
    upload = await up.save(
        _account(key), data, where, field="file_url", original_name=url_file_name(body.file_url)
    )
    return ok(upload_data(upload, up.storage))


def upload_data(upload: UploadRecord, storage: Storage) -> dict[str, Any]:
    """The `data` of an upload's answer."""
    url = storage.url(upload.key)
    return {
        "file_id": upload.file_id,
        "file_name": upload.file_name,
        "original_name": upload.original_name,
        "file_size": upload.file_size,
        "mime_type": upload.mime_type,
        "upload_path": upload.upload_path,
        "file_url": url,
        "download_url": url,
        "upload_time": format_time(upload.created_at),
        "expires_at": format_time(upload.expires_at),
    }


def _account(key: ApiKeyRecord) -> str:
    # Keys made before accounts existed were given one by migration 0004.
    return key.account_id or key.key_id


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise InvalidRequest(f"{name} must be a text field, not a file")
    return value


async def _read_form(request: Request, limit: int) -> FormData:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise InvalidRequest(
            "Request body must be multipart/form-data, with the image in the part 'file'"
        )
    too_large = f"file is larger than {limit} bytes, the most allowed"
    parser = MultiPartParser(
        request.headers,
        _bounded(request, limit + BODY_OVERHEAD, too_large),
        max_files=1,
        max_fields=MAX_TEXT_FIELDS,
        max_part_size=MAX_TEXT_FIELD,
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(
            f"Request body is not valid multipart/form-data: {exc.message}"
        ) from exc


async def _read_body(request: Request, cap: int, too_large: str) -> bytes:
    body = bytearray()
    async for chunk in _bounded(request, cap, too_large):
        body += chunk
    return bytes(body)


async def _bounded(request: Request, cap: int, too_large: str) -> AsyncGenerator[bytes, None]:
    """The request body's chunks; a 413 saying `too_large` once they pass `cap` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(too_large)  # refused before reading any of it
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > cap:
            raise PayloadTooLarge(too_large)
        yield chunk
