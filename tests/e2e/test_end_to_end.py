"""The whole path through a real server: submit, progress, file, callback."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.engines.base import Engine, GenerationRequest
from fluxserve.errors import EngineError

from conftest import Receiver, Service, make_settings, metric_samples, run_service, serve_asgi
from hooked_engine import Hooked

PROMPT = "A lighthouse on a cliff at dawn, oil painting"


def body(model: str = "flux-2-pro", callback: str | None = None, **inputs: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"model": model, "input": {"prompt": PROMPT, **inputs}}
    if callback:
        data["callback_url"] = callback
    return data


@pytest.fixture
async def service(tmp_path: Path, tiny_engine: Engine) -> AsyncIterator[Service]:
    async with run_service(make_settings(tmp_path / "data"), engine=tiny_engine) as svc:
        yield svc


async def download(service: Service, data: dict[str, Any]) -> tuple[Image.Image, bytes]:
    [file] = data["files"]
    response = await service.client.get(file["file_url"])
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content)), response.content


async def test_generate_watch_progress_download_and_get_the_callback(service: Service) -> None:
    receiver = Receiver()
    async with serve_asgi(receiver.app()) as hook_url:
        response = await service.submit(
            body(callback=f"{hook_url}/hook", size="1:1", resolution="1K", seed=42)
        )
        task_id = response.json()["data"]["task_id"]
        seen: list[tuple[str, int]] = []
        while not seen or seen[-1][0] not in ("finished", "failed"):
            data = (await service.status(task_id)).json()["data"]
            seen.append((data["status"], data["progress"]))
        await receiver.wait_for(1)

    assert data["status"] == "finished", data
    progress = [p for _, p in seen]
    assert progress == sorted(progress), "progress never goes back"
    assert any(0 < p < 100 for s, p in seen if s == "running"), seen
    assert data["progress"] == 100 and data["error_message"] is None
    assert data["engine"] == "tiny" and data["seed"] == 42
    [file] = data["files"]
    assert file["file_url"].startswith(service.url + "/files/")
    assert file["file_type"] == "image" and file["content_type"] == "image/png"
    image, content = await download(service, data)
    assert image.format == "PNG" and image.size == (1024, 1024)
    assert file["file_size"] == len(content)

    final = (await service.status(task_id)).json()
    assert receiver.bodies == [final]
    assert receiver.headers[0]["webhook-id"].startswith("evt_")


@pytest.mark.parametrize(
    ("size", "resolution", "output_format", "pixels", "pil_format"),
    [
        ("16:9", "1K", "jpeg", (1360, 768), "JPEG"),
        ("9:16", "1K", "webp", (768, 1360), "WEBP"),
        ("3:2", "1K", "png", (1248, 832), "PNG"),
        ("1:1", "2K", "png", (2048, 2048), "PNG"),
    ],
)
async def test_the_file_has_the_asked_pixel_size(
    service: Service,
    size: str,
    resolution: str,
    output_format: str,
    pixels: tuple[int, int],
    pil_format: str,
) -> None:
    response = await service.submit(
        body(size=size, resolution=resolution, output_format=output_format)
    )
    data = await service.wait(response.json()["data"]["task_id"])
    assert data["status"] == "finished", data
    assert (data["width"], data["height"]) == pixels
    image, _ = await download(service, data)
    assert image.size == pixels and image.format == pil_format


def png(width: int, height: int, color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_edit_with_reference_images_from_a_local_server(service: Service) -> None:
    served: list[str] = []

    async def image(request: Any) -> Response:
        served.append(request.url.path)
        # 16:9, small: the references' pixels cost the engine, their ratio is what counts.
        return Response(png(320, 180, "red"), media_type="image/png")

    refs = Starlette(routes=[Route("/{name}.png", image)])
    data_url = "data:image/png;base64," + base64.b64encode(png(300, 300, "blue")).decode()
    async with serve_asgi(refs) as refs_url:
        response = await service.submit(
            body(
                "flux-2-pro-edit",
                size="auto",
                image_urls=[f"{refs_url}/first.png", data_url, f"{refs_url}/third.png"],
            )
        )
        data = await service.wait(response.json()["data"]["task_id"])
    assert data["status"] == "finished", data
    assert sorted(served) == ["/first.png", "/third.png"]
    # size "auto" follows the first reference's 16:9.
    assert (data["width"], data["height"]) == (1360, 768)
    image, _ = await download(service, data)
    assert image.size == (1360, 768)


async def test_an_unreachable_reference_fails_the_task_readably(service: Service) -> None:
    async def missing(_: Any) -> Response:
        return Response(status_code=404)

    async with serve_asgi(Starlette(routes=[Route("/gone.png", missing)])) as refs_url:
        response = await service.submit(
            body("flux-2-flex-edit", image_urls=[f"{refs_url}/gone.png"])
        )
        data = await service.wait(response.json()["data"]["task_id"])
    assert data["status"] == "failed"
    assert data["files"] == []
    assert "image_urls[0]" in data["error_message"] and "404" in data["error_message"]


class Panic(BaseException):
    """What a library written in Rust raises when it panics: not an Exception."""


def explode(requests: Sequence[GenerationRequest], done: int, _: int) -> None:
    """Raise, after step 2's progress, the failure the prompt names, if it names one."""
    prompt = requests[0].prompt
    if done == 2 and "engine error" in prompt:
        raise EngineError("the sampler diverged at step 2")
    if done == 2 and "bug" in prompt:
        raise ZeroDivisionError("division by zero")
    if done == 2 and "panic" in prompt:
        raise Panic("called `Option::unwrap()` on a `None` value")


async def test_an_engine_error_fails_that_task_and_the_next_one_runs(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    settings = make_settings(tmp_path / "data")
    receiver = Receiver()
    async with (
        serve_asgi(receiver.app()) as hook_url,
        run_service(settings, engine=Hooked(tiny_engine, explode, after_report=True)) as service,
    ):
        hook = f"{hook_url}/hook"
        ids = []
        prompts = ("an engine error please", "a bug please", "a panic please", "a calm sea")
        for prompt in prompts:
            response = await service.submit(
                {"model": "flux-2-pro", "callback_url": hook, "input": {"prompt": prompt}}
            )
            ids.append(response.json()["data"]["task_id"])
        results = [await service.wait(task_id) for task_id in ids]
        await receiver.wait_for(4)
        ready = await service.client.get("/ready")

    assert [r["status"] for r in results] == ["failed", "failed", "failed", "finished"]
    assert results[0]["error_message"] == "the sampler diverged at step 2"
    assert results[1]["error_message"] == "Internal error: ZeroDivisionError: division by zero"
    assert results[2]["error_message"] == (
        "Internal error: Panic: called `Option::unwrap()` on a `None` value"
    )
    assert ready.status_code == 200
    assert results[0]["files"] == [] and results[0]["credits_amount"] == 0
    assert sorted(b["data"]["task_id"] for b in receiver.bodies) == sorted(ids)


async def test_the_same_seed_gives_the_same_pixels(service: Service) -> None:
    contents = []
    for _ in range(2):
        response = await service.submit(body(seed=1234, size="1:1"))
        data = await service.wait(response.json()["data"]["task_id"])
        contents.append((await download(service, data))[0].tobytes())
    assert contents[0] == contents[1]


async def test_files_outside_the_store_are_not_served(service: Service) -> None:
    for path in ("/files/../fluxserve.db", "/files/%2e%2e/fluxserve.db", "/files/nothing.png"):
        response = await service.client.get(path)
        assert response.status_code == 404
        assert response.json()["code"] == 404


async def test_health_reports_the_ready_worker(service: Service) -> None:
    response = await service.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "worker": {"state": "ready", "engine": "tiny", "error": None},
    }


async def test_ready_and_metrics_show_the_queue_and_the_live_workers(service: Service) -> None:
    response = await service.client.get("/ready")
    assert response.status_code == 200
    ready = response.json()
    assert ready["status"] == "ready" and ready["reasons"] == []
    assert ready["worker"] == {"state": "ready", "engine": "tiny", "error": None}
    [worker] = ready["workers"]
    assert worker["state"] == "ready" and worker["engine"] == "tiny"
    assert worker["worker_id"] == service.runtime.worker.worker_id  # type: ignore[union-attr]
    assert ready["queue"] == {}
    assert ready["schema"]["database"] == ready["schema"]["code"] is not None
    metrics = metric_samples((await service.client.get("/metrics")).text)
    assert metrics["fluxserve_workers_alive"] == 1
    assert metrics['fluxserve_queue_depth{model="flux-2-pro"}'] == 0
