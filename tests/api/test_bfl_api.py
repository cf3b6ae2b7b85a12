"""Black Forest Labs' wire: BFL-API code submits, polls and takes webhooks from
fluxserve, on the same queue and accounts as the unified API (docs/bfl-api.md)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import os
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.accounts import create_account
from fluxserve.engines.base import Engine
from fluxserve.settings import Settings
from fluxserve.tasks import MODELS

from conftest import (
    Receiver,
    Service,
    fresh_postgres_database,
    make_settings,
    run_service,
    serve_asgi,
    settled_log,
)

PROMPT = "a lighthouse on a cliff at dusk"


def in_process(
    settings: Settings, engine: Engine | None = None, models: Sequence[str] = MODELS
) -> AbstractAsyncContextManager[Service]:
    """fluxserve in this process, its worker running when an engine is given."""
    return run_service(
        settings, engine=engine, run_worker=engine is not None, models=models, in_process=True
    )


def x_key(service: Service, key: str | None = None) -> dict[str, str]:
    return {"x-key": key or service.key}


async def post(
    service: Service, path: str, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    return await service.client.post(f"/v1/{path}", json=body, headers=x_key(service, key))


async def poll(service: Service, polling_url: str, within: float = 120) -> dict[str, Any]:
    """GET the polling_url as BFL's examples do, until the status is final."""
    async with asyncio.timeout(within):
        while True:
            answer = (await service.client.get(polling_url, headers=x_key(service))).json()
            if answer["status"] not in ("Pending",):
                return answer
            assert 0 <= answer["progress"] <= 1
            await asyncio.sleep(0.05)


def png(size: tuple[int, int] = (96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_server(data: bytes) -> Starlette:
    async def serve(_: Request) -> Response:
        return Response(data, media_type="image/png")

    return Starlette(routes=[Route("/ref.png", serve)])


def bfl_verify(payload: bytes, signature: str | None, secret: str) -> bool:
    """BFL's documented check of X-BFL-Signature, as a receiver writes it."""
    if not signature or not signature.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature[7:])


async def unified_status(service: Service, task_id: str, key: str | None = None) -> dict[str, Any]:
    response = await service.status(task_id, key)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_a_submit_polls_to_ready_and_the_unified_api_sees_the_same_task(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    async with in_process(make_settings(tmp_path / "data"), tiny_engine) as service:
        body = {"prompt": PROMPT, "width": 256, "height": 192, "seed": 42}
        submitted = await post(service, "flux-2-pro", body)
        assert submitted.status_code == 200, submitted.text
        answer = submitted.json()
        task_id = answer["id"]
        assert answer["polling_url"] == f"{service.url}/v1/get_result?id={task_id}"
        assert answer["output_mp"] == pytest.approx(256 * 192 / 1e6)

        ready = await poll(service, answer["polling_url"])
        assert ready["status"] == "Ready" and ready["id"] == task_id
        assert ready["progress"] == 1.0
        result = ready["result"]
        assert (result["seed"], result["prompt"]) == (42, PROMPT)
        assert result["end_time"] >= result["start_time"] and result["duration"] >= 0
        image = await service.client.get(result["sample"])
        assert image.status_code == 200
        # BFL's default output format is JPEG, at the size asked for.
        with Image.open(io.BytesIO(image.content)) as decoded:
            assert (decoded.format, decoded.size) == ("JPEG", (256, 192))

        unified = await unified_status(service, task_id)
        assert unified["status"] == "finished" and unified["model"] == "flux-2-pro"
        assert (unified["width"], unified["height"], unified["seed"]) == (256, 192, 42)
        assert unified["files"][0]["file_url"] == result["sample"]
        history = await service.client.get("/api/generate/tasks", headers=service.auth())
        assert [t["task_id"] for t in history.json()["data"]["tasks"]] == [task_id]


async def test_edits_take_base64_and_url_input_images(tmp_path: Path, tiny_engine: Engine) -> None:
    reference = png((96, 64))
    async with (
        serve_asgi(image_server(png((64, 96)))) as images,
        in_process(make_settings(tmp_path / "data"), tiny_engine) as service,
    ):
        as_base64 = await post(
            service,
            "flux-2-pro",
            {"prompt": PROMPT, "input_image": base64.b64encode(reference).decode()},
        )
        as_url = await post(
            service,
            "flux-2-flex",
            {"prompt": PROMPT, "input_image": f"{images}/ref.png", "steps": 2, "guidance": 3.5},
        )
        for submitted, model, shape in (
            (as_base64, "flux-2-pro-edit", "landscape"),
            (as_url, "flux-2-flex-edit", "portrait"),
        ):
            assert submitted.status_code == 200, submitted.text
            ready = await poll(service, submitted.json()["polling_url"])
            assert ready["status"] == "Ready", ready
            unified = await unified_status(service, submitted.json()["id"])
            assert unified["model"] == model
            # No width/height: the output follows the first image's shape.
            landscape = unified["width"] > unified["height"]
            assert landscape == (shape == "landscape")


@pytest.mark.parametrize(
    ("size", "field", "kind"),
    [
        ({"width": 500, "height": 512}, "width", "multiple_of"),
        ({"width": 512, "height": 48}, "height", "greater_than_equal"),
        ({"width": 4112, "height": 512}, "width", "less_than_equal"),
        ({"width": 512, "height": "tall"}, "height", "int_type"),
    ],
)
async def test_a_bad_size_is_422_with_fastapi_detail(
    tmp_path: Path, size: dict[str, Any], field: str, kind: str
) -> None:
    async with in_process(make_settings(tmp_path / "data")) as service:
        refused = await post(service, "flux-2-pro", {"prompt": PROMPT, **size})
        assert refused.status_code == 422
        assert [(d["loc"], d["type"]) for d in refused.json()["detail"]] == [
            (["body", field], kind)
        ]
        history = await service.client.get("/api/generate/tasks", headers=service.auth())
        assert history.json()["data"]["tasks"] == []


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        # Past the 4300 digits Python converts: out of range, as 1e400 is.
        (
            b'{"prompt": "%s", "seed": %s}' % (PROMPT.encode(), b"9" * 5000),
            ["body", "seed"],
            "int_type",
        ),
        (
            b'{"prompt": "%s", "width": -%s}' % (PROMPT.encode(), b"9" * 5000),
            ["body", "width"],
            "int_type",
        ),
        # Not UTF-8, or nested past any parser's depth: malformed JSON.
        (b'{"prompt": "\xff\xfe"}', ["body", 0], "json_invalid"),
        (b"[" * 100_000, ["body", 0], "json_invalid"),
    ],
)
async def test_a_body_that_cannot_be_read_as_valid_json_is_422_naming_what_is_wrong(
    tmp_path: Path, body: bytes, loc: list[Any], kind: str
) -> None:
    """The docs promise FastAPI's 422 for every body that does not validate, not its
    400 "error parsing the body" for JSON that Python's parser gives up on."""
    async with in_process(make_settings(tmp_path / "data")) as service:
        refused = await service.client.post(
            "/v1/flux-2-pro",
            content=body,
            headers={**x_key(service), "Content-Type": "application/json"},
        )
        assert refused.status_code == 422, refused.text
        assert [(d["loc"], d["type"]) for d in refused.json()["detail"]] == [(loc, kind)]


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("flux-2-pro", {"width": 2048, "height": 2064}, "at most 4194304 pixels"),
        ("flux-2-max", {"width": 512}, "width and height must be given together"),
        (
            "flux-2-klein-4b",
            {f"input_image_{n}": "https://example.com/a.png" for n in range(2, 7)},
            "at most 4 input images",
        ),
    ],
)
async def test_rules_between_fields_are_422(
    tmp_path: Path, path: str, body: dict[str, Any], says: str
) -> None:
    async with in_process(make_settings(tmp_path / "data")) as service:
        refused = await post(service, path, {"prompt": PROMPT, **body})
        assert refused.status_code == 422
        assert says in refused.json()["detail"][0]["msg"]


async def test_an_unusable_input_image_is_named_by_its_bfl_field(tmp_path: Path) -> None:
    async with in_process(make_settings(tmp_path / "data")) as service:
        not_an_image = base64.b64encode(b"just some text").decode()
        refused = await post(
            service, "flux-2-pro", {"prompt": PROMPT, "input_image_2": not_an_image}
        )
        assert refused.status_code == 400
        assert refused.json()["detail"].startswith("input_image_2")
        wrong_scheme = await post(
            service, "flux-2-pro", {"prompt": PROMPT, "input_image": "ftp://example.com/a.png"}
        )
        assert wrong_scheme.status_code == 422
        assert wrong_scheme.json()["detail"][0]["loc"] == ["body", "input_image"]


@pytest.mark.parametrize(
    "webhook_url", ["http://example.com/hook", "https://127.0.0.1/hook", "https://10.0.0.7/hook"]
)
async def test_a_webhook_url_the_net_guard_refuses_is_named_as_sent(
    tmp_path: Path, webhook_url: str
) -> None:
    """https only, and no private address: refused naming `webhook_url`, the field the
    request holds (the unified API names its own `callback_url`)."""
    settings = make_settings(tmp_path / "data", allow_private_networks=False)
    async with in_process(settings) as service:
        refused = await post(service, "flux-2-pro", {"prompt": PROMPT, "webhook_url": webhook_url})
        assert refused.status_code == 400
        assert refused.json()["detail"].startswith("webhook_url is not allowed: ")


async def test_a_missing_or_bad_key_is_401_in_bfl_shape(tmp_path: Path) -> None:
    async with in_process(make_settings(tmp_path / "data")) as service:
        client = service.client
        missing = await client.post("/v1/flux-2-pro", json={"prompt": PROMPT})
        wrong = await client.post(
            "/v1/flux-2-pro", json={"prompt": PROMPT}, headers={"x-key": "not-a-key"}
        )
        poll_wrong = await client.get("/v1/get_result?id=x", headers={"x-key": "not-a-key"})
        for refused in (missing, wrong, poll_wrong):
            assert refused.status_code == 401
            assert isinstance(refused.json()["detail"], str)
        # The unified API's own routes accept the same key as x-key.
        assert (await client.get("/api/user/balance", headers=x_key(service))).status_code == 200


async def test_an_unknown_or_anothers_id_is_task_not_found(tmp_path: Path) -> None:
    async with in_process(make_settings(tmp_path / "data")) as service:
        mine = (await post(service, "flux-2-pro", {"prompt": PROMPT})).json()["id"]
        other = await service.new_key("other")
        for task_id, key in (("task-unified-0-nothing1", None), (mine, other)):
            answer = await service.client.get(
                "/v1/get_result", params={"id": task_id}, headers=x_key(service, key)
            )
            assert answer.status_code == 404
            assert answer.json()["status"] == "Task not found"
            assert answer.json()["id"] == task_id


async def test_a_unified_task_polls_and_a_cancelled_one_is_error(tmp_path: Path) -> None:
    async with in_process(make_settings(tmp_path / "data")) as service:
        body = {"model": "flux-2-flex", "input": {"prompt": PROMPT}}
        task_id = (await service.submit(body)).json()["data"]["task_id"]
        seen = await service.client.get(f"/v1/get_result?id={task_id}", headers=x_key(service))
        assert seen.json()["status"] == "Pending" and seen.json()["progress"] == 0
        cancel = f"/api/generate/cancel/{task_id}"
        assert (await service.client.post(cancel, headers=service.auth())).status_code == 200
        ended = (
            await service.client.get(f"/v1/get_result?id={task_id}", headers=x_key(service))
        ).json()
        assert ended["status"] == "Error" and ended["result"] is None
        assert "cancelled" in ended["details"]["error"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_model_of_each_path_is_a_setting_and_credits_are_charged_as_its_task(
    tmp_path: Path, backend: str
) -> None:
    async with AsyncExitStack() as stack:
        url = None
        if backend == "postgresql":
            url = await stack.enter_async_context(fresh_postgres_database())
        settings = make_settings(
            tmp_path / "data",
            database_url=url,
            bfl_models={"flux-2-max": {"generate": "flux-2-flex", "edit": "flux-2-flex-edit"}},
            prices={"flux-2-flex": {"1K": 4, "2K": 9}, "flux-2-pro": {"1K": 3, "2K": 7}},
        )
        service = await stack.enter_async_context(in_process(settings))
        made = await create_account(service.runtime.store, "bfl@example.com")
        await service.runtime.store.grant_credits(made.account_id, 12, "test")
        key = await service.new_key("paying", account="bfl@example.com")
        small = await post(service, "flux-2-max", {"prompt": PROMPT}, key)
        large_size = {"width": 1536, "height": 1024}
        large = await post(service, "flux-2-klein-9b", {"prompt": PROMPT, **large_size}, key)
        # Each costs what the same fluxserve task costs: flex at 1K, pro at 2K.
        assert (small.json()["cost"], large.json()["cost"]) == (4.0, 7.0)
        assert (await unified_status(service, small.json()["id"], key))["model"] == "flux-2-flex"
        broke = await post(service, "flux-2-pro", {"prompt": PROMPT}, key)
        assert broke.status_code == 402 and "credits" in broke.json()["detail"]
        balance = await service.client.get("/api/user/balance", headers=x_key(service, key))
        assert balance.json()["data"]["held_credits"] == 11


async def test_a_webhook_arrives_in_bfl_shape_signed_with_the_webhook_secret(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    receiver = Receiver()
    secret = "my-webhook-secret"
    async with (
        serve_asgi(receiver.app()) as hooks,
        in_process(make_settings(tmp_path / "data"), tiny_engine) as service,
    ):
        body = {
            "prompt": PROMPT,
            "width": 128,
            "height": 128,
            "webhook_url": f"{hooks}/hook",
            "webhook_secret": secret,
        }
        task_id = (await post(service, "flux-2-pro", body)).json()["id"]
        await receiver.wait_for(1)
        sent = receiver.bodies[0]
        assert sent["id"] == task_id and sent["status"] == "Ready"
        assert sent["result"]["sample"].startswith(f"{service.url}/files/")
        assert sent["timestamp"].endswith("Z")
        signature = receiver.headers[0].get("x-bfl-signature")
        assert bfl_verify(receiver.raw[0], signature, secret)
        assert not bfl_verify(receiver.raw[0], signature, "another-secret")
        assert "webhook-signature" not in receiver.headers[0]

        # The same durable outbox: its attempt log, and a redelivery on request.
        log = await settled_log(service, task_id)
        assert [e["state"] for e in log["events"]] == ["delivered"]
        assert log["callback_url"] == f"{hooks}/hook"
        again = f"/api/generate/callbacks/{task_id}/redeliver"
        assert (await service.client.post(again, headers=x_key(service))).status_code == 200
        await receiver.wait_for(2)
        assert receiver.bodies[1] == sent
        assert bfl_verify(receiver.raw[1], receiver.headers[1].get("x-bfl-signature"), secret)


@pytest.mark.parametrize(
    ("message", "status", "error"),
    [
        ("The engine ran out of memory", "Error", "task_failed"),
        ("Content Moderated: upstream flagged the output", "Content Moderated", None),
    ],
)
async def test_a_failed_task_polls_and_posts_its_failure_in_bfl_shape(
    tmp_path: Path, message: str, status: str, error: str | None
) -> None:
    receiver = Receiver()
    async with (
        serve_asgi(receiver.app()) as hooks,
        in_process(make_settings(tmp_path / "data")) as service,
    ):
        body = {"prompt": PROMPT, "webhook_url": f"{hooks}/hook", "webhook_secret": "s3cret"}
        task_id = (await post(service, "flux-2-pro", body)).json()["id"]
        # Failed as a worker fails it, through the store.
        store = service.runtime.store
        claim = await store.claim_task(["flux-2-pro"], "test-worker", 30)
        assert claim is not None and claim.task.task_id == task_id
        assert await store.fail_task(claim, message)

        polled = await service.client.get(f"/v1/get_result?id={task_id}", headers=x_key(service))
        answer = polled.json()
        assert (polled.status_code, answer["status"], answer["result"]) == (200, status, None)
        if error:
            assert answer["details"] == {"error": message}
        else:
            assert answer["details"] == {"Moderation Reasons": [message]}

        await receiver.wait_for(1)
        sent = receiver.bodies[0]
        assert (sent["id"], sent["status"], sent["message"]) == (task_id, status, message)
        assert sent["error"] == (error or "content_policy_violation")
        assert bfl_verify(receiver.raw[0], receiver.headers[0].get("x-bfl-signature"), "s3cret")


async def test_a_body_past_its_cap_is_413_in_bfl_shape_and_the_cap_has_room_for_images(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path / "data", max_body_bytes=4096, max_base64_upload_bytes=64 * 1024
    )
    async with in_process(settings) as service:
        noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
        buffer = io.BytesIO()
        noise.save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        # An image past max_body_bytes alone: the route's cap has room for it.
        assert len(image) > 4096
        fits = await post(service, "flux-2-pro", {"prompt": PROMPT, "input_image": image})
        assert fits.status_code == 200, fits.text
        # One image past its own limit, then a body past the route's cap.
        too_big = await post(service, "flux-2-pro", {"prompt": PROMPT, "input_image": "A" * 10**5})
        assert too_big.status_code == 413
        assert too_big.json()["detail"].startswith("input_image holds more than")
        huge = await post(service, "flux-2-pro", {"prompt": PROMPT, "input_image": "A" * 10**7})
        assert huge.status_code == 413
        assert "larger than" in huge.json()["detail"]
