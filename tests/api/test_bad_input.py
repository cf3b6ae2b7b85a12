"""Bad input answered with a clear 4xx in the error envelope, never a 500: host names
that are not IDNA, NULs, ranges and cursors past any number, JSON bodies with integers
past any conversion, bytes that are not UTF-8 or nesting too deep, names past the
file system's limit; and the file route's HEAD and redirects."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import Service, make_settings, run_service


@pytest.fixture(params=["sqlite", "postgresql"])
async def service(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Service]:
    url = request.getfixturevalue("emptied_postgres_url") if request.param == "postgresql" else None
    settings = make_settings(tmp_path / "data", database_url=url)
    async with run_service(settings, run_worker=False, in_process=True) as running:
        yield running


def refusal(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status
    message: str = body["error"]["message"]
    return message


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), "olive").save(buffer, "PNG")
    return buffer.getvalue()


async def upload(service: Service, **fields: str) -> httpx.Response:
    return await service.client.post(
        "/api/common/upload/base64",
        json={"base64_data": base64.b64encode(png()).decode(), **fields},
        headers=service.auth(),
    )


# Host names that are not IDNA ---------------------------------------------------------


async def test_an_invalid_idna_host_is_400_in_every_url_field(service: Service) -> None:
    prompt = {"prompt": "a lighthouse"}
    callback = await service.submit(
        {"model": "flux-2-pro", "callback_url": "https://xn--/", "input": prompt}
    )
    assert refusal(callback, 400).startswith("callback_url is not allowed: invalid URL")
    reference = await service.submit(
        {"model": "flux-2-pro-edit", "input": {**prompt, "image_urls": ["https://xn--/a.png"]}}
    )
    assert refusal(reference, 400).startswith("input.image_urls[0] is not allowed: invalid URL")
    fetched = await service.client.post(
        "/api/common/upload/url", json={"file_url": "https://xn--/a.png"}, headers=service.auth()
    )
    assert refusal(fetched, 400).startswith("file_url is not allowed: invalid URL")


# Task ids, cursors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/generate/status/task%00x"),
        ("POST", "/api/generate/cancel/task%00x"),
        ("GET", "/api/generate/callbacks/task%00x"),
        ("POST", "/api/generate/callbacks/task%00x/redeliver"),
    ],
)
async def test_a_nul_in_a_task_id_is_404(service: Service, method: str, path: str) -> None:
    response = await service.client.request(method, path, headers=service.auth())
    assert refusal(response, 404) == "Task 'task\\x00x' not found"


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "junk", ["é", "!!!", cursor("seq:²"), cursor("seq:-1"), cursor("seq:" + "9" * 5000)]
)
async def test_a_junk_cursor_is_400(service: Service, junk: str) -> None:
    response = await service.client.get(
        "/api/generate/tasks", params={"cursor": junk}, headers=service.auth()
    )
    assert refusal(response, 400).startswith("cursor is not one this server gave out")


async def test_a_cursor_past_every_seq_starts_from_the_newest(service: Service) -> None:
    """2^31 and more: past PostgreSQL's 32-bit seq, and past any seq SQLite has given."""
    submitted = await service.submit({"model": "flux-2-pro", "input": {"prompt": "a kite"}})
    task_id = submitted.json()["data"]["task_id"]
    for number in (2**31, 2**63 - 1):
        response = await service.client.get(
            "/api/generate/tasks",
            params={"cursor": cursor(f"seq:{number}")},
            headers=service.auth(),
        )
        assert response.status_code == 200, response.text
        assert [task["task_id"] for task in response.json()["data"]["tasks"]] == [task_id]


# JSON bodies --------------------------------------------------------------------------

PROMPT = b'"a lighthouse on a cliff"'
THOUSANDS_OF_DIGITS = b"9" * 5000  # past the 4300 digits Python converts to an int


async def post_json(service: Service, path: str, body: bytes) -> httpx.Response:
    headers = {**service.auth(), "Content-Type": "application/json"}
    return await service.client.post(path, content=body, headers=headers)


async def assert_still_submits(service: Service) -> None:
    response = await service.submit({"model": "flux-2-pro", "input": {"prompt": "a kite"}})
    assert response.status_code == 200, response.text


async def test_an_integer_of_thousands_of_digits_is_refused_by_its_field(service: Service) -> None:
    """Out of range, as 1e400 is: a 400 naming the field, not the input."""
    for sign in (b"", b"-"):
        body = b'{"model": "flux-2-pro", "input": {"prompt": %s, "seed": %s%s}}' % (
            PROMPT,
            sign,
            THOUSANDS_OF_DIGITS,
        )
        response = await post_json(service, "/api/generate/submit", body)
        assert refusal(response, 400) == "input.seed: Input should be a valid integer"
        assert len(response.content) < 200  # the digits are not echoed
    await assert_still_submits(service)


async def test_an_integer_of_thousands_of_digits_in_an_unknown_field_is_ignored(
    service: Service,
) -> None:
    """Fields the server does not know are ignored, whatever number they hold."""
    body = b'{"model": "flux-2-pro", "note": %s, "input": {"prompt": %s, "tag": [%s]}}' % (
        THOUSANDS_OF_DIGITS,
        PROMPT,
        THOUSANDS_OF_DIGITS,
    )
    response = await post_json(service, "/api/generate/submit", body)
    assert response.status_code == 200, response.text
    status = await service.status(response.json()["data"]["task_id"])
    assert status.json()["data"]["status"] == "not_started"
    image = base64.b64encode(png())
    body = b'{"base64_data": "%s", "note": %s}' % (image, THOUSANDS_OF_DIGITS)
    uploaded = await post_json(service, "/api/common/upload/base64", body)
    assert uploaded.status_code == 200, uploaded.text


def body_types(operations: dict[str, Any]) -> set[str]:
    """The media types a path's POST takes as its body, as the OpenAPI document says."""
    return set(operations.get("post", {}).get("requestBody", {}).get("content", {}))


async def test_a_body_that_is_not_utf8_or_nested_too_deep_is_not_json_on_every_route(
    service: Service,
) -> None:
    """Every route of this API that takes a JSON body, as its document lists them."""
    document = (await service.client.get("/openapi.json")).json()
    json_routes = [
        path
        for path, operations in document["paths"].items()
        if path.startswith("/api/") and "application/json" in body_types(operations)
    ]
    assert {"/api/generate/submit", "/api/common/upload/base64"} <= set(json_routes)
    for path in json_routes:
        for body in (b'{"model": "flux-2-pro", "input": {"prompt": "\xff\xfe"}}', b"[" * 100_000):
            response = await post_json(service, path, body)
            assert refusal(response, 400) == "Request body is not valid JSON", path
    await assert_still_submits(service)


# Upload names ------------------------------------------------------------------------


async def test_a_file_name_past_255_bytes_is_400_and_leaves_no_upload(service: Service) -> None:
    """150 characters, but 300 bytes of UTF-8: more than a file system takes."""
    message = refusal(await upload(service, file_name="é" * 150 + ".png"), 400)
    assert message == "file_name must be at most 255 bytes long (UTF-8)"
    folder = refusal(await upload(service, upload_path="ok/" + "ü" * 130), 400)
    assert folder == "upload_path must not have a folder name longer than 255 bytes (UTF-8)"
    far_future = time.time() + 10**9
    assert await service.runtime.store.expired_uploads(far_future, 10) == []
    fits = await upload(service, file_name="é" * 125 + ".png")  # 254 bytes
    assert fits.status_code == 200, fits.text


# The file route ------------------------------------------------------------------------


async def uploaded_url(service: Service) -> str:
    response = await upload(service)
    assert response.status_code == 200, response.text
    url: str = response.json()["data"]["file_url"]
    return url


async def test_a_nul_in_a_file_path_is_404(service: Service) -> None:
    refusal(await service.client.get("/files/%00"), 404)
    refusal(await service.client.get("/files/uploads/%00/x.png"), 404)


async def test_a_range_of_thousands_of_digits_is_answered(service: Service) -> None:
    url = await uploaded_url(service)
    size = len(png())
    huge = "9" * 5000
    past_end = await service.client.get(url, headers={"range": f"bytes={huge}-"})
    assert past_end.status_code == 416
    assert past_end.headers["content-range"] == f"bytes */{size}"
    to_huge = await service.client.get(url, headers={"range": f"bytes=10-{huge}"})
    assert to_huge.status_code == 206
    assert to_huge.headers["content-range"] == f"bytes 10-{size - 1}/{size}"
    assert to_huge.content == png()[10:]
    last_huge = await service.client.get(url, headers={"range": f"bytes=-{huge}"})
    assert last_huge.status_code == 206
    assert last_huge.content == png()
    zeros = await service.client.get(url, headers={"range": "bytes=" + "0" * 5000 + "3-4"})
    assert zeros.content == png()[3:5]


async def test_head_on_a_file_answers_as_get_without_the_body(service: Service) -> None:
    url = await uploaded_url(service)
    got = await service.client.get(url)
    head = await service.client.head(url)
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-length", "content-type", "etag", "last-modified", "accept-ranges"):
        assert head.headers[name] == got.headers[name], name
    ranged = await service.client.head(url, headers={"range": "bytes=0-9"})
    assert ranged.status_code == 206
    assert ranged.headers["content-length"] == "10"
    assert (await service.client.head(url + "-missing")).status_code == 404


async def test_the_file_route_never_redirects_to_the_host_header(service: Service) -> None:
    for path in ("/files", "/api/generate/tasks/"):
        response = await service.client.get(
            path, headers={**service.auth(), "host": "evil.example"}
        )
        assert "location" not in response.headers
        refusal(response, 404)
