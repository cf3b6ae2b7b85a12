"""A worker cannot die silently: what a task raises fails that task, and what ends the
worker's loop ends the process loudly, with /health and /ready saying so.

(An engine raising a BaseException mid-run: test_end_to_end.py, `explode`.)"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from PIL import Image

from fluxserve.engines.base import Engine, GenerationRequest, ProgressCallback
from fluxserve.tasks import TaskStatus

from conftest import ended, make_settings, queue_task, run_service
from hooked_engine import Hooked


class Panic(BaseException):
    """What a library written in Rust raises when it panics: not an Exception."""


async def test_the_tokenizers_panic_on_a_long_run_of_spaces_fails_only_that_task(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    # The byte-level BPE pre-tokenizer's regex gives up after 10 million retries
    # and the Rust library panics. Queued through the store: submit refuses it.
    settings = make_settings(tmp_path / "data")
    async with run_service(settings, engine=tiny_engine, in_process=True) as service:
        store = service.runtime.store
        poisoned = await queue_task(store, prompt="a cat" + " " * 10_000_000)
        plain = await queue_task(store, prompt="a calm sea")
        failed, finished = await ended(store, poisoned), await ended(store, plain)
    assert failed.status is TaskStatus.FAILED
    assert failed.error_message is not None
    assert failed.error_message.startswith("Internal error: PanicException: ")
    assert "retry-limit-in-match" in failed.error_message
    assert finished.status is TaskStatus.FINISHED


class FailsToLoad:
    """An engine whose load raises a BaseException, as a native library's panic does."""

    name = "tiny"

    def load(self) -> None:
        raise Panic("no CUDA device matches the build")

    def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback
    ) -> list[Image.Image]:
        raise AssertionError("never loaded")


async def test_a_worker_that_cannot_load_is_reported_loudly_and_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL)
    settings = make_settings(tmp_path / "data")
    async with run_service(settings, engine=FailsToLoad(), in_process=True) as service:
        await service.runtime.wait_for_failure()
        health = await service.client.get("/health")
        ready = await service.client.get("/ready")
    reason = "engine failed to load: Panic: no CUDA device matches the build"
    assert health.status_code == 503
    assert health.json()["status"] == "failing"
    assert health.json()["worker"] == {"state": "defunct", "engine": "tiny", "error": reason}
    assert ready.status_code == 503
    assert f"this process's worker is defunct: {reason}" in ready.json()["reasons"]
    assert service.runtime.failure == ("worker loop ended: Panic: no CUDA device matches the build")
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any(reason in message for message in critical), critical


async def test_a_loading_worker_is_alive_but_not_ready(tmp_path: Path, tiny_engine: Engine) -> None:
    go = threading.Event()
    engine = Hooked(tiny_engine, before_load=go.wait)
    async with run_service(
        make_settings(tmp_path / "data"), engine=engine, in_process=True
    ) as service:
        try:
            health = await service.client.get("/health")
            loading = await service.client.get("/ready")
        finally:
            go.set()
        task_id = (
            await service.submit({"model": "flux-2-pro", "input": {"prompt": "a calm sea"}})
        ).json()["data"]["task_id"]
        await service.wait(task_id)
        loaded = await service.client.get("/ready")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert loading.status_code == 503
    assert loading.json()["reasons"] == ["this process's worker is starting"]
    assert loaded.status_code == 200 and loaded.json()["reasons"] == []
