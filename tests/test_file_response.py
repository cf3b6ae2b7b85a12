"""Files served by fluxserve's own /files route arrive whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi.responses import StreamingResponse

from fluxserve.api.file_response import CHUNK_SIZE, file_response

SCOPE = {"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.4"}}


def _made(path: Path) -> StreamingResponse:
    response = file_response(path)
    assert response is not None
    return response


async def _sent(response: StreamingResponse) -> tuple[dict[str, str], bytes]:
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await response(SCOPE, receive, send)
    start, *bodies = messages
    assert start["status"] == 200
    headers = {name.decode(): value.decode() for name, value in start["headers"]}
    return headers, b"".join(message["body"] for message in bodies)


async def test_a_file_deleted_after_its_response_is_made_still_arrives_whole(
    tmp_path: Path,
) -> None:
    # The sweeper may remove an expired file between a download's lookup and
    # its first byte: the download has it open already and sends all of it.
    data = os.urandom(3 * CHUNK_SIZE + 17)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    response = _made(path)
    path.unlink()
    headers, body = await _sent(response)
    assert not path.exists()
    assert body == data
    assert headers["content-length"] == str(len(data))
    assert headers["content-type"] == "image/png"


async def test_the_etag_changes_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "image.webp"
    path.write_bytes(b"first")
    first, _ = await _sent(_made(path))
    path.write_bytes(b"second, longer")
    second, body = await _sent(_made(path))
    assert body == b"second, longer"
    assert second["content-type"] == "image/webp"
    assert first["etag"] != second["etag"]


def test_there_is_no_response_for_what_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"x")
    assert file_response(tmp_path / "missing.png") is None
    assert file_response(tmp_path) is None
    assert file_response(tmp_path / "a-file" / "below.png") is None
    assert file_response(Path("/dev/null")) is None
