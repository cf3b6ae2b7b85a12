"""Accounts over HTTP: balance and prices, cancel, history, idempotent submits, limits,
the fair queue, and the accounts and credits commands."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from fluxserve.accounts import create_account
from fluxserve.cli import app
from fluxserve.engines.base import Engine
from fluxserve.settings import Settings
from fluxserve.store.base import Outcome
from fluxserve.tasks import ResultFile

from conftest import Receiver, Service, make_settings, run_service, serve_asgi
from hooked_engine import Hooked

PROMPT = {"prompt": "a paper boat on a pond", "size": "1:1", "resolution": "1K"}
PRO = {"model": "flux-2-pro", "input": PROMPT}


async def account_key(service: Service, email: str, credits: int = 0) -> str:
    """A key of a new account `email` holding `credits`."""
    made = await create_account(service.runtime.store, email)
    if credits:
        await service.runtime.store.grant_credits(made.account_id, credits, "test")
    return await service.new_key(email, account=email)


async def get(service: Service, path: str, key: str | None = None, **params: Any) -> httpx.Response:
    return await service.client.get(path, headers=service.auth(key), params=params)


async def cancel(service: Service, task_id: str, key: str | None = None) -> httpx.Response:
    return await service.client.post(f"/api/generate/cancel/{task_id}", headers=service.auth(key))


async def finish(service: Service, model: str = "flux-2-pro") -> str:
    """Run the oldest queued task to `finished` as a worker would, through the store."""
    store = service.runtime.store
    claim = await store.claim_task([model], "test-worker", 30)
    assert claim is not None
    image = ResultFile(f"results/{claim.task.task_id}/image.png", "image.png", "image/png", 9)
    assert await store.finish_task(claim, Outcome("tiny", 1, 1024, 1024, [image]))
    return claim.task.task_id


def error_of(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and body["error"]["type"] == kind
    message: str = body["error"]["message"]
    return message


@pytest.fixture
def queue_only(tmp_path: Path) -> Settings:
    """No worker in these services: tasks stay queued until a test moves them."""
    return make_settings(tmp_path / "data", prices={"flux-2-pro": {"1K": 3, "2K": 9}})


# --- balance and prices -------------------------------------------------------------


async def test_balance_and_credits_follow_a_task_from_hold_to_charge(
    queue_only: Settings,
) -> None:
    async with run_service(queue_only, run_worker=False, in_process=True) as service:
        key = await account_key(service, "alice@example.com", credits=5)
        balance = await get(service, "/api/user/balance", key)
        assert balance.json() == {
            "code": 200,
            "data": {"email": "alice@example.com", "credits_amount": 5, "held_credits": 0},
        }
        task_id = (await service.submit(PRO, key)).json()["data"]["task_id"]
        status = (await service.status(task_id, key)).json()["data"]
        assert status["credits_amount"] == 3
        balance = (await get(service, "/api/user/balance", key)).json()["data"]
        assert (balance["credits_amount"], balance["held_credits"]) == (2, 3)

        refused = await service.submit(PRO, key)
        assert "costs 3 credits" in error_of(refused, 402, "insufficient_credits")
        # A model with no price is free, whatever the balance.
        flex = {"model": "flux-2-flex", "input": PROMPT}
        assert (await service.submit(flex, key)).status_code == 200

        await finish(service)
        balance = (await get(service, "/api/user/balance", key)).json()["data"]
        assert (balance["credits_amount"], balance["held_credits"]) == (2, 0)
        status = (await service.status(task_id, key)).json()["data"]
        assert status["status"] == "finished" and status["credits_amount"] == 3


# --- cancel -------------------------------------------------------------------------


async def test_cancel_a_queued_task_fires_its_callback_and_frees_its_credits(
    queue_only: Settings,
) -> None:
    receiver = Receiver()
    async with (
        serve_asgi(receiver.app()) as hook_base,
        run_service(queue_only, run_worker=False, in_process=True) as service,
    ):
        key = await account_key(service, "alice@example.com", credits=3)
        body = {**PRO, "callback_url": f"{hook_base}/hook"}
        task_id = (await service.submit(body, key)).json()["data"]["task_id"]

        other = await account_key(service, "mallory@example.com")
        error_of(await cancel(service, task_id, other), 403, "permission_error")

        response = await cancel(service, task_id, key)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert data["status"] == "failed" and data["cancelled"] is True
        assert data["error_message"] == "Task was cancelled"
        assert data["credits_amount"] == 0
        await receiver.wait_for(1)
        assert receiver.bodies[0] == (await service.status(task_id, key)).json()
        assert receiver.bodies[0]["data"]["cancelled"] is True
        balance = (await get(service, "/api/user/balance", key)).json()["data"]
        assert (balance["credits_amount"], balance["held_credits"]) == (3, 0)
        # Asking again answers the same; the worker never sees the task.
        assert (await cancel(service, task_id, key)).json()["data"] == data
        assert await service.runtime.store.claim_task(["flux-2-pro"], "w", 30) is None
        error_of(await cancel(service, "task-unified-1-nosuchtk", key), 404, "not_found_error")


async def test_cancel_a_finished_task_is_a_conflict(queue_only: Settings) -> None:
    async with run_service(queue_only, run_worker=False, in_process=True) as service:
        key = await account_key(service, "alice@example.com", credits=3)
        task_id = (await service.submit(PRO, key)).json()["data"]["task_id"]
        await finish(service)
        message = error_of(await cancel(service, task_id, key), 409, "conflict_error")
        assert "finished" in message
        assert (await service.status(task_id, key)).json()["data"]["status"] == "finished"


class SlowSteps(Hooked):
    """Wraps an engine: each denoising step takes at least `delay`; records the steps,
    and sets `reached` once `at_step` steps are done."""

    def __init__(self, inner: Engine, delay: float, at_step: int = 1) -> None:
        super().__init__(inner, self.slow)
        self.delay = delay
        self.steps: list[int] = []
        self.reached_at = at_step
        self.reached = threading.Event()

    def slow(self, _: object, done: int, __: int) -> None:
        self.steps.append(done)
        if len(self.steps) >= self.reached_at:
            self.reached.set()
        time.sleep(self.delay)


async def test_a_cancel_from_another_process_stops_the_running_task_within_a_step(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    engine = SlowSteps(tiny_engine, delay=0.2, at_step=2)
    settings = make_settings(tmp_path / "data")
    async with run_service(settings, engine=engine, in_process=True) as service:
        body = {"model": "flux-2-flex", "input": {**PROMPT, "steps": 30}}
        task_id = (await service.submit(body)).json()["data"]["task_id"]
        assert await asyncio.to_thread(engine.reached.wait, 30)
        # Through the store alone, as an API process without this worker would.
        await service.runtime.store.cancel_task(task_id)
        at_cancel = len(engine.steps)
        data = await service.wait(task_id)
    assert data["status"] == "failed" and data["cancelled"] is True
    assert data["error_message"] == "Task was cancelled"
    # The worker learns of it at its next progress write, then stops at the next step.
    assert len(engine.steps) <= at_cancel + 2
    assert max(engine.steps) < 30


# --- history ------------------------------------------------------------------------


async def test_history_pages_an_accounts_tasks_newest_first(queue_only: Settings) -> None:
    async with run_service(queue_only, run_worker=False, in_process=True) as service:
        key = await account_key(service, "alice@example.com")
        # Two keys of one account share its history; another account's never shows.
        second = await service.new_key("alice-ci", account="alice@example.com")
        await service.submit(PRO, await account_key(service, "bob@example.com"))
        flex = {"model": "flux-2-flex", "input": PROMPT}
        ids = [
            (await service.submit(body, k)).json()["data"]["task_id"]
            for body, k in [(flex, key), (flex, second), (flex, key), (flex, second), (flex, key)]
        ]
        done = await finish(service, "flux-2-flex")

        seen, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await get(service, "/api/generate/tasks", key, **params)).json()["data"]
            seen += [task["task_id"] for task in page["tasks"]]
            assert len(page["tasks"]) <= 2
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]

        finished = await get(service, "/api/generate/tasks", second, status="finished")
        [task] = finished.json()["data"]["tasks"]
        assert task["task_id"] == done and task["files"][0]["file_name"] == "image.png"
        by_model = await get(service, "/api/generate/tasks", key, model="flux-2-pro")
        assert by_model.json()["data"] == {"tasks": [], "next_cursor": None}

        for params, field in [
            ({"status": "done"}, "status"),
            ({"model": "flux-3"}, "model"),
            ({"limit": 0}, "limit"),
            ({"limit": 101}, "limit"),
            ({"cursor": "not-a-cursor"}, "cursor"),
        ]:
            response = await get(service, "/api/generate/tasks", key, **params)
            assert field in error_of(response, 400, "invalid_request_error")


# --- idempotency and limits ---------------------------------------------------------


async def test_a_retried_submit_with_an_idempotency_key_answers_the_first_task(
    queue_only: Settings,
) -> None:
    async with run_service(queue_only, run_worker=False, in_process=True) as service:
        headers = {**service.auth(), "Idempotency-Key": "order-2026-11-25-17"}
        flex = {"model": "flux-2-flex", "input": PROMPT}
        first = await service.client.post("/api/generate/submit", json=flex, headers=headers)
        # The same body, spelled differently (key order, defaults written out).
        spelled = {"input": {**PROMPT, "output_format": "png"}, "model": "flux-2-flex"}
        again = await service.client.post("/api/generate/submit", json=spelled, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json()

        other = {"model": "flux-2-flex", "input": {**PROMPT, "prompt": "a different boat"}}
        refused = await service.client.post("/api/generate/submit", json=other, headers=headers)
        assert "Idempotency-Key" in error_of(refused, 409, "conflict_error")
        assert await service.runtime.store.queue_depths() == {"flux-2-flex": 1}

        long_key = {**service.auth(), "Idempotency-Key": "k" * 256}
        response = await service.client.post("/api/generate/submit", json=flex, headers=long_key)
        error_of(response, 400, "invalid_request_error")


async def test_past_a_limit_a_submit_gets_429_with_retry_after(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", rate_limit_per_minute=2, max_active_tasks=5)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        for _ in range(2):
            assert (await service.submit(PRO)).status_code == 200
        refused = await service.submit(PRO)
        assert "2 submits per minute" in error_of(refused, 429, "rate_limit_error")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Another key has its own allowance.
        assert (await service.submit(PRO, await service.new_key())).status_code == 200

    settings = make_settings(tmp_path / "other", max_active_tasks=1)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        assert (await service.submit(PRO)).status_code == 200
        refused = await service.submit(PRO)
        assert "at most 1 queued or running" in error_of(refused, 429, "rate_limit_error")
        assert refused.headers["Retry-After"] == "1"
        await finish(service)
        assert (await service.submit(PRO)).status_code == 200


# --- the fair queue, with a worker --------------------------------------------------


async def test_one_accounts_backlog_does_not_hold_back_anothers_task(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    engine = SlowSteps(tiny_engine, delay=0.05)
    async with run_service(
        make_settings(tmp_path / "data"), engine=engine, in_process=True
    ) as service:
        alice = await account_key(service, "alice@example.com")
        bob = await account_key(service, "bob@example.com")
        small = {"model": "flux-2-pro", "input": {**PROMPT, "size": "1:1"}}
        backlog = [(await service.submit(small, alice)).json()["data"]["task_id"] for _ in range(6)]
        assert await asyncio.to_thread(engine.reached.wait, 30)
        bobs = (await service.submit(small, bob)).json()["data"]["task_id"]
        assert (await service.status(bobs, bob)).json()["data"]["queue_position"] == 1
        await service.wait(bobs, key=bob)
        store = service.runtime.store
        bob_started = (await store.get_task(bobs)).started_at  # type: ignore[union-attr]
        started_before = [
            task_id
            for task_id in backlog
            if (task := await store.get_task(task_id)) and task.started_at
            if task.started_at < bob_started  # type: ignore[operator]
        ]
        # Only the task already running when bob submitted went first.
        assert started_before == backlog[:1]


# --- the accounts and credits commands ----------------------------------------------


async def test_accounts_keys_and_credits_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUXSERVE_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()

    async def cli(*args: str, code: int = 0) -> str:
        # In a thread: the commands run their own event loop.
        result = await asyncio.to_thread(runner.invoke, app, list(args))
        assert result.exit_code == code, result.output
        return result.output

    assert "alice@example.com" in await cli("accounts", "create", "--email", "alice@example.com")
    assert "exists already" in await cli(
        "accounts", "create", "--email", "alice@example.com", code=1
    )
    assert "create it with" in await cli(
        "keys", "create", "--name", "ci", "--account", "x@y.z", code=1
    )
    secret = (
        await cli("keys", "create", "--name", "ci", "--account", "alice@example.com")
    ).split()[-1]
    assert "balance 40, available 40" in await cli("credits", "add", "alice@example.com", "40")
    assert "balance 30" in await cli(
        "credits", "add", "--note", "refund reversed", "alice@example.com", "--", "-10"
    )
    shown = await cli("credits", "show", "alice@example.com")
    assert shown.splitlines()[0] == "alice@example.com: balance 30, held 0, available 30"
    assert "\tgrant\t-10\t\trefund reversed" in shown and "\tgrant\t+40\t" in shown
    assert "No account" in await cli("credits", "show", "nobody@example.com", code=1)

    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        balance = await get(service, "/api/user/balance", secret)
        assert balance.json()["data"]["email"] == "alice@example.com"
        assert balance.json()["data"]["credits_amount"] == 30
