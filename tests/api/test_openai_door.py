"""OpenAI's images door, called in this process: refusals that depend on the
server's settings (docs/openai-api.md)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_settings, run_service

PROMPT = "a lighthouse on a cliff at dawn, oil painting"


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
