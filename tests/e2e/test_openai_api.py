"""OpenAI's images API, driven by the official `openai` package against a real
fluxserve (uvicorn on 127.0.0.1, the tiny engine, a worker)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
import schemathesis
from PIL import Image
from pydantic import ValidationError

from fluxserve.accounts import create_account
from fluxserve.engines.base import Engine, GenerationRequest
from fluxserve.errors import EngineError, StoreUnavailable
from fluxserve.openai_images import OpenAIValueError, fluxserve_model, size_choice
from fluxserve.sizes import dimensions, size_ratio

from conftest import Paused, Service, make_settings, run_service, send_until_answered
from hooked_engine import Hooked

PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def client(service: Service, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key or service.key, base_url=f"{service.url}/v1")


def png(color: tuple[int, int, int], size: tuple[int, int] = (96, 80)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


async def task_data(service: Service, task_id: str, key: str | None = None) -> dict[str, Any]:
    response = await service.status(task_id, key)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def account_tasks(service: Service, key: str) -> list[dict[str, Any]]:
    response = await service.client.get("/api/generate/tasks", headers=service.auth(key))
    assert response.status_code == 200, response.text
    tasks: list[dict[str, Any]] = response.json()["data"]["tasks"]
    return tasks


@pytest.fixture
async def service(tmp_path: Path, tiny_engine: Engine) -> AsyncIterator[Service]:
    settings = make_settings(tmp_path / "data", prices={"flux-2-pro": {"1K": 5, "2K": 9}})
    async with run_service(settings, engine=tiny_engine) as svc:
        yield svc


async def paid_key(service: Service, email: str, credits: int) -> str:
    made = await create_account(service.runtime.store, email)
    await service.runtime.store.grant_credits(made.account_id, credits, "test")
    return await service.new_key(email, account=email)


async def test_generate_answers_base64_images_as_openai_does(service: Service) -> None:
    key = await paid_key(service, "b64@example.com", 100)
    async with client(service, key) as oai:
        raw = await oai.images.with_raw_response.generate(
            model="gpt-image-1", prompt=PROMPT, size="1024x1024"
        )
        answer = raw.parse()

    assert answer.data is not None and len(answer.data) == 1
    image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json or "")))
    assert image.format == "PNG"
    assert answer.size == f"{image.width}x{image.height}" and answer.output_format == "png"
    assert answer.data[0].url is None
    # The image is a task of the unified API, of the mapped model, charged once.
    task_id = (answer.data[0].model_extra or {})["task_id"]
    data = await task_data(service, task_id, key)
    assert (data["status"], data["model"], data["credits_amount"]) == ("finished", "flux-2-pro", 5)
    schema = schemathesis.openapi.from_dict((await service.client.get("/openapi.json")).json())
    schema["/v1/images/generations"]["POST"].validate_response(raw.http_response)


async def test_n_images_are_n_tasks_and_n_charges_with_url_answers(service: Service) -> None:
    key = await paid_key(service, "two@example.com", 100)
    async with client(service, key) as oai:
        answer = await oai.images.generate(
            prompt=PROMPT, n=2, response_format="url", output_format="jpeg", size="1920x1080"
        )

    assert answer.data is not None and len(answer.data) == 2
    task_ids = [(image.model_extra or {})["task_id"] for image in answer.data]
    assert len(set(task_ids)) == 2
    for image in answer.data:
        assert image.b64_json is None and image.url is not None
        fetched = await service.client.get(image.url)
        assert fetched.status_code == 200
        made = Image.open(io.BytesIO(fetched.content))
        assert made.format == "JPEG"
        # 1080 is no multiple of 16: made at fluxserve's 16:9, which the answer states.
        assert answer.size == f"{made.width}x{made.height}" == "1360x768"
    tasks = await account_tasks(service, key)
    assert sorted(task["task_id"] for task in tasks) == sorted(task_ids)
    assert [task["credits_amount"] for task in tasks] == [5, 5]
    balance = await service.client.get("/api/user/balance", headers=service.auth(key))
    assert balance.json()["data"]["credits_amount"] == 90


async def test_an_exact_size_is_made_exactly_and_priced_by_its_area(service: Service) -> None:
    key = await paid_key(service, "exact@example.com", 100)
    async with client(service, key) as oai:
        answer = await oai.images.generate(prompt=PROMPT, size="1536x1024")

    assert answer.data is not None and len(answer.data) == 1
    image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json or "")))
    assert (image.width, image.height) == (1536, 1024) and answer.size == "1536x1024"
    # 1.5 megapixels is past 1K's area: charged at 2K, as Black Forest Labs' wire charges.
    task_id = (answer.data[0].model_extra or {})["task_id"]
    assert (await task_data(service, task_id, key))["credits_amount"] == 9


async def test_edit_with_two_images_runs_the_edit_model_on_both(service: Service) -> None:
    key = await paid_key(service, "edit@example.com", 100)
    async with client(service, key) as oai:
        answer = await oai.images.edit(
            image=[("red.png", png((200, 30, 30))), ("blue.png", png((30, 30, 200)))],
            prompt="the two colours side by side",
            model="flux-2-pro",
        )

    assert answer.data is not None and len(answer.data) == 1
    task_id = (answer.data[0].model_extra or {})["task_id"]
    task = await service.runtime.store.get_task(task_id)
    assert task is not None and task.model == "flux-2-pro-edit"
    assert len(task.input.image_urls) == 2
    # Each reference is an upload of the account, served back as it was sent.
    for url, color in zip(task.input.image_urls, [(200, 30, 30), (30, 30, 200)], strict=True):
        stored = await service.client.get(url)
        assert Image.open(io.BytesIO(stored.content)).getpixel((0, 0)) == color
    image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json or "")))
    # size auto follows the first reference (96x80, 6:5): the nearest ratio fluxserve makes.
    assert image.width > image.height


async def test_a_bad_key_raises_authentication_error(service: Service) -> None:
    async with client(service, "fs_not_a_key") as oai:
        with pytest.raises(openai.AuthenticationError) as caught:
            await oai.images.generate(prompt=PROMPT)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"


async def test_bad_requests_raise_bad_request_error_naming_the_field(service: Service) -> None:
    async with client(service) as oai:
        with pytest.raises(openai.BadRequestError) as caught:
            await oai.images.generate(prompt=PROMPT, size="1000x100")
        assert caught.value.param == "size" and "aspect ratio" in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            await oai.images.generate(prompt=PROMPT, model="not-a-model")
        assert caught.value.param == "model"
        with pytest.raises(openai.BadRequestError) as caught:
            await oai.images.generate(prompt=PROMPT, n=11)
        assert caught.value.param == "n"
        with pytest.raises(openai.BadRequestError) as caught:
            await oai.images.edit(image=("notes.txt", b"not an image"), prompt=PROMPT)
        assert caught.value.param == "image"
    assert await account_tasks(service, service.key) == []


async def test_credits_short_of_n_images_raise_the_quota_error_and_queue_nothing(
    service: Service,
) -> None:
    key = await paid_key(service, "short@example.com", 7)  # one image's worth, not two
    async with client(service, key) as oai:
        with pytest.raises(openai.RateLimitError) as caught:
            await oai.images.generate(prompt=PROMPT, n=2)
    assert caught.value.code == "insufficient_quota"
    assert "2 tasks cost 10 credits together; the account has 7 available" in caught.value.message
    # Refused whole: not even the image that fitted was queued.
    assert await account_tasks(service, key) == []
    balance = await service.client.get("/api/user/balance", headers=service.auth(key))
    assert balance.json()["data"]["credits_amount"] == 7


async def test_the_database_lost_once_images_are_queued_is_not_retried_by_the_sdk(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK sends a 503 again unless told not to: each time, its images would be
    queued (and charged) once more, beside the first ones still being made."""

    async def database_away(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("connection lost")

    key = await paid_key(service, "lost@example.com", 100)
    # The images are made; reading their tasks once they have ended fails.
    monkeypatch.setattr(service.runtime.service, "get", database_away)
    async with client(service, key) as oai:
        with pytest.raises(openai.InternalServerError) as caught:
            await oai.images.generate(prompt=PROMPT, n=2)
    error = caught.value
    assert error.status_code == 503
    # Sent once: its two images were queued once.
    tasks = await account_tasks(service, key)
    assert len(tasks) == 2
    # The answer names them, to be read through the unified API.
    assert isinstance(error.body, dict)
    assert sorted(error.body["task_ids"]) == sorted(task["task_id"] for task in tasks)
    assert all(task["task_id"] in error.message for task in tasks)


async def test_a_wait_that_runs_out_names_the_tasks_which_go_on(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    engine = Paused(tiny_engine)
    settings = make_settings(tmp_path / "data", openai_wait=1)
    async with run_service(settings, engine=engine) as service, client(service) as oai:
        with pytest.raises(openai.InternalServerError) as caught:
            await oai.images.generate(prompt=PROMPT, n=2)
        error = caught.value
        assert error.status_code == 504 and error.code == "timeout"
        assert isinstance(error.body, dict)
        task_ids = error.body["task_ids"]
        assert len(task_ids) == 2 and all(task_id in error.message for task_id in task_ids)
        # Not retried by the SDK: the request queued its two tasks once.
        assert len(await account_tasks(service, service.key)) == 2
        engine.go.set()
        for task_id in task_ids:
            assert (await service.wait(task_id))["status"] == "finished"


def fail_every_task(_requests: Sequence[GenerationRequest], done: int, _total: int) -> None:
    if done == 1:
        raise EngineError("the sampler diverged at step 1")


async def test_images_that_all_failed_are_not_queued_again_by_the_sdk(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    """The SDK sends a 500 again unless told not to: each time, its images would be
    queued (and fail) once more."""
    engine = Hooked(tiny_engine, fail_every_task)
    async with run_service(make_settings(tmp_path / "data"), engine=engine) as service:
        async with client(service) as oai:
            with pytest.raises(openai.InternalServerError) as caught:
                await oai.images.generate(prompt=PROMPT, n=2)
        assert caught.value.status_code == 500 and caught.value.code == "generation_failed"
        assert "the sampler diverged at step 1" in caught.value.message
        tasks = await account_tasks(service, service.key)
        assert len(tasks) == 2 and {task["status"] for task in tasks} == {"failed"}


async def test_the_guard_answers_openai_routes_in_openai_shape(service: Service) -> None:
    response = await service.client.post("/v1/images/generations", json={"prompt": PROMPT})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    length = service.runtime.settings.max_body_bytes + 1
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {service.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    answer_head, body, _ = await send_until_answered(service.url, head, chunked=False)
    assert answer_head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "request_too_large"


async def test_edit_images_fit_the_upload_allowance_each(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    """Several images, each under the stream upload limit, pass; a larger one is a 413."""
    # Its byte size sets the limit; its pixels do not matter, and few keep the edit quick.
    big = png((10, 120, 60))
    settings = make_settings(tmp_path / "data", max_stream_upload_bytes=len(big) + 1)
    async with run_service(settings, engine=tiny_engine) as service, client(service) as oai:
        answer = await oai.images.edit(
            image=[("a.png", big), ("b.png", big), ("c.png", big)], prompt=PROMPT, size="1024x1024"
        )
        assert answer.data is not None and len(answer.data) == 1
        with pytest.raises(openai.APIStatusError) as caught:
            await oai.images.edit(image=("huge.png", big + bytes(2)), prompt=PROMPT)
        assert caught.value.status_code == 413 and caught.value.param == "image"


async def test_unreadable_requests_are_400s_in_openai_shape(tmp_path: Path) -> None:
    async with run_service(make_settings(tmp_path / "data"), run_worker=False) as service:
        post, auth = service.client.post, service.auth()
        answers = {
            "not json": await post(
                "/v1/images/generations",
                content=b"{not json",
                headers={**auth, "Content-Type": "application/json"},
            ),
            "no prompt": await post("/v1/images/generations", json={"n": 1}, headers=auth),
            "blank prompt": await post(
                "/v1/images/generations", json={"prompt": "   a  "}, headers=auth
            ),
            "transparent": await post(
                "/v1/images/generations",
                json={"prompt": PROMPT, "background": "transparent"},
                headers=auth,
            ),
            "stream": await post(
                "/v1/images/generations", json={"prompt": PROMPT, "stream": True}, headers=auth
            ),
            "edit as json": await post("/v1/images/edits", json={"prompt": PROMPT}, headers=auth),
            "edit without image": await post(
                "/v1/images/edits", data={"prompt": PROMPT}, files={"x": b""}, headers=auth
            ),
            "edit with a mask": await post(
                "/v1/images/edits",
                data={"prompt": PROMPT},
                files=[("image", ("a.png", png((1, 2, 3)))), ("mask", ("m.png", png((0, 0, 0))))],
                headers=auth,
            ),
            "edit with n as text": await post(
                "/v1/images/edits",
                data={"prompt": PROMPT, "n": "two"},
                files={"image": ("a.png", png((1, 2, 3)))},
                headers=auth,
            ),
        }
        params = {name: response.json()["error"]["param"] for name, response in answers.items()}
        assert {response.status_code for response in answers.values()} == {400}
        assert params == {
            "not json": None,
            "no prompt": "prompt",
            "blank prompt": "prompt",
            "transparent": "background",
            "stream": "stream",
            "edit as json": None,
            "edit without image": "image",
            "edit with a mask": "mask",
            "edit with n as text": "n",
        }
        # Nothing was queued, and no image was kept.
        assert await account_tasks(service, service.key) == []
        assert not (service.runtime.settings.files_dir / "uploads").exists()


async def test_generate_on_postgresql(
    tmp_path: Path, tiny_engine: Engine, postgres_url: str
) -> None:
    """The wait is woken by PostgreSQL's notifications of task changes, as streams are."""
    settings = make_settings(tmp_path / "data", database_url=postgres_url)
    async with run_service(settings, engine=tiny_engine) as service, client(service) as oai:
        answer = await oai.images.generate(prompt=PROMPT, size="1792x1024", output_format="webp")
        assert answer.data is not None and len(answer.data) == 1
        image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json or "")))
        assert image.format == "WEBP" and answer.size == f"{image.width}x{image.height}"
        task_id = (answer.data[0].model_extra or {})["task_id"]
        assert (await task_data(service, task_id))["status"] == "finished"


@pytest.mark.parametrize(
    ("asked", "made"),
    [
        ("1024x1024", (1024, 1024)),
        ("512x512", (512, 512)),
        ("256x256", (256, 256)),
        ("1536x1024", (1536, 1024)),
        ("1024x1536", (1024, 1536)),
        ("1792x1024", (1792, 1024)),
        ("1024x1792", (1024, 1792)),
        ("2048x2048", (2048, 2048)),
        ("1920x1080", (1360, 768)),
        ("1000x1000", (1024, 1024)),
        ("3840x2160", (2704, 1520)),
        ("4096x1024", (4096, 1024)),
    ],
)
def test_each_openai_size_is_made_as_docs_openai_api_md_says(
    asked: str, made: tuple[int, int]
) -> None:
    choice = size_choice(asked)
    if choice.width is not None and choice.height is not None:
        assert (choice.size, choice.width, choice.height) == ("auto", *made)
    else:
        assert dimensions(size_ratio(choice.size), choice.resolution) == made
    assert f"`{asked}`" in (Path(__file__).parents[2] / "docs" / "openai-api.md").read_text()


def test_model_names_map_to_fluxserve_models() -> None:
    settings = make_settings(Path("unused"), openai_models={"house-style": "flux-2-flex"})
    table, default = settings.openai_models, settings.openai_default_model
    assert fluxserve_model(None, table, default, edit=False) == "flux-2-pro"
    assert fluxserve_model("house-style", table, default, edit=True) == "flux-2-flex-edit"
    assert fluxserve_model("flux-2-flex-edit", table, default, edit=False) == "flux-2-flex"
    with pytest.raises(OpenAIValueError, match="house-style"):
        fluxserve_model("dall-e-3", table, default, edit=False)  # the table was replaced
    with pytest.raises(ValidationError, match="unknown model 'flux-9'"):
        make_settings(Path("unused"), openai_models={"x": "flux-9"})
