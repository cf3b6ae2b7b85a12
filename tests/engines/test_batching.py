"""Queued tasks of one shape drawn in one pipeline call, on real stores and pipelines.

The pipeline's calls are counted with a wrapper around the real tiny [klein]
pipeline's `__call__`, each entry the size of that call's batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from PIL import Image
from transformers import Qwen3ForCausalLM

from fluxserve.engines.base import Engine, GenerationRequest
from fluxserve.engines.routed import RoutedEngine
from fluxserve.engines.tiny import TinyEngine
from fluxserve.store import Store
from fluxserve.store.base import LeaseState
from fluxserve.tasks import TaskStatus

from conftest import Receiver, Service, make_settings, queue_task, run_service, serve_asgi
from hooked_engine import HookedBatch

# Measured on the tiny pipeline at 256x256 (CPU, float32): a batch of three
# changed 2 to 5 of 196608 channel values, each by 1 of 255, against the same
# seeds drawn alone. At 64x64 none changed.
MAX_BATCH_DIFFERENCE = 1
MAX_DIFFERING_SHARE = 1e-3


async def claim_ids(store: Store, limit: int = 3, window: int = 8) -> list[str]:
    claims = await store.claim_batch(
        ["flux-2-pro", "flux-2-flex"], "w1", 30, limit=limit, window=window
    )
    return [claim.task.task_id for claim in claims]


# --- the store's claim ---------------------------------------------------------------


async def test_a_batch_takes_only_tasks_of_the_heads_shape_in_queue_order(store: Store) -> None:
    a = await queue_task(store)
    b = await queue_task(store, steps=8)
    c = await queue_task(store, "flux-2-flex")
    d = await queue_task(store)
    e = await queue_task(store, image_urls=("https://example.com/jar.png",))
    f = await queue_task(store)
    g = await queue_task(store)
    assert await claim_ids(store) == [a, d, f]
    for task_id in (a, d, f):
        task = await store.get_task(task_id)
        assert task is not None and task.status is TaskStatus.RUNNING and task.attempts == 1
    assert await claim_ids(store) == [b]  # other steps
    assert await claim_ids(store) == [c]  # other model
    assert await claim_ids(store) == [e]  # an edit: never batched
    assert await claim_ids(store) == [g]
    assert await claim_ids(store) == []


async def test_a_batch_looks_only_at_the_front_of_the_queue(store: Store) -> None:
    first = await queue_task(store)
    await queue_task(store, steps=8)
    await queue_task(store, steps=8)
    await queue_task(store)
    assert await claim_ids(store, window=2) == [first]


async def test_each_task_of_a_batch_keeps_its_own_lease(store: Store) -> None:
    for _ in range(3):
        await queue_task(store)
    claims = await store.claim_batch(["flux-2-pro"], "w1", 30, limit=3, window=8)
    assert len(claims) == 3
    assert await store.fail_task(claims[0], "one of them")
    assert await store.release_task(claims[1])
    assert not await store.fail_task(claims[0], "twice")
    assert await store.report_progress(claims[2], 50, 30) is LeaseState.HELD


async def test_concurrent_batches_never_share_a_task(store: Store) -> None:
    ids = [await queue_task(store) for _ in range(20)]
    batches = await asyncio.gather(
        *(store.claim_batch(["flux-2-pro"], f"w{i}", 30, limit=3, window=12) for i in range(10))
    )
    claimed = [claim.task.task_id for batch in batches for claim in batch]
    for batch in batches:
        in_batch = [claim.task.task_id for claim in batch]
        assert in_batch == sorted(in_batch, key=ids.index)
    while rest := await store.claim_batch(["flux-2-pro"], "w", 30, limit=3, window=12):
        claimed += [claim.task.task_id for claim in rest]
    assert sorted(claimed) == sorted(ids)


# --- the engines -------------------------------------------------------------------


def request(seed: int, prompt: str = "a lighthouse at dusk", size: int = 256) -> GenerationRequest:
    return GenerationRequest(prompt, size, size, seed=seed, steps=2, model="flux-2-pro")


def values(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_batched_or_alone_within_the_last_bits(tiny_engine: Engine) -> None:
    routed = RoutedEngine({"flux-2-pro": tiny_engine})
    requests = [request(1, "a red fox"), request(2, "an owl"), request(3, "a red fox")]
    batched = routed.generate_batch(requests, lambda done, total: None)
    assert [len(images) for images in batched] == [1, 1, 1]
    for each, images in zip(requests, batched, strict=True):
        alone = values(routed.generate(each, lambda done, total: None)[0])
        difference = np.abs(values(images[0]) - alone)
        assert difference.max() <= MAX_BATCH_DIFFERENCE
        assert np.count_nonzero(difference) <= MAX_DIFFERING_SHARE * difference.size
    first, second = values(batched[0][0]), values(batched[1][0])
    assert np.abs(first - second).max() > 10  # each image has its own seed


def test_a_batch_encodes_each_distinct_prompt_once(monkeypatch: pytest.MonkeyPatch) -> None:
    forwards: list[int] = []
    real = Qwen3ForCausalLM.forward

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        forwards.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Qwen3ForCausalLM, "forward", counted)
    cached, plain = TinyEngine(prompt_cache_size=8), TinyEngine(prompt_cache_size=0)
    requests = [request(1, "a red fox", 64), request(2, "an owl", 64), request(3, "a red fox", 64)]
    images = cached.generate_batch(requests, lambda done, total: None)
    # The two prompts, and the empty negative prompt of classifier-free guidance.
    assert len(forwards) == 3
    cached.generate_batch(requests, lambda done, total: None)
    assert len(forwards) == 3
    unbatched = plain.generate_batch(requests, lambda done, total: None)
    for with_cache, without in zip(images, unbatched, strict=True):
        assert np.abs(values(with_cache[0]) - values(without[0])).max() <= MAX_BATCH_DIFFERENCE


# --- through the service ------------------------------------------------------------


class Held(HookedBatch):
    """An engine that is not ready until `ready` is set, so tasks queue up first.

    With `pause_at`, its first call waits at that step until `resume` is set.
    """

    def __init__(self, inner: TinyEngine, pause_at: int | None = None) -> None:
        self.ready = threading.Event()
        super().__init__(inner, self.gated, before_load=lambda: self.ready.wait(30))
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.resume = threading.Event()

    def gated(self, _: object, done: int, __: int) -> None:
        if done == self.pause_at and not self.paused.is_set():
            self.paused.set()
            self.resume.wait(30)


@pytest.fixture
def pipeline_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every call of the real [klein] pipeline class."""
    calls: list[int] = []
    real = Flux2KleinPipeline.__call__

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["generator"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Flux2KleinPipeline, "__call__", counted)
    return calls


@pytest.fixture
def held(tiny_engine: Engine) -> Iterator[Held]:
    assert isinstance(tiny_engine, TinyEngine)
    engine = Held(tiny_engine)
    yield engine
    engine.ready.set()
    engine.resume.set()


async def submit(service: Service, seed: int, **fields: Any) -> str:
    body = {
        "model": "flux-2-flex",
        "input": {"prompt": f"a harbour, take {seed}", "seed": seed, "steps": 2},
        **fields,
    }
    response = await service.submit(body)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"]["task_id"]
    return task_id


def batching(tmp_path: Path) -> Any:
    return make_settings(tmp_path / "data", max_batch_size=3)


async def test_three_queued_tasks_run_in_one_pipeline_call(
    tmp_path: Path, held: Held, pipeline_calls: list[int]
) -> None:
    receiver = Receiver()
    seeds = (11, 12, 13)
    async with (
        serve_asgi(receiver.app()) as hook_url,
        run_service(batching(tmp_path), engine=held, in_process=True) as service,
    ):
        ids = [await submit(service, seed, callback_url=f"{hook_url}/hook") for seed in seeds]
        held.ready.set()
        done = [await service.wait(task_id) for task_id in ids]
        await receiver.wait_for(3)
        images = [(await service.client.get(data["files"][0]["file_url"])).content for data in done]
    assert pipeline_calls == [3]
    assert [data["status"] for data in done] == ["finished"] * 3
    assert [data["seed"] for data in done] == list(seeds)
    assert len(set(images)) == 3
    called_back = {body["data"]["task_id"]: body["data"]["seed"] for body in receiver.bodies}
    assert called_back == dict(zip(ids, seeds, strict=True))


async def test_a_task_of_another_shape_is_not_batched(
    tmp_path: Path, held: Held, pipeline_calls: list[int]
) -> None:
    async with run_service(batching(tmp_path), engine=held, in_process=True) as service:
        first = await submit(service, 1)
        other = await submit(service, 2, input={"prompt": "more steps", "steps": 3})
        third = await submit(service, 3)
        held.ready.set()
        done = [await service.wait(task_id) for task_id in (first, other, third)]
    assert [data["status"] for data in done] == ["finished"] * 3
    assert pipeline_calls == [2, 1]


async def test_cancelling_one_task_hands_the_rest_of_its_batch_back(
    tmp_path: Path, held: Held, pipeline_calls: list[int]
) -> None:
    held.pause_at = 1
    async with run_service(batching(tmp_path), engine=held, in_process=True) as service:
        ids = [await submit(service, seed) for seed in (1, 2, 3)]
        held.ready.set()
        assert await asyncio.to_thread(held.paused.wait, 30)
        cancel = await service.client.post(f"/api/generate/cancel/{ids[1]}", headers=service.auth())
        assert cancel.status_code == 200, cancel.text
        held.resume.set()
        done = [await service.wait(task_id) for task_id in ids]
    assert [data["status"] for data in done] == ["finished", "failed", "finished"]
    assert done[1]["error_message"] == "Task was cancelled"
    # Stopped at step 1; the two others ran again, together.
    assert pipeline_calls == [3, 2]


async def test_a_timeout_fails_every_task_of_the_batch(
    tmp_path: Path, held: Held, pipeline_calls: list[int]
) -> None:
    held.pause_at = 1
    settings = make_settings(tmp_path / "data", max_batch_size=3, task_timeout=0.3)
    async with run_service(settings, engine=held, in_process=True) as service:
        ids = [await submit(service, seed) for seed in (1, 2)]
        held.ready.set()
        assert await asyncio.to_thread(held.paused.wait, 30)
        await asyncio.sleep(0.5)
        held.resume.set()
        done = [await service.wait(task_id) for task_id in ids]
    assert [data["status"] for data in done] == ["failed"] * 2
    assert all("task_timeout" in data["error_message"] for data in done)
    assert pipeline_calls == [2]
