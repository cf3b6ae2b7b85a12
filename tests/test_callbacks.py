"""Callback delivery against real receivers on 127.0.0.1, with a shortened schedule."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from conftest import Receiver, make_settings, run_service, serve_asgi
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fluxserve.engines.base import Engine
from fluxserve.store.schema import callbacks

BODY: dict[str, Any] = {"model": "flux-2-pro", "input": {"prompt": "a quiet harbour"}}


async def callback_rows(service: Any) -> list[Any]:
    async with service.runtime.store.engine.connect() as conn:
        return list(await conn.execute(callbacks.select()))


async def test_a_failing_receiver_gets_retries_until_it_answers(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    receiver = Receiver(fail=2, status_code=503)
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(make_settings(tmp_path / "data"), engine=tiny_engine) as service,
    ):
        response = await service.submit({**BODY, "callback_url": f"{hook}/hook"})
        task_id = response.json()["data"]["task_id"]
        await service.wait(task_id)
        await receiver.wait_for(1)
        final = (await service.status(task_id)).json()
        await asyncio.sleep(0.3)  # nothing more may arrive
        [row] = await callback_rows(service)
    assert receiver.attempts == 3
    assert receiver.bodies == [final]
    assert row.state == "delivered" and row.attempts == 3


async def test_a_gone_receiver_is_not_retried(tmp_path: Path, tiny_engine: Engine) -> None:
    receiver = Receiver(fail=100, status_code=410)
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(make_settings(tmp_path / "data"), engine=tiny_engine) as service,
    ):
        response = await service.submit({**BODY, "callback_url": f"{hook}/hook"})
        await service.wait(response.json()["data"]["task_id"])
        for _ in range(100):
            rows = await callback_rows(service)
            if rows and rows[0].state != "pending":
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.4)
    assert receiver.attempts == 1
    assert rows[0].state == "failed" and rows[0].last_error == "HTTP 410"


async def test_dead_and_hanging_receivers_are_given_up_after_the_schedule(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    hang_calls = 0

    async def hang(_: Request) -> Response:
        nonlocal hang_calls
        hang_calls += 1
        await asyncio.sleep(5)
        return JSONResponse({})

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    settings = make_settings(
        tmp_path / "data", callback_timeout=0.3, callback_retry_delays=[0.05, 0.05]
    )
    async with (
        serve_asgi(Starlette(routes=[Route("/hook", hang, methods=["POST"])])) as slow,
        run_service(settings, engine=tiny_engine) as service,
    ):
        healthy = Receiver()
        async with serve_asgi(healthy.app()) as good:
            ids = []
            for url in (f"http://127.0.0.1:{dead_port}/hook", f"{slow}/hook", f"{good}/hook"):
                response = await service.submit({**BODY, "callback_url": url})
                ids.append(response.json()["data"]["task_id"])
            for task_id in ids:
                assert (await service.wait(task_id))["status"] == "finished"
            await healthy.wait_for(1)
            for _ in range(200):
                rows = await callback_rows(service)
                if all(r.state != "pending" for r in rows):
                    break
                await asyncio.sleep(0.05)
    by_task = {r.task_id: r for r in rows}
    dead, slow_row, good_row = (by_task[i] for i in ids)
    assert dead.state == "failed" and dead.attempts == 3
    assert "ConnectError" in dead.last_error
    assert slow_row.state == "failed" and slow_row.attempts == 3
    assert slow_row.last_error == "timed out after 0.3s"
    assert hang_calls == 3
    assert good_row.state == "delivered" and good_row.attempts == 1
