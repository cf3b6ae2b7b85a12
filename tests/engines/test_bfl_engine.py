"""engine = "bfl": tasks run at Black Forest Labs' API, here a fake of it on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fluxserve.cli_models import upstream_key_check
from fluxserve.store import Store

from conftest import Service, make_settings, queue_task, run_service, serve_asgi, until
from fake_bfl import KEY, FakeBfl, sample_png

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def bfl_service(
    tmp_path: Path, fake: FakeBfl, **overrides: Any
) -> AsyncIterator[tuple[Service, str]]:
    async with serve_asgi(fake.app()) as upstream:
        values = {
            "engine": "bfl",
            "bfl_api_key": KEY,
            "bfl_base_url": upstream,
            "bfl_poll_interval": 0.05,
            "poll_interval": 0.1,
            **overrides,
        }
        settings = make_settings(tmp_path / "data", **values)
        async with run_service(settings) as service:
            yield service, upstream


async def submit(service: Service, prompt: str, **inputs: Any) -> str:
    model = "flux-2-pro-edit" if "image_urls" in inputs else "flux-2-pro"
    body = {"model": model, "input": {"prompt": prompt, "size": "1:1", **inputs}}
    response = await service.submit(body)
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["task_id"])


async def progress_seen(service: Service, task_id: str) -> set[int]:
    """Every progress the status answers show until the task ends."""
    seen = set()
    while True:
        data = (await service.status(task_id)).json()["data"]
        if data["status"] in ("finished", "failed"):
            return seen
        seen.add(data["progress"])
        await asyncio.sleep(0.01)


async def test_pending_then_ready_lands_in_fluxservers_storage(tmp_path: Path) -> None:
    fake = FakeBfl(pending_polls=6)
    async with bfl_service(tmp_path, fake) as (service, _):
        task_id = await submit(service, "a fox in the snow", seed=7)
        progress = await progress_seen(service, task_id)
        data = await service.wait(task_id)
        assert data["status"] == "finished", data
        assert data["engine"] == "bfl" and data["seed"] == 7
        assert (data["width"], data["height"]) == (1024, 1024)
        stored = await service.client.get(data["files"][0]["file_url"])
        assert stored.content == fake.sample
        # Served by fluxserve itself, not BFL's delivery URL, which expires.
        assert data["files"][0]["file_url"].startswith(service.url)
    assert any(0 < value < 100 for value in progress), progress
    [upstream] = fake.tasks.values()
    assert upstream.body["prompt"] == "a fox in the snow" and upstream.body["seed"] == 7
    assert upstream.body["endpoint"] == {"endpoint": "flux-2-pro"}


@pytest.mark.parametrize(
    ("output_format", "asked", "signature"),
    [("jpeg", "jpeg", b"\xff\xd8\xff"), ("webp", "png", b"RIFF")],
)
async def test_the_result_is_in_the_format_the_task_asked_for(
    tmp_path: Path, output_format: str, asked: str, signature: bytes
) -> None:
    fake = FakeBfl()
    async with bfl_service(tmp_path, fake) as (service, _):
        task_id = await submit(service, "a fox", output_format=output_format)
        data = await service.wait(task_id)
        stored = await service.client.get(data["files"][0]["file_url"])
    assert data["status"] == "finished", data
    assert stored.content.startswith(signature)
    assert [task.body["output_format"] for task in fake.tasks.values()] == [asked]


async def test_an_edit_sends_its_references_as_base64(tmp_path: Path) -> None:
    fake = FakeBfl()
    reference = "data:image/png;base64," + base64.b64encode(sample_png(64)).decode()
    async with bfl_service(tmp_path, fake) as (service, _):
        task_id = await submit(service, "make it blue", image_urls=[reference, reference])
        assert (await service.wait(task_id))["status"] == "finished"
    [upstream] = fake.tasks.values()
    assert upstream.body["input_image"].startswith("iVBOR")  # a PNG, base64
    assert upstream.body["input_image_2"].startswith("iVBOR")


async def test_a_private_reference_url_stays_behind_the_net_guard(tmp_path: Path) -> None:
    fake = FakeBfl()
    async with bfl_service(tmp_path, fake, allow_private_networks=False) as (service, upstream):
        # The fake's own address: trusted as the configured endpoint, never as a reference.
        body = {
            "model": "flux-2-pro-edit",
            "input": {"prompt": "edit", "image_urls": [f"{upstream}/delivery/up-0/sample.png"]},
        }
        refused = await service.submit(body)
        # The configured endpoint is on loopback too, and is trusted: tasks still run.
        ran = await service.wait(await submit(service, "a lighthouse"))
    assert refused.status_code == 400
    assert "loopback address, and private networks are not allowed" in refused.text
    assert ran["status"] == "finished", ran
    assert [task.body["prompt"] for task in fake.tasks.values()] == ["a lighthouse"]


@pytest.mark.parametrize(
    ("prompt", "stage"),
    [
        ("request-moderated cat", "Request Moderated"),
        ("content-moderated cat", "Content Moderated"),
    ],
)
async def test_moderation_fails_the_task_saying_so(tmp_path: Path, prompt: str, stage: str) -> None:
    async with bfl_service(tmp_path, FakeBfl()) as (service, _):
        data = await service.wait(await submit(service, prompt))
    assert data["status"] == "failed"
    assert data["error_message"].startswith(f"Moderated upstream by Black Forest Labs ({stage})")
    assert data["credits_amount"] == 0


@pytest.mark.parametrize(
    "fake",
    [FakeBfl(busy=2), FakeBfl(failing=2)],
    ids=["429 on create, then ready", "503 on poll, then ready"],
)
async def test_a_busy_or_failing_upstream_is_retried_and_the_task_kept(
    tmp_path: Path, fake: FakeBfl
) -> None:
    async with bfl_service(tmp_path, fake) as (service, _):
        data = await service.wait(await submit(service, "a lighthouse"))
    assert data["status"] == "finished", data
    assert fake.busy == fake.failing == 0, "each refusal was answered"
    assert len(fake.tasks) == 1


async def test_an_upstream_task_past_the_task_timeout_fails_saying_so(tmp_path: Path) -> None:
    async with bfl_service(tmp_path, FakeBfl(), task_timeout=0.5) as (service, _):
        data = await service.wait(await submit(service, "hold forever"))
    assert data["status"] == "failed"
    assert data["error_message"].startswith("Task timed out: upstream still pending after 0.5 s")


async def test_the_store_keeps_the_upstream_task_only_for_the_claim_holding_it(
    store: Store,
) -> None:
    task_id = await queue_task(store)
    claim = await store.claim_task(["flux-2-pro"], "w1", 60)
    assert claim is not None
    made = {"id": "up-1", "polling_url": "https://api.bfl.ai/v1/get_result?id=up-1"}
    assert await store.record_upstream(claim, made)
    await store.release_task(claim)
    assert not await store.record_upstream(claim, {"id": "other"}), "released: not held"
    again = await store.claim_task(["flux-2-pro"], "w2", 60)
    assert again is not None and again.task.upstream == made
    assert (await store.get_task(task_id)).upstream == made  # type: ignore[union-attr]


async def test_402_fails_with_upstream_credits_exhausted(tmp_path: Path) -> None:
    async with bfl_service(tmp_path, FakeBfl(broke=True)) as (service, _):
        data = await service.wait(await submit(service, "a lighthouse"))
    assert data["status"] == "failed"
    assert "upstream credits exhausted" in data["error_message"].lower()


async def test_a_sample_that_404s_fails_saying_it_expired_or_is_missing(tmp_path: Path) -> None:
    async with bfl_service(tmp_path, FakeBfl()) as (service, _):
        data = await service.wait(await submit(service, "vanish"))
    assert data["status"] == "failed"
    assert "sample expired or missing (404)" in data["error_message"]


async def test_a_wrong_key_fails_the_task_saying_so(tmp_path: Path) -> None:
    fake = FakeBfl()
    async with bfl_service(tmp_path, fake, bfl_api_key="not-the-key") as (service, _):
        data = await service.wait(await submit(service, "a lighthouse"))
    assert data["status"] == "failed"
    assert "refused fluxserve's BFL API key (403)" in data["error_message"]


async def test_slow_tasks_are_followed_many_at_once(tmp_path: Path) -> None:
    fake = FakeBfl()
    async with bfl_service(tmp_path, fake, bfl_max_in_flight=3) as (service, _):
        ids = [await submit(service, f"hold {index}") for index in range(5)]
        await until(lambda: fake.most_pending == 3)
        # The limit holds: two wait in fluxserve's queue, not upstream.
        await asyncio.sleep(0.3)
        assert len(fake.tasks) == 3
        fake.release()
        ended = [await service.wait(task_id) for task_id in ids]
    assert [data["status"] for data in ended] == ["finished"] * 5
    assert fake.most_pending == 3 and len(fake.tasks) == 5


async def test_cancel_stops_following_the_upstream_task(tmp_path: Path) -> None:
    fake = FakeBfl()
    async with bfl_service(tmp_path, fake) as (service, _):
        task_id = await submit(service, "hold on")
        await until(lambda: bool(fake.tasks) and next(iter(fake.tasks.values())).polls >= 2)
        cancel = await service.client.post(
            f"/api/generate/cancel/{task_id}", headers=service.auth()
        )
        assert cancel.status_code == 200, cancel.text
        data = await service.wait(task_id)
        [upstream] = fake.tasks.values()
        polls = upstream.polls
        await asyncio.sleep(0.5)  # ten poll intervals
        assert upstream.polls == polls, "no polling after the cancel"
    assert data["status"] == "failed" and data["cancelled"] is True


async def test_without_a_key_the_worker_says_why(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", engine="bfl")
    async with run_service(settings) as service:
        worker = service.runtime.worker
        assert worker is not None
        await until(lambda: worker.state == "defunct")
        health = (await service.client.get("/health")).json()
    assert "FLUXSERVE_BFL_API_KEY" in health["reason"]


async def test_a_bfl_route_beside_local_ones_runs_its_model_upstream(tmp_path: Path) -> None:
    fake = FakeBfl()
    async with serve_asgi(fake.app()) as upstream:
        settings = make_settings(
            tmp_path / "data",
            engine="tiny",
            bfl_api_key=KEY,
            bfl_base_url=upstream,
            bfl_poll_interval=0.05,
            models={"flux-2-flex": {"engine": "bfl"}},
        )
        async with run_service(settings) as service:
            flex = await service.submit(
                {"model": "flux-2-flex", "input": {"prompt": "a red kite", "size": "1:1"}}
            )
            pro = await service.submit(
                {"model": "flux-2-pro", "input": {"prompt": "a red kite", "size": "1:1"}}
            )
            assert flex.status_code == pro.status_code == 200, flex.text + pro.text
            ended = [await service.wait(r.json()["data"]["task_id"]) for r in (flex, pro)]
    assert [data["engine"] for data in ended] == ["bfl", "tiny"]
    [sent] = fake.tasks.values()
    assert sent.body["endpoint"] == {"endpoint": "flux-2-flex"} and sent.body["steps"] == 4


def test_routes_say_whether_they_run_diffusers() -> None:
    settings = make_settings(Path("unused"), models={"flux-2-pro": {"engine": "bfl"}})
    assert not settings.models["flux-2-pro"].takes_loras
    assert settings.models["flux-2-flex"].takes_loras
    everything = make_settings(Path("unused"), engine="bfl")
    assert not any(route.takes_loras for route in everything.models.values())
    assert settings.models["flux-2-pro-edit"].upstream_endpoint("flux-2-pro-edit") == (
        "/v1/flux-2-pro"
    )


async def test_bfl_api_code_runs_through_fluxserve_to_the_bfl_engine(tmp_path: Path) -> None:
    """Black Forest Labs' wire in front, Black Forest Labs' API behind: what a BFL
    client asks of moderation and upsampling reaches the upstream task, and
    get_result answers Ready with fluxserve's own file, or BFL's moderation status."""
    fake = FakeBfl(pending_polls=2)
    async with bfl_service(tmp_path, fake) as (service, _):
        headers = {"x-key": service.key}
        body = {"width": 512, "height": 768, "seed": 3, "safety_tolerance": 5}
        asked = await service.client.post(
            "/v1/flux-2-pro",
            json={"prompt": "a kite", "prompt_upsampling": True, **body},
            headers=headers,
        )
        moderated = await service.client.post(
            "/v1/flux-2-pro", json={"prompt": "content-moderated kite"}, headers=headers
        )
        results = []
        for answer in (asked, moderated):
            assert answer.status_code == 200, answer.text
            await service.wait(answer.json()["id"])
            polled = await service.client.get(answer.json()["polling_url"], headers=headers)
            results.append(polled.json())
        sample = await service.client.get(results[0]["result"]["sample"])
    ready, refused = results
    assert ready["status"] == "Ready" and sample.content.startswith(b"\xff\xd8\xff")
    assert ready["result"]["sample"].startswith(service.url)
    assert refused["status"] == "Content Moderated"
    [first] = [task.body for task in fake.tasks.values() if task.body["prompt"] == "a kite"]
    assert {key: first[key] for key in body} == body
    assert first["prompt_upsampling"] is True and first["output_format"] == "jpeg"


@pytest.mark.parametrize("answer", [{"credits": None}, {"credits": "many"}, {}])
async def test_doctor_does_not_trust_a_credits_answer_without_a_number(
    tmp_path: Path, answer: dict[str, Any]
) -> None:
    async def credits(_request: Request) -> Response:
        return JSONResponse(answer)

    app = Starlette(routes=[Route("/v1/credits", credits)])
    async with serve_asgi(app) as url:
        settings = make_settings(tmp_path / "data", bfl_api_key=KEY, bfl_base_url=url)
        said = await upstream_key_check(settings)
    assert said.startswith("not checked:") and "no number of credits" in said
