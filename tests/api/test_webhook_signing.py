"""Callbacks verify with `standardwebhooks`, an implementation fluxserve did not write."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from fluxserve.webhooks.signing import new_secret, sign, signature_header

from conftest import (
    Receiver,
    Service,
    make_settings,
    run_service,
    serve_asgi,
    settled_log,
    submit_ended,
)


async def secret_of(service: Service, key: str | None = None) -> dict[str, Any]:
    response = await service.client.get("/api/webhooks/secret", headers=service.auth(key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"code", "data"} and body["code"] == 200
    data: dict[str, Any] = body["data"]
    return data


async def rotate(service: Service) -> dict[str, Any]:
    response = await service.client.post("/api/webhooks/secret/rotate", headers=service.auth())
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def deliver_one(
    service: Service, receiver: Receiver, hook: str
) -> tuple[bytes, dict[str, str]]:
    """Deliver one task's callback to `receiver`; its raw body and headers."""
    await settled_log(service, await submit_ended(service, f"{hook}/hook"))
    await receiver.wait_for(1)
    return receiver.raw[-1], receiver.headers[-1]


def verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


def test_signatures_match_the_reference_implementation() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    body = b'{"code":200,"data":{"status":"finished"}}'
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    expected = Webhook(secret).sign("evt_1", moment, body.decode())
    assert sign(secret, "evt_1", int(moment.timestamp()), body) == expected
    other = new_secret()
    assert signature_header([secret, other], "evt_1", int(moment.timestamp()), body) == (
        f"{expected} {Webhook(other).sign('evt_1', moment, body.decode())}"
    )


async def test_a_callback_verifies_with_the_keys_secret(tmp_path: Path) -> None:
    receiver = Receiver()
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(make_settings(tmp_path / "data"), run_worker=False, in_process=True) as service,
    ):
        secret = await secret_of(service)
        assert (await secret_of(service)) == secret  # made once, then kept
        other_secret = (await secret_of(service, await service.new_key()))["secret"]
        body, headers = await deliver_one(service, receiver, hook)
    assert secret["previous_secret_expires_time"] is None
    assert Webhook(secret["secret"]).verify(body, headers) == receiver.bodies[0]
    assert headers["webhook-signature"].count("v1,") == 1
    assert not verifies(other_secret, body, headers)
    assert not verifies(secret["secret"], body.replace(b"finished", b"failed!!"), headers)


async def test_after_a_rotation_old_and_new_secrets_both_verify(tmp_path: Path) -> None:
    receiver = Receiver()
    settings = make_settings(tmp_path / "data", webhook_secret_grace=3600)
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(settings, run_worker=False, in_process=True) as service,
    ):
        old = (await secret_of(service))["secret"]
        new = await rotate(service)
        assert (await secret_of(service)) == new
        body, headers = await deliver_one(service, receiver, hook)
    assert new["secret"] != old and new["previous_secret_expires_time"] is not None
    assert headers["webhook-signature"].count("v1,") == 2
    assert verifies(old, body, headers)
    assert verifies(new["secret"], body, headers)


async def test_once_the_grace_period_is_over_only_the_new_secret_verifies(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    settings = make_settings(tmp_path / "data", webhook_secret_grace=0)
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(settings, run_worker=False, in_process=True) as service,
    ):
        old = (await secret_of(service))["secret"]
        new = await rotate(service)
        body, headers = await deliver_one(service, receiver, hook)
    assert new["previous_secret_expires_time"] is None
    assert headers["webhook-signature"].count("v1,") == 1
    assert not verifies(old, body, headers)
    assert verifies(new["secret"], body, headers)


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/api/webhooks/secret"), ("POST", "/api/webhooks/secret/rotate")]
)
async def test_the_secret_routes_need_a_key(tmp_path: Path, method: str, path: str) -> None:
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        response = await service.client.request(method, path)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
