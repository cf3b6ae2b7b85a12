"""OpenAI's images door, called in this process: refusals that depend on the
server's settings (docs/openai-api.md)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxserve.accounts import create_account
from fluxserve.errors import StoreUnavailable

from conftest import Service, make_settings, run_service, until

PROMPT = "a lighthouse on a cliff at dawn, oil painting"
UNIFIED_SUBMIT = {"model": "flux-2-pro", "input": {"prompt": PROMPT}}


@pytest.mark.parametrize(
    ("limits", "n", "setting"),
    [
        ({"max_active_tasks": 2}, 3, "max_active_tasks"),
        ({"rate_limit_per_minute": 4, "max_active_tasks": 10}, 5, "rate_limit_per_minute"),
    ],
)
async def test_more_images_than_a_key_may_queue_is_a_400_on_n(
    tmp_path: Path, limits: dict[str, int], n: int, setting: str
) -> None:
    """Each image is a task: `n` past a per-key limit could never be queued, so it is
    not a 429 to retry, and it queues nothing (nor spends the minute's submits)."""
    settings = make_settings(tmp_path / "data", **limits)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        response = await service.client.post(
            "/v1/images/generations", json={"prompt": PROMPT, "n": n}, headers=service.auth()
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "n" and error["type"] == "invalid_request_error"
        assert setting in error["message"]
        listed = await service.client.get("/api/generate/tasks", headers=service.auth())
        assert listed.json()["data"]["tasks"] == []


@pytest.mark.parametrize("size", ["auto\n", "1024x1024\n", "64x64\r\n"])
async def test_a_size_with_a_line_break_after_it_is_a_400_on_size(
    tmp_path: Path, size: str
) -> None:
    settings = make_settings(tmp_path / "data", openai_wait=1)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        response = await service.client.post(
            "/v1/images/generations", json={"prompt": PROMPT, "size": size}, headers=service.auth()
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "size"


async def test_a_generations_n_too_long_to_be_a_number_is_a_400_on_n(tmp_path: Path) -> None:
    """Digits past Python's int conversion limit are out of range, as 1e400 is: a 400
    naming `n`, not a body that could not be read."""
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        response = await service.client.post(
            "/v1/images/generations",
            content=b'{"prompt": "%s", "n": %s}' % (PROMPT.encode(), b"9" * 5000),
            headers={**service.auth(), "Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "n"


async def test_an_edits_n_too_long_to_be_a_number_is_a_400_on_n(tmp_path: Path) -> None:
    """Multipart sends `n` as text: digits past Python's int conversion limit are
    refused like any other `n` that is not a whole number."""
    image = io.BytesIO()
    Image.new("RGB", (96, 80), (10, 120, 60)).save(image, format="PNG")
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        response = await service.client.post(
            "/v1/images/edits",
            data={"prompt": PROMPT, "n": "9" * 5000},
            files={"image": ("a.png", image.getvalue())},
            headers=service.auth(),
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "n"


async def listed(service: Service, key: str | None = None) -> list[dict[str, Any]]:
    response = await service.client.get("/api/generate/tasks", headers=service.auth(key))
    assert response.status_code == 200, response.text
    tasks: list[dict[str, Any]] = response.json()["data"]["tasks"]
    return tasks


async def paid_key(service: Service, email: str, credits: int) -> str:
    made = await create_account(service.runtime.store, email)
    await service.runtime.store.grant_credits(made.account_id, credits, "test")
    return await service.new_key(email, account=email)


async def generate(service: Service, n: int, key: str | None = None) -> Any:
    return await service.client.post(
        "/v1/images/generations", json={"prompt": PROMPT, "n": n}, headers=service.auth(key)
    )


async def test_images_short_of_credits_queue_nothing_and_spend_none_of_the_minute(
    tmp_path: Path,
) -> None:
    """Refused whole: no task queued and cancelled, counting against the key's minute."""
    settings = make_settings(
        tmp_path / "data", rate_limit_per_minute=4, prices={"flux-2-pro": {"1K": 5}}
    )
    async with run_service(settings, run_worker=False, in_process=True) as service:
        key = await paid_key(service, "short@example.com", 15)  # three images' worth
        refused = await generate(service, 4, key)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "insufficient_quota"
        assert "4 tasks cost 20 credits together; the account has 15 available" in error["message"]
        assert await listed(service, key) == []
        # The minute's submits are all still the key's: three images it can pay for pass.
        for _ in range(3):
            submitted = await service.submit(UNIFIED_SUBMIT, key)
            assert submitted.status_code == 200, submitted.text


async def test_images_past_the_minutes_room_queue_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", rate_limit_per_minute=4)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        for _ in range(2):
            assert (await service.submit(UNIFIED_SUBMIT)).status_code == 200
        refused = await generate(service, 3)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "no room for 3 more" in refused.json()["error"]["message"]
        assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert len(await listed(service)) == 2
        for _ in range(2):
            assert (await service.submit(UNIFIED_SUBMIT)).status_code == 200


async def test_images_past_the_active_limit_queue_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", max_active_tasks=3, rate_limit_per_minute=4)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        assert (await service.submit(UNIFIED_SUBMIT)).status_code == 200
        refused = await generate(service, 3)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert (
            error["code"] == "rate_limit_exceeded"
            and "at most 3 queued or running" in error["message"]
        )
        assert len(await listed(service)) == 1
        # Nor did it spend the minute: two more fit within both limits.
        for _ in range(2):
            assert (await service.submit(UNIFIED_SUBMIT)).status_code == 200


async def test_a_wait_that_fails_leaves_no_task_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One image's wait fails (the database away as its task ended): the others'
    waits end with the request, and none is left following its task."""
    settings = make_settings(tmp_path / "data")
    async with run_service(settings, run_worker=False, in_process=True) as service:
        runtime = service.runtime
        request = asyncio.create_task(generate(service, 3))
        await until(lambda: runtime.feed.streams >= 3)

        async def database_away(*_: Any, **__: Any) -> Any:
            raise StoreUnavailable("connection lost")

        monkeypatch.setattr(runtime.service, "get", database_away)
        first = (await listed(service))[-1]["task_id"]
        await runtime.store.cancel_task(first)
        response = await request
        assert response.status_code == 503, response.text
        assert runtime.feed.streams == 0
        # Its tasks were queued: named, and not to be sent again.
        assert len(response.json()["error"]["task_ids"]) == 3
        assert response.headers["x-should-retry"] == "false"
