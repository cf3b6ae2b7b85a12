"""A stored file as an HTTP response, opened before the response is made.

The file is opened first and sent from that open file: one deleted meanwhile
(the retention sweeper removes expired files while they may be downloading)
still arrives whole, and one deleted before is a 404, never a response whose
headers promise a body it cannot send.

A single byte range (`Range: bytes=...`) is answered with 206, so an
interrupted download can resume; several ranges, or one that cannot be read,
get the whole file, as RFC 9110 allows.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import stat
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO

from fastapi.responses import Response, StreamingResponse

CHUNK_SIZE = 64 * 1024
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def file_response(
    path: Path,
    range_header: str | None = None,
    if_range: str | None = None,
    *,
    with_body: bool = True,
) -> Response | None:
    """The response sending the regular file at `path` (or the range asked for),
    or None when there is none. Without the body (HEAD), the same status and headers."""
    try:
        file = path.open("rb")
    except OSError:  # missing, a folder, or a path through a file
        return None
    status = os.fstat(file.fileno())
    if not stat.S_ISREG(status.st_mode):
        file.close()
        return None
    size = status.st_size
    tag = hashlib.md5(f"{status.st_mtime}-{size}".encode(), usedforsecurity=False)
    headers = {
        "accept-ranges": "bytes",
        "last-modified": formatdate(status.st_mtime, usegmt=True),
        "etag": f'"{tag.hexdigest()}"',
    }
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # If-Range: the range only if the client's copy is still this file.
    wanted = range_header if if_range in (None, headers["etag"]) else None
    span = _span(wanted, size) if wanted else None
    if span == ():
        file.close()
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{size}"})
    start, end, code = 0, size, 200
    if span:
        (start, end), code = span, 206
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    headers["content-length"] = str(end - start)
    if not with_body:
        file.close()
        return Response(status_code=code, media_type=media_type, headers=headers)
    return StreamingResponse(
        _chunks(file, start, end), status_code=code, media_type=media_type, headers=headers
    )


def _span(header: str, size: int) -> tuple[int, int] | tuple[()] | None:
    """[start, end) of one byte range; () when it lies past the end of the file;
    None when the header asks for something else (the whole file is sent)."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        if not last:
            return None
        start, end = max(0, size - _position(last, size)), size
    else:
        start = _position(first, size)
        end = size if not last else min(_position(last, size) + 1, size)
        if last and _position(last, size) < start:
            return None
    if start >= size or start >= end:
        return ()
    return start, end


def _position(digits: str, size: int) -> int:
    """A byte position, as far as it matters for a file of `size` bytes: any number
    past the end counts as `size`, so thousands of digits are never converted."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(size)):
        return size
    return min(int(significant), size)


def _chunks(file: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    # A plain generator: Starlette reads it on a thread, and closing it (the
    # response ends or the client goes away) closes the file.
    with file:
        file.seek(start)
        left = end - start
        while left > 0 and (chunk := file.read(min(CHUNK_SIZE, left))):
            left -= len(chunk)
            yield chunk
