"""The wire contract, byte for byte: shapes, formats, the error envelope, each rule."""

from __future__ import annotations

import asyncio
import re
import string
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from fluxserve.tasks import new_task_id

from conftest import Service, make_settings, run_service

TASK_ID = re.compile(r"^task-unified-(\d+)-[a-z0-9]{8}$")
CREATED_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")
STATUS_KEYS = {
    "task_id",
    "status",
    "files",
    "created_time",
    "progress",
    "error_message",
    "credits_amount",
}

BODY: dict[str, Any] = {
    "model": "flux-2-pro",
    "callback_url": "https://your-domain.com/callback",
    "input": {
        "prompt": "The jar in image 1 is filled with capsules exactly same as image 2",
        "size": "1:1",
        "resolution": "1K",
    },
}
EDIT = {
    **BODY,
    "model": "flux-2-pro-edit",
    "input": {**BODY["input"], "image_urls": ["https://example.com/a.png"]},
}


@pytest.fixture
async def service(tmp_path: Any) -> AsyncIterator[Service]:
    # No worker: these tests look at the API alone, tasks stay queued.
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as svc:
        yield svc


def with_input(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, "input": {**base["input"], **changes}}


async def test_submit_answers_the_hosted_shape(service: Service) -> None:
    before = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    response = await service.submit(BODY)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "data"} and body["code"] == 200
    assert list(body["data"]) == ["task_id", "status", "created_time"]
    data = body["data"]
    assert data["status"] == "not_started"
    match = TASK_ID.match(data["task_id"])
    assert match, data["task_id"]
    assert CREATED_TIME.match(data["created_time"])
    created = datetime.strptime(data["created_time"], "%Y-%m-%dT%H:%M:%S")
    assert before <= created <= datetime.now(UTC).replace(tzinfo=None)
    assert abs(int(match.group(1)) - created.replace(tzinfo=UTC).timestamp()) <= 1


def test_task_ids_draw_every_character_at_every_place() -> None:
    ids = [new_task_id(1_700_000_000) for _ in range(5000)]
    assert all(TASK_ID.match(task_id) for task_id in ids)
    assert len(set(ids)) == len(ids)
    suffixes = [task_id.rsplit("-", 1)[1] for task_id in ids]
    for place in range(8):
        assert {suffix[place] for suffix in suffixes} == set(string.ascii_lowercase + string.digits)


async def test_status_of_a_queued_task(service: Service) -> None:
    task_id = (await service.submit(BODY)).json()["data"]["task_id"]
    response = await service.status(task_id)
    assert response.status_code == 200
    body = response.json()
    assert body["code"] == 200
    data = body["data"]
    assert set(data) >= STATUS_KEYS
    assert list(data)[:7] == [
        "task_id",
        "status",
        "files",
        "created_time",
        "progress",
        "error_message",
        "credits_amount",
    ]
    assert data["task_id"] == task_id
    assert data["status"] == "not_started"
    assert data["files"] == []
    assert data["progress"] == 0
    assert data["error_message"] is None
    assert data["credits_amount"] == 0
    assert data["model"] == "flux-2-pro"
    assert data["queue_position"] == 1
    second = (await service.submit(BODY)).json()["data"]["task_id"]
    assert (await service.status(second)).json()["data"]["queue_position"] == 2
    ready = (await service.client.get("/ready")).json()
    assert ready["queue"] == {"flux-2-pro": 2} and ready["workers"] == []


async def test_task_ids_are_unique(service: Service) -> None:
    ids = {(await service.submit(BODY)).json()["data"]["task_id"] for _ in range(20)}
    assert len(ids) == 20


BAD_BODIES = [
    (with_input(BODY, size="5:4"), "input.size must be one of 1:1, 4:3, 3:4, 16:9, 9:16"),
    (with_input(BODY, resolution="4K"), "input.resolution must be one of 1K, 2K"),
    (with_input(BODY, prompt="hi"), "input.prompt must be 3 to 5000 characters"),
    (with_input(BODY, prompt="x" * 5001), "input.prompt must be 3 to 5000 characters"),
    (with_input(BODY, prompt=42), "input.prompt: "),
    ({**BODY, "model": "flux-3"}, "model must be one of flux-2-pro, flux-2-pro-edit"),
    ({k: v for k, v in BODY.items() if k != "model"}, "model is required"),
    ({"model": "flux-2-pro"}, "input is required"),
    (
        with_input(BODY, image_urls=["https://example.com/a.png"]),
        "input.image_urls is only accepted by the edit models",
    ),
    ({**EDIT, "input": {**BODY["input"]}}, "input.image_urls is required for flux-2-pro-edit"),
    (with_input(EDIT, image_urls=[]), "input.image_urls is required for flux-2-pro-edit"),
    (
        with_input(EDIT, image_urls=[f"https://example.com/{i}.png" for i in range(9)]),
        "input.image_urls must hold at most 8 URLs",
    ),
    (
        with_input(EDIT, image_urls=["ftp://example.com/a.png"]),
        "input.image_urls[0] must be an http(s) or data:image URL",
    ),
    ({**BODY, "callback_url": "not a url"}, "callback_url must be an http(s) URL"),
    (
        {**BODY, "callback_url": "https://example.com/" + "a" * 2100},
        "callback_url must be at most 2048 characters",
    ),
    (
        {**BODY, "callback_events": ["finished", "done"]},
        "callback_events must be a non-empty list of running, progress, finished, failed "
        "(got 'done')",
    ),
    ({**BODY, "callback_events": []}, "callback_events must be a non-empty list of running"),
    ({**BODY, "callback_events": "finished"}, "callback_events: "),
    (
        {k: v for k, v in {**BODY, "callback_events": ["progress"]}.items() if k != "callback_url"},
        "callback_events needs a callback_url",
    ),
    (with_input(BODY, output_format="gif"), "input.output_format must be one of png, jpeg, webp"),
    (with_input(BODY, seed=-1), "input.seed: "),
    (with_input(BODY, seed="7"), "input.seed: "),
    (with_input(BODY, steps=8), "input.steps is only accepted by the flex models"),
    (with_input({**BODY, "model": "flux-2-flex"}, steps=51), "input.steps must be between 1"),
    (with_input({**BODY, "model": "flux-2-flex"}, guidance=11), "input.guidance must be between"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
async def test_each_rule_is_a_400_naming_the_field(
    service: Service, body: dict[str, Any], message: str
) -> None:
    response = await service.submit(body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(message), error["error"]["message"]


async def test_flex_accepts_steps_and_guidance(service: Service) -> None:
    body = with_input({**BODY, "model": "flux-2-flex"}, steps=8, guidance=3.5, seed=7)
    assert (await service.submit(body)).status_code == 200


async def test_a_body_that_is_not_json(service: Service) -> None:
    response = await service.client.post(
        "/api/generate/submit",
        content=b"{not json",
        headers={**service.auth(), "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Request body is not valid JSON"


async def test_a_body_that_is_not_an_object(service: Service) -> None:
    response = await service.client.post(
        "/api/generate/submit", json=[1, 2], headers=service.auth()
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Request body must be a JSON object"


async def test_a_private_callback_is_refused_when_private_networks_are_off(
    tmp_path: Any,
) -> None:
    settings = make_settings(tmp_path / "data", allow_private_networks=False)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        response = await service.submit({**BODY, "callback_url": "http://127.0.0.1:9/hook"})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("callback_url is not allowed")


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer nope"])
async def test_missing_or_unknown_key_is_401(service: Service, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for response in (
        await service.client.post("/api/generate/submit", json=BODY, headers=headers),
        await service.client.get("/api/generate/status/task-unified-1-abcdefgh", headers=headers),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


async def test_a_revoked_key_is_401_once_the_key_cache_ttl_has_passed(tmp_path: Any) -> None:
    settings = make_settings(tmp_path / "data", api_key_cache_ttl=0.2)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        secret = await service.new_key("soon revoked")
        assert (await service.submit(BODY, key=secret)).status_code == 200
        keys = await service.runtime.store.list_keys()
        revoked = next(k for k in keys if k.name == "soon revoked")
        # As `fluxserve keys revoke` does, from outside this process's cache.
        assert await service.runtime.store.revoke_key(revoked.key_id)
        await asyncio.sleep(0.25)
        response = await service.submit(BODY, key=secret)
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "API key has been revoked"


async def test_another_keys_task_is_403(service: Service) -> None:
    task_id = (await service.submit(BODY)).json()["data"]["task_id"]
    other = await service.new_key()
    response = await service.status(task_id, key=other)
    assert response.status_code == 403
    assert response.json() == {
        "code": 403,
        "error": {"message": "Task belongs to another user", "type": "permission_error"},
    }


async def test_an_unknown_task_is_404(service: Service) -> None:
    response = await service.status("task-unified-1757165031-uyujaw3d")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


async def test_an_unknown_route_is_404_in_the_envelope(service: Service) -> None:
    response = await service.client.get("/api/nothing", headers=service.auth())
    assert response.status_code == 404
    assert response.json()["code"] == 404


async def test_a_submitted_task_is_durable_before_the_answer(service: Service) -> None:
    task_id = (await service.submit(BODY)).json()["data"]["task_id"]
    stored = await service.runtime.store.get_task(task_id)
    assert stored is not None and stored.input.prompt == BODY["input"]["prompt"]
