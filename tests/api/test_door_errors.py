"""Each front door answers every error of its routes in its own shape: the unified
API's envelope, Black Forest Labs' `{"detail": ...}`, OpenAI's `{"error": {...}}`;
an error nobody expected (a 500) as well as a refusal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxserve.errors import StoreUnavailable

from conftest import make_settings, run_service

PROMPT = "a lighthouse on a cliff at dawn"


def envelope_message(response: httpx.Response) -> str:
    body = response.json()
    assert body["code"] == response.status_code
    if response.status_code >= 500:
        assert body["error"]["type"] == "server_error"
    message: str = body["error"]["message"]
    return message


def bfl_message(response: httpx.Response) -> str:
    body = response.json()
    assert list(body) == ["detail"]
    message: str = body["detail"]
    return message


def openai_message(response: httpx.Response) -> str:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if response.status_code >= 500:
        assert error["type"] == "server_error"
    message: str = error["message"]
    return message


# method, path, body, and how the door's error is read.
DOORS: list[tuple[str, str, dict[str, Any] | None, Callable[[httpx.Response], str]]] = [
    (
        "POST",
        "/api/generate/submit",
        {"model": "flux-2-pro", "input": {"prompt": PROMPT}},
        envelope_message,
    ),
    ("POST", "/v1/flux-2-pro", {"prompt": PROMPT}, bfl_message),
    ("GET", "/v1/get_result?id=task-1", None, bfl_message),
    ("POST", "/v1/images/generations", {"prompt": PROMPT}, openai_message),
]


@pytest.mark.parametrize(
    ("raised", "status", "message", "retry_after"),
    [
        # The cause stays in the server's log, not in the answer.
        (RuntimeError("the disk caught fire"), 500, "Internal server error", None),
        (StoreUnavailable("connection refused"), 503, "The database is unavailable", "1"),
    ],
)
@pytest.mark.parametrize(("method", "path", "body", "message_of"), DOORS)
async def test_an_error_of_the_service_is_answered_in_the_doors_shape(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    message_of: Callable[[httpx.Response], str],
    raised: Exception,
    status: int,
    message: str,
    retry_after: str | None,
) -> None:
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:

        async def broken(*_: Any, **__: Any) -> Any:
            raise raised

        monkeypatch.setattr(service.runtime.service, "submit", broken)
        monkeypatch.setattr(service.runtime.service, "submit_together", broken)
        monkeypatch.setattr(service.runtime.service, "get", broken)
        response = await service.client.request(method, path, json=body, headers=service.auth())
        assert response.status_code == status, response.text
        assert message_of(response).startswith(message)
        assert response.headers.get("retry-after") == retry_after


@pytest.mark.parametrize(("method", "path", "body", "message_of"), DOORS)
async def test_a_missing_key_is_a_401_in_the_doors_shape(
    tmp_path: Path,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    message_of: Callable[[httpx.Response], str],
) -> None:
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        response = await service.client.request(method, path, json=body)
        assert response.status_code == 401, response.text
        assert "API key" in message_of(response)
