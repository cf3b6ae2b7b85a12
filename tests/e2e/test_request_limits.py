"""What a request may carry: keys checked before a body is read, bodies capped while
they arrive, prompts counted as they are stored, data: references moved into storage."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxserve.tasks import Task

from conftest import Service, make_settings, run_service, send_until_answered


@pytest.fixture
async def service(tmp_path: Path) -> Any:
    settings = make_settings(tmp_path / "data", max_body_bytes=16 * 1024)
    async with run_service(settings, run_worker=False) as running:
        yield running


def request_head(service: Service, path: str, *, key: str | None, length: int | None) -> bytes:
    host = service.url.removeprefix("http://")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def envelope(head: bytes, body: bytes, status: int) -> str:
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    answer = json.loads(body)
    assert answer["code"] == status
    message: str = answer["error"]["message"]
    return message


# Authentication before the body ------------------------------------------------------


@pytest.mark.parametrize("key", [None, "not-a-key"])
async def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(
    service: Service, key: str | None
) -> None:
    """200 MB announced: the 401 comes while the body has barely begun, and the
    connection is closed rather than drained."""
    head = request_head(service, "/api/generate/submit", key=key, length=200_000_000)
    answer, body, sent = await send_until_answered(service.url, head, chunked=False)
    assert "API key" in envelope(answer, body, 401)
    assert b"connection: close" in answer.lower()
    assert sent <= 1024 * 1024, f"the server took {sent} bytes before refusing"


# Body caps ---------------------------------------------------------------------------


async def test_a_declared_length_past_the_cap_is_refused_at_once(service: Service) -> None:
    head = request_head(service, "/api/common/upload/url", key=service.key, length=10**9)
    answer, body, sent = await send_until_answered(service.url, head, chunked=False)
    message = envelope(answer, body, 413)
    assert message == f"Request body is larger than {16 * 1024} bytes, the most this route accepts"
    assert sent <= 1024 * 1024


async def test_a_chunked_body_is_cut_off_once_it_passes_the_cap(service: Service) -> None:
    """No length to refuse up front: the 413 comes while the body is still arriving,
    before any of it is parsed."""
    head = request_head(service, "/api/common/upload/url", key=service.key, length=None)
    answer, body, sent = await send_until_answered(service.url, head, chunked=True)
    assert "larger than 16384 bytes" in envelope(answer, body, 413)
    assert sent <= 1024 * 1024, f"the server took {sent} bytes before refusing"


async def test_routes_that_take_no_body_are_capped_too(service: Service) -> None:
    head = request_head(service, "/api/generate/cancel/task-x", key=service.key, length=10**8)
    answer, body, _ = await send_until_answered(service.url, head, chunked=False)
    envelope(answer, body, 413)


async def test_a_submit_has_room_for_its_data_references_and_no_more(service: Service) -> None:
    settings = service.runtime.settings
    fits = (await service.submit(edit_body([data_url(png(96, 96))]))).status_code
    assert fits == 200
    huge = 9 * settings.max_base64_upload_bytes * 4 // 3 + settings.max_body_bytes
    head = request_head(service, "/api/generate/submit", key=service.key, length=huge)
    answer, body, _ = await send_until_answered(service.url, head, chunked=False)
    envelope(answer, body, 413)


# Prompts -----------------------------------------------------------------------------


async def stored(service: Service, task_id: str) -> Task:
    task = await service.runtime.store.get_task(task_id)
    assert task is not None
    return task


async def test_the_prompt_is_counted_as_stored(tmp_path: Path) -> None:
    """'a cat' and ten million spaces: the task keeps, and the engine gets, 'a cat'."""
    async with run_service(make_settings(tmp_path / "data"), run_worker=False) as service:
        body = {"model": "flux-2-pro", "input": {"prompt": "  a cat" + " " * 10_000_000}}
        response = await service.submit(body)
        assert response.status_code == 200, response.text
        task = await stored(service, response.json()["data"]["task_id"])
    assert task.input.prompt == "a cat"


async def test_whitespace_inside_a_prompt_counts(service: Service) -> None:
    body = {"model": "flux-2-pro", "input": {"prompt": "a" + " " * 5000 + "cat"}}
    response = await service.submit(body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "input.prompt must be 3 to 5000 characters (got 5004)"
    )


async def test_a_lone_surrogate_in_a_prompt_is_400(service: Service) -> None:
    raw = b'{"model": "flux-2-pro", "input": {"prompt": "a cat \\ud800 on a mat"}}'
    response = await service.client.post(
        "/api/generate/submit",
        content=raw,
        headers={**service.auth(), "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "input.prompt must be valid Unicode text: it holds a lone surrogate (U+D800) at character 6"
    )


# data: references --------------------------------------------------------------------


def png(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "teal").save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def edit_body(urls: list[str]) -> dict[str, Any]:
    return {"model": "flux-2-pro-edit", "input": {"prompt": "make it blue", "image_urls": urls}}


async def test_a_data_reference_is_stored_and_the_task_keeps_its_url(tmp_path: Path) -> None:
    image = png(300, 200)
    async with run_service(make_settings(tmp_path / "data"), run_worker=False) as service:
        response = await service.submit(edit_body(["https://example.com/a.png", data_url(image)]))
        assert response.status_code == 200, response.text
        task = await stored(service, response.json()["data"]["task_id"])
        first, second = task.input.image_urls
        assert first == "https://example.com/a.png"
        assert second.startswith(f"{service.url}/files/uploads/")
        assert len(json.dumps(task.input.to_json())) < 1024
        download = await service.client.get(second)
    assert download.status_code == 200
    assert download.content == image


def bmp_url() -> str:
    return data_url(png(96, 96, "BMP"), "image/png")  # the declared type is not what counts


SVG = "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='x'/>").decode()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("data:,hello", "input.image_urls[0]: data: URL media type must be an image, not 'none'"),
        (SVG, "input.image_urls[0]: data: URL media type 'image/svg+xml' is not supported"),
        (bmp_url(), "input.image_urls[0]: not a JPEG, PNG, GIF or WebP image"),
        (data_url(png(96, 96)[:40]), "input.image_urls[0]: not a valid PNG image"),
        (data_url(png(600, 40)), "input.image_urls[0] is 600x40: FLUX.2 needs at least 64"),
    ],
)
async def test_a_data_reference_that_is_no_usable_image_is_400(
    tmp_path: Path, service: Service, url: str, expected: str
) -> None:
    response = await service.submit(edit_body([url]))
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(expected)
    assert not list((service.runtime.settings.files_dir).glob("uploads/**/*.*"))


async def test_a_data_reference_past_the_base64_upload_limit_is_413(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", max_base64_upload_bytes=10_000)
    noisy = Image.frombytes("RGB", (100, 100), random.Random(7).randbytes(30_000))
    buffer = io.BytesIO()
    noisy.save(buffer, "PNG")
    async with run_service(settings, run_worker=False) as service:
        good = data_url(png(96, 96))
        response = await service.submit(edit_body([good, data_url(buffer.getvalue())]))
        files = list(settings.files_dir.glob("uploads/**/*.*"))
    assert response.status_code == 413
    assert response.json()["error"]["message"] == (
        "input.image_urls[1] holds more than 10000 bytes, the most a data: URL may"
    )
    assert files == []  # the good one is not stored for a refused submit
