"""Files served by fluxserve's own /files route arrive whole, or the range asked for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.responses import Response

from fluxserve.api.file_response import CHUNK_SIZE, file_response

SCOPE = {"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.4"}}
DATA = os.urandom(3 * CHUNK_SIZE + 17)


def _made(path: Path, range_header: str | None = None, if_range: str | None = None) -> Response:
    response = file_response(path, range_header, if_range)
    assert response is not None
    return response


async def _sent(response: Response) -> tuple[int, dict[str, str], bytes]:
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await response(SCOPE, receive, send)
    start, *bodies = messages
    headers = {name.decode(): value.decode() for name, value in start["headers"]}
    return start["status"], headers, b"".join(message.get("body", b"") for message in bodies)


def _rewrite(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    path.write_bytes(DATA)
    return path


async def test_a_file_deleted_after_its_response_is_made_still_arrives_whole(
    image: Path,
) -> None:
    # The sweeper may remove an expired file between a download's lookup and
    # its first byte: the download has it open already and sends all of it.
    response = _made(image)
    os.unlink(image)
    status, headers, body = await _sent(response)
    assert (status, body) == (200, DATA)
    assert headers["content-length"] == str(len(DATA))
    assert headers["content-type"] == "image/png"
    assert headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize(
    ("asked", "start", "end"),
    [
        ("bytes=10-19", 10, 20),
        ("bytes=70000-", 70000, len(DATA)),
        ("bytes=-5", len(DATA) - 5, len(DATA)),
        ("bytes=0-99999999", 0, len(DATA)),
    ],
)
async def test_one_byte_range_is_sent_alone(image: Path, asked: str, start: int, end: int) -> None:
    status, headers, body = await _sent(_made(image, asked))
    assert status == 206
    assert body == DATA[start:end]
    assert headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert headers["content-length"] == str(end - start)


@pytest.mark.parametrize("asked", ["bytes=0-1,5-6", "bytes=9-3", "pages=1-2", "bytes=-"])
async def test_a_range_it_does_not_serve_gets_the_whole_file(image: Path, asked: str) -> None:
    status, _, body = await _sent(_made(image, asked))
    assert (status, body) == (200, DATA)


async def test_a_range_past_the_end_is_416(image: Path) -> None:
    status, headers, body = await _sent(_made(image, f"bytes={len(DATA)}-"))
    assert (status, body) == (416, b"")
    assert headers["content-range"] == f"bytes */{len(DATA)}"


async def test_a_range_of_a_file_that_changed_gets_the_new_file_whole(image: Path) -> None:
    _, first, _ = await _sent(_made(image))
    status, _, body = await _sent(_made(image, "bytes=0-9", if_range=first["etag"]))
    assert (status, body) == (206, DATA[:10])
    _rewrite(image, b"a new image, longer than ten bytes")
    status, second, body = await _sent(_made(image, "bytes=0-9", if_range=first["etag"]))
    assert (status, body) == (200, b"a new image, longer than ten bytes")
    assert second["etag"] != first["etag"]


def test_there_is_no_response_for_what_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"x")
    assert file_response(tmp_path / "missing.png") is None
    assert file_response(tmp_path) is None
    assert file_response(tmp_path / "a-file" / "below.png") is None
    assert file_response(Path("/dev/null")) is None
