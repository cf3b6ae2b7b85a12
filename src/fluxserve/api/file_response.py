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
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def file_response(
    path: Path, range_header: str | None = None, if_range: str | None = None
) -> Response | None:
    """The response sending the regular file at `path` (or the range asked for),
    or None when there is none."""
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
    if not span:
        headers["content-length"] = str(size)
        return StreamingResponse(_chunks(file, 0, size), media_type=media_type, headers=headers)
    start, end = span
    headers["content-length"] = str(end - start)
    headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    return StreamingResponse(
        _chunks(file, start, end), status_code=206, media_type=media_type, headers=headers
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
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if not last else min(int(last) + 1, size)
        if last and int(last) < start:
            return None
    if start >= size or start >= end:
        return ()
    return start, end


def _chunks(file: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    # A plain generator: Starlette reads it on a thread, and closing it (the
    # response ends or the client goes away) closes the file.
    with file:
        file.seek(start)
        left = end - start
        while left > 0 and (chunk := file.read(min(CHUNK_SIZE, left))):
            left -= len(chunk)
            yield chunk
