"""Uploads through a real server: the three kinds, every refusal, use in a task, expiry."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import struct
import time
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve import retention
from fluxserve.engines.base import Engine
from fluxserve.errors import UnsafeURLError
from fluxserve.net_policy import NetPolicy
from fluxserve.netguard import guarded_client
from fluxserve.references import load_references
from fluxserve.settings import Settings
from fluxserve.storage.local import LocalStorage
from fluxserve.store.base import Outcome
from fluxserve.tasks import ResultFile

from conftest import Service, make_settings, run_service, send_until_answered, serve_asgi

WIRE_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")
UPLOAD_FIELDS = [
    "file_id",
    "file_name",
    "original_name",
    "file_size",
    "mime_type",
    "upload_path",
    "file_url",
    "download_url",
    "upload_time",
    "expires_at",
]
DAY = 24 * 3600


def image_bytes(fmt: str, size: tuple[int, int] = (96, 80), *, noise: bool = False) -> bytes:
    """A real image file made with Pillow; `noise` makes it large and incompressible."""
    if noise:
        image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        image = Image.new("RGB", size, (200, 30, 90))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small, valid PNG whose header claims `width` x `height`: a decompression bomb."""
    data = bytearray(image_bytes("PNG", (1, 1)))
    # The IHDR chunk follows the 8-byte signature: length, type, then width and height.
    ihdr = 8 + 4
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 4 + 13]))
    data[ihdr + 4 + 13 : ihdr + 4 + 17] = struct.pack(">I", crc)
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(tmp_path / "data", **overrides)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    async with run_service(settings_for(tmp_path), run_worker=False, in_process=True) as svc:
        yield svc


async def stream_upload(
    service: Service,
    data: bytes,
    filename: str = "photo.png",
    content_type: str = "image/png",
    **fields: str,
) -> httpx.Response:
    return await service.client.post(
        "/api/common/upload/stream",
        files={"file": (filename, data, content_type)},
        data=fields,
        headers=service.auth(),
    )


async def base64_upload(service: Service, base64_data: str, **fields: str) -> httpx.Response:
    return await service.client.post(
        "/api/common/upload/base64",
        json={"base64_data": base64_data, **fields},
        headers=service.auth(),
    )


async def url_upload(service: Service, file_url: str, **fields: str) -> httpx.Response:
    return await service.client.post(
        "/api/common/upload/url", json={"file_url": file_url, **fields}, headers=service.auth()
    )


def uploaded(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == 200
    data: dict[str, Any] = body["data"]
    return data


def refusal(response: httpx.Response, status: int) -> str:
    """The error message, once the answer is the error envelope with `status`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status
    assert body["error"]["type"] == "invalid_request_error"
    message: str = body["error"]["message"]
    return message


def serve_images(images: dict[str, bytes], served: list[str]) -> Starlette:
    """A plain web server with one image per path; records what it was asked for."""

    async def image(request: Request) -> Response:
        served.append(request.url.path)
        data = images.get(request.url.path)
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="application/octet-stream")

    return Starlette(routes=[Route("/{name:path}", image)])


# The three kinds ---------------------------------------------------------------


async def test_a_stream_upload_answers_every_field_and_serves_the_file(service: Service) -> None:
    data = image_bytes("PNG")
    before = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    response = await stream_upload(
        service, data, "holiday.png", upload_path="avatars/2025", file_name="me.png"
    )
    upload = uploaded(response)
    assert list(upload) == UPLOAD_FIELDS
    assert upload["file_name"] == "me.png"
    assert upload["original_name"] == "holiday.png"
    assert upload["file_size"] == len(data)
    assert upload["mime_type"] == "image/png"
    assert upload["upload_path"] == "avatars/2025"
    assert re.fullmatch(r"[0-9a-f]{32}", upload["file_id"])
    assert upload["file_url"].startswith(f"{service.url}/files/uploads/avatars/2025/")
    assert upload["file_url"].endswith(f"/{upload['file_id']}/me.png")
    assert upload["download_url"] == upload["file_url"]
    assert WIRE_TIME.match(upload["upload_time"]) and WIRE_TIME.match(upload["expires_at"])
    uploaded_at = datetime.fromisoformat(upload["upload_time"])
    assert before <= uploaded_at <= datetime.now(UTC).replace(tzinfo=None)
    kept = datetime.fromisoformat(upload["expires_at"]) - uploaded_at
    assert kept.total_seconds() == 3 * DAY  # the default upload_retention

    download = await service.client.get(upload["file_url"])
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["content-type"] == "image/png"
    assert download.headers["content-length"] == str(len(data))
    assert download.headers["etag"] and download.headers["last-modified"]
    part = await service.client.get(upload["file_url"], headers={"Range": "bytes=4-9"})
    assert (part.status_code, part.content) == (206, data[4:10])


async def test_a_stream_upload_without_a_name_keeps_the_files_own(service: Service) -> None:
    upload = uploaded(await stream_upload(service, image_bytes("GIF"), "C:\\pics\\cat.gif"))
    assert upload["file_name"] == "cat.gif"
    assert upload["original_name"] == "cat.gif"
    assert upload["mime_type"] == "image/gif"
    assert upload["upload_path"] is None
    assert "/files/uploads/" + upload["file_id"] + "/cat.gif" in upload["file_url"]


@pytest.mark.parametrize(
    ("fmt", "mime", "extension"),
    [("JPEG", "image/jpeg", "jpg"), ("PNG", "image/png", "png"), ("WEBP", "image/webp", "webp")],
)
async def test_base64_uploads_plain_and_as_data_url(
    service: Service, fmt: str, mime: str, extension: str
) -> None:
    data = image_bytes(fmt)
    plain = uploaded(await base64_upload(service, b64(data)))
    assert plain["file_name"] == f"image.{extension}"
    assert plain["original_name"] is None
    assert (plain["mime_type"], plain["file_size"]) == (mime, len(data))

    # A data: URL, wrapped at 76 characters as many encoders do.
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    as_url = uploaded(
        await base64_upload(service, f"data:{mime};base64,{wrapped}", file_name="scan")
    )
    assert as_url["file_name"] == f"scan.{extension}"
    assert as_url["original_name"] == "scan"
    assert (await service.client.get(as_url["file_url"])).content == data


async def test_a_url_upload_fetches_and_stores_the_image(service: Service) -> None:
    data = image_bytes("JPEG")
    served: list[str] = []
    async with serve_asgi(serve_images({"/shots/sunset.jpeg": data}, served)) as origin:
        upload = uploaded(await url_upload(service, f"{origin}/shots/sunset.jpeg"))
    assert served == ["/shots/sunset.jpeg"]
    assert upload["original_name"] == "sunset.jpeg"
    assert upload["file_name"] == "sunset.jpg"
    assert upload["mime_type"] == "image/jpeg"
    assert (await service.client.get(upload["file_url"])).content == data


async def test_uploads_need_a_key(service: Service) -> None:
    for path, kwargs in [
        ("stream", {"files": {"file": ("a.png", image_bytes("PNG"), "image/png")}}),
        ("base64", {"json": {"base64_data": b64(image_bytes("PNG"))}}),
        ("url", {"json": {"file_url": "https://example.com/a.png"}}),
    ]:
        response = await service.client.post(f"/api/common/upload/{path}", **kwargs)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


async def test_an_upload_belongs_to_the_keys_account(service: Service) -> None:
    upload = uploaded(await base64_upload(service, b64(image_bytes("PNG"))))
    record = await service.runtime.store.get_upload(upload["file_id"])
    assert record is not None
    [key] = [k for k in await service.runtime.store.list_keys() if k.name == "test"]
    assert key.account_id is not None and record.account_id == key.account_id
    assert record.key.startswith("uploads/") and record.key.endswith("/image.png")


# Refusals -----------------------------------------------------------------------


async def test_the_bytes_decide_the_type_not_the_name_or_declared_type(service: Service) -> None:
    jpeg = image_bytes("JPEG")
    upload = uploaded(await stream_upload(service, jpeg, "photo.png", "image/png"))
    assert upload["mime_type"] == "image/jpeg"
    assert upload["file_name"] == "photo.jpg"
    assert upload["original_name"] == "photo.png"

    renamed = uploaded(await base64_upload(service, b64(jpeg), file_name="cat.webp"))
    assert renamed["file_name"] == "cat.jpg"


@pytest.mark.parametrize(
    "content",
    [
        b"<html><body>not an image</body></html>",
        b'<svg xmlns="http://www.w3.org/2000/svg"></svg>',
        b"BM" + bytes(60),  # a BMP header: an image, but not one of the four
    ],
)
async def test_something_else_behind_a_png_name_is_refused(
    service: Service, content: bytes
) -> None:
    message = refusal(await stream_upload(service, content, "innocent.png", "image/png"), 400)
    assert message == "file: not a JPEG, PNG, GIF or WebP image"
    message = refusal(await base64_upload(service, f"data:image/png;base64,{b64(content)}"), 400)
    assert message == "base64_data: not a JPEG, PNG, GIF or WebP image"
    assert list((service.runtime.settings.files_dir).glob("uploads/**/*.png")) == []


async def test_a_decompression_bomb_is_refused_before_decoding(service: Service) -> None:
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 100
    message = refusal(await stream_upload(service, bomb, "tiny.png"), 400)
    assert "100000x100000" in message and "more than the" in message


async def test_a_truncated_image_is_refused_by_the_full_decode(service: Service) -> None:
    data = image_bytes("PNG", (200, 200), noise=True)
    message = refusal(await stream_upload(service, data[: len(data) // 2]), 400)
    assert message.startswith("file: could not decode PNG image")


@pytest.mark.parametrize(
    ("base64_data", "expected"),
    [
        ("!!!not base64!!!", "base64_data is not valid base64"),
        ("", "base64_data holds no data"),
        ("data:text/plain;base64,aGVsbG8=", "base64_data must be plain base64 or a 'data:image"),
        ("data:image/png,rawbytes", "base64_data must be plain base64 or a 'data:image"),
    ],
)
async def test_bad_base64_is_400(service: Service, base64_data: str, expected: str) -> None:
    assert refusal(await base64_upload(service, base64_data), 400).startswith(expected)


async def test_malformed_requests_are_400(service: Service) -> None:
    auth = service.auth()
    not_json = await service.client.post(
        "/api/common/upload/base64", content=b"{nope", headers=auth
    )
    assert refusal(not_json, 400) == "Request body is not valid JSON"
    no_data = await service.client.post("/api/common/upload/base64", json={}, headers=auth)
    assert refusal(no_data, 400) == "base64_data is required"
    no_file = await service.client.post(
        "/api/common/upload/stream", files={"other": ("a.png", b"x")}, headers=auth
    )
    assert refusal(no_file, 400).startswith("file is required")
    not_multipart = await service.client.post(
        "/api/common/upload/stream", content=image_bytes("PNG"), headers=auth
    )
    assert refusal(not_multipart, 400).startswith("Request body must be multipart/form-data")
    no_url = await service.client.post("/api/common/upload/url", json={}, headers=auth)
    assert refusal(no_url, 400) == "file_url is required"
    ftp = await url_upload(service, "ftp://example.com/a.png")
    assert refusal(ftp, 400).startswith("file_url is not allowed")


UPLOAD_PATHS = ["../x", "a/../../etc", "/abs", "a//b", "a/", "./a", "a\\b", "a\x00b", "a\nb"]
FILE_NAMES = ["../x.png", "a/b.png", "..", ".", "a\\b.png", "x\x00.png", "x\r\n.png", ""]


@pytest.mark.parametrize("upload_path", UPLOAD_PATHS)
async def test_an_upload_path_that_leaves_its_folder_is_400(
    service: Service, upload_path: str
) -> None:
    response = await base64_upload(service, b64(image_bytes("PNG")), upload_path=upload_path)
    assert refusal(response, 400).startswith("upload_path must")


@pytest.mark.parametrize("file_name", FILE_NAMES)
async def test_a_file_name_that_leaves_its_folder_is_400(service: Service, file_name: str) -> None:
    response = await base64_upload(service, b64(image_bytes("PNG")), file_name=file_name)
    assert refusal(response, 400).startswith("file_name must")


async def test_traversal_through_the_stream_and_url_uploads_is_400(service: Service) -> None:
    response = await stream_upload(service, image_bytes("PNG"), upload_path="../../outside")
    assert refusal(response, 400).startswith("upload_path must")
    response = await stream_upload(service, image_bytes("PNG"), file_name="../escape.png")
    assert refusal(response, 400).startswith("file_name must")
    response = await url_upload(service, "https://example.com/a.png", file_name="a/../../b.png")
    assert refusal(response, 400).startswith("file_name must")
    root = service.runtime.settings.data_dir
    assert not any(p.is_file() for p in root.parent.glob("outside/**/*"))
    assert not (root / "escape.png").exists()


# Size limits -----------------------------------------------------------------------


async def test_past_the_size_limits_is_413(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, max_stream_upload_bytes=20_000, max_base64_upload_bytes=10_000
    )
    big = image_bytes("PNG", (120, 120), noise=True)  # about 43 KB
    fits_stream = image_bytes("PNG", (64, 64), noise=True)  # about 12 KB
    async with run_service(settings, run_worker=False, in_process=True) as service:
        message = refusal(await stream_upload(service, big), 413)
        assert "20000 bytes" in message
        # Between the two limits: a stream upload takes it, a base64 upload does not.
        uploaded(await stream_upload(service, fits_stream))
        message = refusal(await base64_upload(service, b64(fits_stream)), 413)
        assert message == "base64_data holds more than 10000 bytes, the most allowed"
        served: list[str] = []
        async with serve_asgi(serve_images({"/big.png": big}, served)) as origin:
            message = refusal(await url_upload(service, f"{origin}/big.png"), 413)
        assert message == "file_url holds more than 20000 bytes, the most allowed"
    stored = list((settings.files_dir / "uploads").glob("**/*.png"))
    assert len(stored) == 1


async def test_a_stream_without_content_length_is_cut_off_past_the_limit(tmp_path: Path) -> None:
    """A chunked body has no length to refuse up front: the 413 comes while it is still
    being sent, long before its end."""
    settings = settings_for(tmp_path, max_stream_upload_bytes=20_000)
    boundary = "fluxserve-test-boundary"
    async with run_service(settings, run_worker=False) as service:
        host = service.url.removeprefix("http://")
        preamble = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="endless.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        request = (
            (
                "POST /api/common/upload/stream HTTP/1.1\r\n"
                f"Host: {host}\r\n"
                f"Authorization: Bearer {service.key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
                f"{len(preamble):x}\r\n"
            ).encode()
            + preamble
            + b"\r\n"
        )
        head, _, sent = await send_until_answered(service.url, request, chunked=True)
    assert head.startswith(b"HTTP/1.1 413 ")
    assert sent <= 1024 * 1024, f"the server took {sent} bytes before refusing"


async def test_a_declared_content_length_past_the_limit_is_refused_at_once(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, max_stream_upload_bytes=20_000)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        big = image_bytes("PNG", (150, 150), noise=True)
        response = await stream_upload(service, big)
        assert refusal(response, 413) == "file is larger than 20000 bytes, the most allowed"


# Private networks ---------------------------------------------------------------------


async def test_a_url_upload_of_a_private_address_is_refused(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, allow_private_networks=False)
    served: list[str] = []
    async with (
        run_service(settings, run_worker=False, in_process=True) as service,
        serve_asgi(serve_images({"/a.png": image_bytes("PNG")}, served)) as origin,
    ):
        message = refusal(await url_upload(service, f"{origin}/a.png"), 400)
        assert message.startswith("file_url is not allowed")
        assert "127.0.0.1" in message
        # fluxserve's own file URL is read from storage, not fetched: it works.
        first = uploaded(await base64_upload(service, b64(image_bytes("PNG"))))
        copy = uploaded(await url_upload(service, first["file_url"], upload_path="copies"))
    assert served == []
    assert copy["file_id"] != first["file_id"]
    assert copy["upload_path"] == "copies" and copy["file_size"] == first["file_size"]


# Use in a task -------------------------------------------------------------------------


async def test_an_uploaded_file_edits_with_private_networks_disallowed(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    settings = settings_for(tmp_path, allow_private_networks=False)
    async with run_service(settings, engine=tiny_engine, in_process=True) as service:
        reference = image_bytes("PNG", (128, 96))
        upload = uploaded(await stream_upload(service, reference, "ref.png"))
        response = await service.submit(
            {
                "model": "flux-2-pro-edit",
                "input": {
                    "prompt": "the same scene at night",
                    "size": "auto",
                    "image_urls": [upload["file_url"]],
                },
            }
        )
        assert response.status_code == 200, response.text
        data = await service.wait(response.json()["data"]["task_id"])
    assert data["status"] == "finished", data
    # size "auto" followed the uploaded reference's 4:3, so the engine saw its pixels.
    assert data["width"] / data["height"] == pytest.approx(4 / 3, rel=0.05)


async def test_a_result_url_is_read_from_storage_not_fetched(tmp_path: Path) -> None:
    # Nothing listens on port 9, and the guard refuses loopback: only storage can answer.
    storage = LocalStorage(tmp_path / "files", "http://127.0.0.1:9")
    policy = NetPolicy(allow_private_networks=False)
    key = "results/task-unified-1700000000-abcdefgh/image.png"
    await storage.put(key, image_bytes("PNG", (128, 96)), "image/png")
    limits = {"max_bytes": 1 << 20, "max_pixels": 1 << 20}
    async with guarded_client(policy) as client:
        [image] = await load_references(
            [storage.url(key)], client=client, policy=policy, storage=storage, **limits
        )
        assert image.size == (128, 96)
        with pytest.raises(UnsafeURLError, match="loopback"):
            await load_references([storage.url(key)], client=client, policy=policy, **limits)


async def test_a_reference_whose_upload_expired_fails_the_task_clearly(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    settings = settings_for(tmp_path, allow_private_networks=False)
    async with run_service(settings, engine=tiny_engine, in_process=True) as service:
        upload = uploaded(await stream_upload(service, image_bytes("PNG", (96, 96))))
        runtime = service.runtime
        await retention.sweep(runtime.store, runtime.storage, runtime.settings, now=_days(4))
        response = await service.submit(
            {
                "model": "flux-2-pro-edit",
                "input": {"prompt": "the same, in winter", "image_urls": [upload["file_url"]]},
            }
        )
        data = await service.wait(response.json()["data"]["task_id"])
    assert data["status"] == "failed"
    assert data["error_message"] == (
        f"image_urls[0]: {upload['file_url']}: the file is no longer stored "
        "(uploads and results expire)"
    )


# Retention ---------------------------------------------------------------------------


def _days(days: float) -> float:
    return time.time() + days * DAY


async def test_expired_uploads_are_deleted(service: Service) -> None:
    runtime = service.runtime
    upload = uploaded(await base64_upload(service, b64(image_bytes("PNG"))))
    record = await runtime.store.get_upload(upload["file_id"])
    assert record is not None and await runtime.storage.get(record.key) is not None

    early = await retention.sweep(runtime.store, runtime.storage, runtime.settings, now=_days(2))
    assert early.uploads == 0
    assert (await service.client.get(upload["file_url"])).status_code == 200

    swept = await retention.sweep(runtime.store, runtime.storage, runtime.settings, now=_days(4))
    assert swept.uploads == 1
    assert await runtime.storage.get(record.key) is None
    assert await runtime.store.get_upload(upload["file_id"]) is None
    gone = await service.client.get(upload["file_url"])
    assert gone.status_code == 404
    assert gone.json()["error"]["type"] == "not_found_error"


async def test_the_sweeper_loop_removes_expired_uploads(tmp_path: Path) -> None:
    # The sweeper runs every lease_seconds / 2.
    settings = settings_for(tmp_path, upload_retention=0.2, lease_seconds=0.4)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        upload = uploaded(await base64_upload(service, b64(image_bytes("PNG"))))
        async with asyncio.timeout(10):
            while True:
                answer = await service.client.get(upload["file_url"])
                record = await service.runtime.store.get_upload(upload["file_id"])
                if answer.status_code == 404 and record is None:
                    break
                await asyncio.sleep(0.05)


async def test_sweeps_running_at_once_agree(service: Service) -> None:
    runtime = service.runtime
    uploads = [uploaded(await base64_upload(service, b64(image_bytes("PNG")))) for _ in range(5)]
    results = await asyncio.gather(
        *(
            retention.sweep(runtime.store, runtime.storage, runtime.settings, now=_days(4))
            for _ in range(3)
        )
    )
    assert max(result.uploads for result in results) == 5
    for upload in uploads:
        assert (await service.client.get(upload["file_url"])).status_code == 404
    assert list((runtime.settings.files_dir / "uploads").glob("**/*.png")) == []


async def test_result_files_expire_after_result_retention(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    async with run_service(settings_for(tmp_path), engine=tiny_engine, in_process=True) as service:
        runtime = service.runtime
        response = await service.submit(
            {"model": "flux-2-pro", "input": {"prompt": "a quiet pond"}}
        )
        task_id = response.json()["data"]["task_id"]
        finished = await service.wait(task_id)
        assert finished["status"] == "finished"
        [file] = finished["files"]
        assert runtime.settings.result_retention == 30 * DAY  # the default

        # A week later the result is still there.
        kept = await retention.sweep(runtime.store, runtime.storage, runtime.settings, _days(7))
        assert kept.tasks == 0
        assert (await service.client.get(file["file_url"])).status_code == 200

        swept = await retention.sweep(runtime.store, runtime.storage, runtime.settings, _days(31))
        assert swept.tasks == 1
        assert (await service.client.get(file["file_url"])).status_code == 404
        assert isinstance(runtime.storage, LocalStorage)
        assert not list(runtime.storage.root.glob(f"results/{task_id}/*"))
        expired = (await service.status(task_id)).json()["data"]
    assert expired["files"] == []
    assert expired["files_expired"] is True
    assert {k: v for k, v in expired.items() if k not in ("files", "files_expired")} == {
        k: v for k, v in finished.items() if k != "files"
    }
    assert "files_expired" not in finished


async def test_results_are_kept_forever_when_asked(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, result_retention="forever")
    assert settings.result_retention is None
    async with run_service(settings, run_worker=False, in_process=True) as service:
        runtime = service.runtime
        response = await service.submit({"model": "flux-2-pro", "input": {"prompt": "a pond"}})
        task_id = response.json()["data"]["task_id"]
        # Finished as a worker would, without running an engine.
        claim = await runtime.store.claim_task(["flux-2-pro"], "test-worker", 30)
        assert claim is not None
        image = image_bytes("PNG")
        result = ResultFile(f"results/{task_id}/image.png", "image.png", "image/png", len(image))
        await runtime.storage.put(result.key, image, result.content_type)
        assert await runtime.store.finish_task(claim, Outcome("tiny", 1, 96, 80, [result]))

        swept = await retention.sweep(runtime.store, runtime.storage, runtime.settings, _days(999))
        assert swept.tasks == 0
        [file] = (await service.status(task_id)).json()["data"]["files"]
        assert (await service.client.get(file["file_url"])).content == image
