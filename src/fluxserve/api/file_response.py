"""A stored file as an HTTP response, opened before the response is made.

The file is opened first and sent from that open file: one deleted meanwhile
(the retention sweeper removes expired files while they may be downloading)
still arrives whole, and one deleted before is a 404, never a response whose
headers promise a body it cannot send.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import stat
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO

from fastapi.responses import StreamingResponse

CHUNK_SIZE = 64 * 1024


def file_response(path: Path) -> StreamingResponse | None:
    """The response sending the regular file at `path`, or None when there is none."""
    try:
        file = path.open("rb")
    except OSError:  # missing, a folder, or a path through a file
        return None
    status = os.fstat(file.fileno())
    if not stat.S_ISREG(status.st_mode):
        file.close()
        return None
    tag = hashlib.md5(f"{status.st_mtime}-{status.st_size}".encode(), usedforsecurity=False)
    return StreamingResponse(
        _chunks(file),
        media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
        headers={
            "content-length": str(status.st_size),
            "last-modified": formatdate(status.st_mtime, usegmt=True),
            "etag": f'"{tag.hexdigest()}"',
        },
    )


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    # A plain generator: Starlette reads it on a thread, and closing it (the
    # response ends or the client goes away) closes the file.
    with file:
        while chunk := file.read(CHUNK_SIZE):
            yield chunk
