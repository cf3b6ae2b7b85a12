"""fluxserve.client against a live fluxserve: every operation, errors and retries."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from fluxserve.client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    Client,
    InsufficientCreditsError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    TaskData,
    TaskFailedError,
    TaskLora,
    TaskStatus,
    WaitTimeoutError,
)
from fluxserve.engines.base import Engine
from fluxserve.protocol import WireModel

from conftest import Service, make_settings, run_service
from flaky import FlakyProxy

PROMPT = "a red fox in fresh snow"


def png(width: int = 96, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def declared_only(model: WireModel) -> None:
    """Every field the server wrote is one the shared models declare: no drift."""
    assert not model.model_extra, f"undeclared fields: {model.model_extra}"
    for value in model.__dict__.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, WireModel):
                declared_only(item)


@pytest.fixture
async def service(tmp_path: Path, tiny_engine: Engine) -> AsyncIterator[Service]:
    async with run_service(make_settings(tmp_path / "data"), engine=tiny_engine) as svc:
        yield svc


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Service]:
    """No worker: tasks stay queued."""
    settings = make_settings(tmp_path / "data", prices={"flux-2-pro": {"2K": 5}})
    async with run_service(settings, run_worker=False) as svc:
        yield svc


async def test_generate_gives_the_image_its_seed_and_task(service: Service) -> None:
    seen: list[tuple[TaskStatus, int]] = []
    async with AsyncClient(service.url, service.key, poll_interval=0.05) as client:
        image = await client.generate(
            PROMPT,
            size="16:9",
            seed=7,
            on_progress=lambda task: seen.append((task.status, task.progress)),
        )
        again = await client.status(image.task_id)

    picture = Image.open(io.BytesIO(bytes(image)))
    assert (picture.format, picture.size) == ("PNG", (1360, 768))
    assert image.seed == 7 and image.content_type == "image/png"
    assert image.task.status is TaskStatus.FINISHED and again == image.task
    assert seen[-1] == (TaskStatus.FINISHED, 100)
    assert [p for _, p in seen] == sorted(p for _, p in seen)
    declared_only(again)


async def test_submit_wait_download_upload_history_balance(service: Service) -> None:
    async with AsyncClient(service.url, service.key, poll_interval=0.05) as client:
        upload = await client.upload(png(), file_name="ref.png")
        assert upload.mime_type == "image/png" and upload.file_size == len(png())
        submitted = await client.submit(
            "flux-2-pro-edit", PROMPT, image_urls=[upload.file_url], seed=3, output_format="webp"
        )
        assert submitted.status is TaskStatus.NOT_STARTED
        done = await client.wait(submitted.task_id, timeout=120)
        assert done.status is TaskStatus.FINISHED and done.seed == 3
        webp = Image.open(io.BytesIO(await client.download(done)))
        assert (webp.format, webp.size) == ("WEBP", (done.width, done.height))

        second = await client.submit("flux-2-pro", PROMPT)
        await client.wait(second.task_id, timeout=120)
        first_page = await client.tasks(limit=1)
        assert [t.task_id for t in first_page.tasks] == [second.task_id]
        assert first_page.next_cursor is not None
        rest = await client.tasks(limit=1, cursor=first_page.next_cursor)
        assert [t.task_id for t in rest.tasks] == [submitted.task_id]
        balance = await client.balance()
        assert balance.credits_amount == 0 and balance.held_credits == 0
    for model in (upload, submitted, done, first_page, balance):
        declared_only(model)


async def test_the_sync_client_does_the_same(service: Service, tmp_path: Path) -> None:
    reference = tmp_path / "cat.png"
    reference.write_bytes(png())

    def run() -> tuple[str, bytes, TaskData]:
        with Client(service.url, service.key, poll_interval=0.05) as client:
            upload = client.upload(reference)
            image = client.generate(
                PROMPT, model="flux-2-pro-edit", image_urls=[upload.file_url], size="1:1"
            )
            return upload.file_name or "", image.data, client.status(image.task_id)

    name, data, task = await asyncio.to_thread(run)
    assert name == "cat.png"
    assert Image.open(io.BytesIO(data)).size == (1024, 1024)
    assert task.status is TaskStatus.FINISHED and task.model == "flux-2-pro-edit"


@pytest.mark.timeout(600)  # two 1K images on the CPU
async def test_a_named_lora_changes_the_image_and_is_listed(
    tmp_path: Path, lora_dir: Path, lora_engine: Engine
) -> None:
    settings = make_settings(tmp_path / "data", lora_dir=lora_dir)
    async with (
        run_service(settings, engine=lora_engine) as svc,
        AsyncClient(svc.url, svc.key, poll_interval=0.05) as client,
    ):
        plain = await client.generate(PROMPT, size="1:1", seed=5)
        inked = await client.generate(
            PROMPT, size="1:1", seed=5, loras=[{"name": "ink", "scale": 0.8}]
        )
        status = await client.status(inked.task_id)

        def listed() -> list[str]:
            with Client(svc.url, svc.key) as sync_client:
                return [lora.name for lora in sync_client.loras().loras]

        names = await asyncio.to_thread(listed)
        catalog = await client.loras()
    assert status.loras == [TaskLora(name="ink", scale=0.8)] and plain.task.loras is None
    assert inked.data != plain.data
    assert "ink" in names and names == [lora.name for lora in catalog.loras]
    assert catalog.urls_allowed is False and "flux-2-pro" in catalog.models
    declared_only(status)
    declared_only(catalog)


async def test_cancel_and_a_wait_that_times_out(queue: Service) -> None:
    async with AsyncClient(queue.url, queue.key, poll_interval=0.05) as client:
        task = await client.submit("flux-2-pro", PROMPT)
        with pytest.raises(WaitTimeoutError) as timed_out:
            await client.wait(task.task_id, timeout=0.3)
        assert timed_out.value.task is not None
        assert timed_out.value.task.status is TaskStatus.NOT_STARTED
        assert timed_out.value.task.queue_position == 1
        declared_only(timed_out.value.task)
        cancelled = await client.cancel(task.task_id)
        assert cancelled.status is TaskStatus.FAILED and cancelled.cancelled
        ended = await client.wait(task.task_id, timeout=10)
        assert ended.error_message == "Task was cancelled"
        declared_only(cancelled)


async def test_errors_carry_the_servers_words(queue: Service) -> None:
    other = await queue.new_key("other")
    async with AsyncClient(queue.url, queue.key) as client:
        with pytest.raises(InvalidRequestError, match=r"input\.size must be one of") as bad:
            await client.submit("flux-2-pro", PROMPT, size="5:4")
        assert bad.value.status_code == 400
        with pytest.raises(NotFoundError):
            await client.status("task-unified-1-missing0")
        with pytest.raises(InsufficientCreditsError):
            await client.submit("flux-2-pro", PROMPT, resolution="2K")
        mine = await client.submit("flux-2-pro", PROMPT)
    async with AsyncClient(queue.url, other) as intruder:
        with pytest.raises(PermissionDeniedError, match="another user"):
            await intruder.status(mine.task_id)
    async with AsyncClient(queue.url, "fs-not-a-key") as stranger:
        with pytest.raises(AuthenticationError, match="Invalid API key"):
            await stranger.balance()


async def test_a_failed_task_raises_with_its_message(queue: Service) -> None:
    async with AsyncClient(queue.url, queue.key, poll_interval=0.05) as client:
        seen: list[TaskData] = []
        submitted = asyncio.Event()
        generating = asyncio.create_task(
            client.generate(PROMPT, on_progress=lambda t: (seen.append(t), submitted.set()))
        )
        await submitted.wait()
        await client.cancel(seen[0].task_id)
        with pytest.raises(TaskFailedError, match="Task was cancelled") as failed:
            await generating
    assert failed.value.task.task_id == seen[0].task_id


async def test_rate_limit_says_when_to_retry(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", rate_limit_per_minute=1)
    async with (
        run_service(settings, run_worker=False) as queue,
        AsyncClient(queue.url, queue.key) as client,
    ):
        await client.submit("flux-2-pro", PROMPT)
        with pytest.raises(RateLimitError) as limited:
            await client.submit("flux-2-pro", PROMPT)
    assert limited.value.retry_after is not None and limited.value.retry_after >= 1


async def test_a_submit_whose_answer_was_lost_is_retried_once_under_its_key(
    queue: Service,
) -> None:
    drop = {"/api/generate/submit": 1}
    async with (
        FlakyProxy(queue.url, drop_after_forwarding=drop) as proxy,
        AsyncClient(proxy.url, queue.key) as client,
    ):
        task = await client.submit("flux-2-pro", PROMPT)
        page = await client.tasks()
    assert proxy.forwarded["/api/generate/submit"] == 2, "the server saw the submit twice"
    assert [t.task_id for t in page.tasks] == [task.task_id], "and made one task"


async def test_status_reads_are_retried_after_a_503_and_a_dropped_connection(
    queue: Service,
) -> None:
    task_id = (await queue.submit({"model": "flux-2-pro", "input": {"prompt": PROMPT}})).json()[
        "data"
    ]["task_id"]
    path = f"/api/generate/status/{task_id}"
    async with FlakyProxy(
        queue.url, answer_503={path: 1}, drop_after_forwarding={path: 1}
    ) as proxy:
        async with AsyncClient(proxy.url, queue.key) as client:
            task = await client.status(task_id)
        assert task.status is TaskStatus.NOT_STARTED and proxy.forwarded[path] == 2
        async with AsyncClient(proxy.url, queue.key, max_retries=0) as client:
            proxy.drop_after_forwarding[path] = 1
            with pytest.raises(APIConnectionError):
                await client.status(task_id)


async def test_base_url_and_key_come_from_the_environment(
    queue: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUXSERVE_URL", queue.url)
    monkeypatch.setenv("FLUXSERVE_API_KEY", queue.key)
    async with AsyncClient() as client:
        assert (await client.balance()).credits_amount == 0
    monkeypatch.setenv("FLUXSERVE_URL", "http://127.0.0.1:1/")
    async with AsyncClient(max_retries=0) as client:
        with pytest.raises(APIConnectionError, match=r"127\.0\.0\.1:1/api/user/balance"):
            await client.balance()


def test_the_client_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, fluxserve.client\n"
        "heavy = ('fluxserve.store', 'fluxserve.api', 'fluxserve.runtime', 'fluxserve.settings',"
        " 'fluxserve.tasks', 'torch', 'diffusers', 'fastapi', 'sqlalchemy', 'starlette')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"


def test_the_base_install_brings_the_client_and_no_torch() -> None:
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    needs = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", need, maxsplit=1)[0].lower() for need in needs}
    assert {"httpx", "httpx-sse", "pydantic"} <= names
    assert not names & {"torch", "diffusers", "transformers", "accelerate"}


async def test_wait_follows_the_servers_event_stream(service: Service) -> None:
    seen: list[tuple[TaskStatus, int]] = []
    async with FlakyProxy(service.url) as proxy:
        async with AsyncClient(proxy.url, service.key) as client:
            task = await client.submit("flux-2-pro", PROMPT, size="1:1")
            done = await client.wait(
                task.task_id, timeout=120, on_progress=lambda t: seen.append((t.status, t.progress))
            )

        def sync_wait() -> TaskData:
            with Client(proxy.url, service.key) as sync_client:
                return sync_client.wait(task.task_id, timeout=60)

        again = await asyncio.to_thread(sync_wait)
    assert done.status is TaskStatus.FINISHED and again == done
    assert seen[-1] == (TaskStatus.FINISHED, 100) and len(seen) >= 2
    assert [p for _, p in seen] == sorted(p for _, p in seen)
    stream = f"/api/generate/stream/{task.task_id}"
    assert proxy.forwarded == {"/api/generate/submit": 1, stream: 2}, "no status polling"
