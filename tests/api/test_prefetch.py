"""A task's reference images download while the engine runs other tasks: a slow
reference host holds up only the task that names it."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.engines.base import Engine
from fluxserve.tasks import TaskStatus

from conftest import Service, ended, make_settings, run_service, serve_asgi

PATIENT = 300.0
"""A fetch timeout past any plain task's run on a busy machine: the slow host's task
must still be fetching when the plain tasks have finished."""


class SlowReference:
    """A reference host that answers only once the test opens its gate."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.gate = asyncio.Event()

    async def image(self, _: Request) -> Response:
        self.asked.set()
        await self.gate.wait()
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Its URL; the gate opens on the way out, so that no request outlives the server."""
        async with serve_asgi(Starlette(routes=[Route("/slow.png", self.image)])) as url:
            try:
                yield f"{url}/slow.png"
            finally:
                self.gate.set()


async def submit(service: Service, **inputs: Any) -> str:
    model = "flux-2-flex-edit" if "image_urls" in inputs else "flux-2-flex"
    body = {"model": model, "input": {"prompt": "a harbour at noon", "steps": 2, **inputs}}
    response = await service.submit(body)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"]["task_id"]
    return task_id


async def test_a_plain_task_runs_while_the_task_ahead_of_it_fetches(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    reference = SlowReference()
    async with (
        reference.serving() as url,
        run_service(
            make_settings(tmp_path / "data", fetch_timeout=PATIENT),
            engine=tiny_engine,
            in_process=True,
        ) as service,
    ):
        slow = await submit(service, image_urls=[url])
        await reference.asked.wait()
        plain = await submit(service)
        plain_done = await service.wait(plain)
        # The slow host has not answered yet: its task is still fetching.
        fetching = (await service.status(slow)).json()["data"]
        reference.gate.set()
        slow_done = await service.wait(slow)
    assert plain_done["status"] == "finished", plain_done
    assert fetching["status"] == "running", fetching
    assert slow_done["status"] == "finished", slow_done


async def test_a_batch_of_plain_tasks_runs_while_the_task_ahead_of_it_fetches(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    reference = SlowReference()
    settings = make_settings(tmp_path / "data", max_batch_size=3, fetch_timeout=PATIENT)
    async with (
        reference.serving() as url,
        run_service(settings, engine=tiny_engine, in_process=True) as service,
    ):
        slow = await submit(service, image_urls=[url])
        await reference.asked.wait()
        plain = [await submit(service, seed=seed) for seed in (1, 2)]
        plain_done = [await service.wait(task_id) for task_id in plain]
        fetching = (await service.status(slow)).json()["data"]
        reference.gate.set()
        slow_done = await service.wait(slow)
    assert [data["status"] for data in plain_done] == ["finished"] * 2
    assert [data["seed"] for data in plain_done] == [1, 2]
    assert fetching["status"] == "running", fetching
    assert slow_done["status"] == "finished", slow_done


async def test_cancelling_a_task_while_it_fetches_fails_it_as_cancelled(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    reference = SlowReference()
    async with (
        reference.serving() as url,
        run_service(
            make_settings(tmp_path / "data"), engine=tiny_engine, in_process=True
        ) as service,
    ):
        slow = await submit(service, image_urls=[url])
        await reference.asked.wait()
        cancel = await service.client.post(f"/api/generate/cancel/{slow}", headers=service.auth())
        done = await service.wait(slow)
        plain = await service.wait(await submit(service))
    assert cancel.status_code == 200, cancel.text
    assert done["status"] == "failed"
    assert done["error_message"] == "Task was cancelled"
    assert done["files"] == []
    assert plain["status"] == "finished", plain


async def test_stopping_the_worker_while_it_fetches_hands_the_task_back(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    settings = make_settings(tmp_path / "data")
    reference = SlowReference()
    async with reference.serving() as url:
        async with run_service(settings, engine=tiny_engine, in_process=True) as service:
            slow = await submit(service, image_urls=[url])
            await reference.asked.wait()
        async with run_service(settings, run_worker=False, in_process=True) as stopped:
            handed_back = await stopped.runtime.store.get_task(slow)
        reference.gate.set()
        async with run_service(settings, engine=tiny_engine, in_process=True) as restarted:
            task = await ended(restarted.runtime.store, slow)
    assert handed_back is not None
    assert handed_back.status is TaskStatus.NOT_STARTED
    assert task.status is TaskStatus.FINISHED, task.error_message
