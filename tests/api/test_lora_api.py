"""`input.loras` through the API and a worker on the real tiny pipeline: names and URLs,
the status data, the same bytes for the same task, a LoRA that does not fit, what is
refused at submit, GET /api/loras, and batching by LoRAs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub.constants
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.checkpoints import ModelRoute
from fluxserve.engines.tiny import TinyEngine
from fluxserve.errors import InvalidRequest
from fluxserve.lora_rules import LoraRules
from fluxserve.loras import LoraCatalog
from fluxserve.net_policy import NetPolicy
from fluxserve.settings import Settings
from fluxserve.store import Store
from fluxserve.tasks import LoraSpec

from conftest import Service, make_settings, queue_task, run_service, serve_asgi
from tiny_loras import make_lora

PROMPT = "a lighthouse on a cliff"


def body(*loras: dict[str, Any], seed: int = 11) -> dict[str, Any]:
    task_input: dict[str, Any] = {"prompt": PROMPT, "seed": seed}
    if loras:
        task_input["loras"] = list(loras)
    return {"model": "flux-2-pro", "input": task_input}


def lora_settings(tmp_path: Path, lora_dir: Path, **changes: Any) -> Settings:
    return make_settings(tmp_path / "data", lora_dir=lora_dir, **changes)


@pytest.fixture
async def service(
    tmp_path: Path, lora_dir: Path, lora_engine: TinyEngine
) -> AsyncIterator[Service]:
    settings = lora_settings(tmp_path, lora_dir, allow_lora_urls=True)
    async with run_service(settings, engine=lora_engine) as svc:
        yield svc


async def run(service: Service, request: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """Submit and wait; the status data and, when it finished, its image's bytes."""
    answer = await service.submit(request)
    assert answer.status_code == 200, answer.text
    data = await service.wait(answer.json()["data"]["task_id"], within=300)
    if data["status"] != "finished":
        return data, None
    image = await service.client.get(data["files"][0]["file_url"])
    return data, image.content


@pytest.mark.timeout(900)  # eight 1K images on the CPU
async def test_named_and_url_loras_run_and_reproduce(service: Service, lora_dir: Path) -> None:
    plain_data, plain = await run(service, body())
    ink_data, ink = await run(service, body({"name": "ink", "scale": 0.8}))
    assert ink_data["loras"] == [{"name": "ink", "scale": 0.8}]
    assert "loras" not in plain_data
    assert ink is not None and ink != plain
    _, again = await run(service, body({"name": "ink", "scale": 0.8}))
    assert again == ink

    # A LoRA for another base fails saying so; the next task runs with none.
    wide_data, _ = await run(service, body({"name": "wide"}))
    assert wide_data["status"] == "failed"
    assert "LoRA wide does not fit" in wide_data["error_message"]
    assert "made for wide-klein" in wide_data["error_message"]
    _, after = await run(service, body())
    assert after == plain

    # The same file by URL: fetched once for every task, the same image as by name.
    hits: list[str] = []

    async def serve(request: Request) -> Response:
        hits.append(request.url.path)
        return Response((lora_dir / "ink.safetensors").read_bytes())

    app = Starlette(routes=[Route("/ink.safetensors", serve)])
    async with serve_asgi(app) as url:
        lora = {"url": f"{url}/ink.safetensors", "scale": 0.8}
        results = [await run(service, body(lora)) for _ in range(3)]
    assert hits == ["/ink.safetensors"]
    assert [data["status"] for data, _ in results] == ["finished"] * 3
    assert all(image == ink for _, image in results)
    assert results[0][0]["loras"] == [lora]


async def test_get_loras_lists_names_and_base_models(service: Service) -> None:
    answer = await service.client.get("/api/loras", headers=service.auth())
    assert answer.status_code == 200
    data = answer.json()["data"]
    assert data["loras"] == [
        {"name": "ink", "source": "folder", "base_model": "tiny-klein"},
        {"name": "plain", "source": "folder", "base_model": None},
        {"name": "wide", "source": "folder", "base_model": "wide-klein"},
    ]
    assert data["max_loras"] == 4 and data["urls_allowed"] is True
    assert "flux-2-pro" in data["models"]
    assert (await service.client.get("/api/loras")).status_code == 401


BAD_LORAS = [
    ({"name": "nope"}, "unknown LoRA 'nope'; available: ink, plain, wide"),
    ({"name": "ink", "scale": 2.5}, "input.loras[0].scale must be between -2 and 2"),
    ({"name": "ink", "url": "https://example.com/a.safetensors"}, "a name or a url"),
    ({"url": "https://example.com/a.bin"}, "input.loras[0].url must name a .safetensors"),
    ({"url": "ftp://example.com/a.safetensors"}, "input.loras[0].url must be an http(s)"),
    ({"name": "../ink"}, "input.loras[0].name must be a LoRA file's name"),
    ({"name": "ink", "strength": 1}, "input.loras.0.strength"),
]


def message(answer: httpx.Response) -> str:
    assert answer.status_code == 400, answer.text
    text: str = answer.json()["error"]["message"]
    return text


async def test_bad_loras_are_a_400_naming_them(tmp_path: Path, lora_dir: Path) -> None:
    settings = lora_settings(tmp_path, lora_dir, allow_lora_urls=True)
    async with run_service(settings, run_worker=False) as service:
        for lora, expected in BAD_LORAS:
            assert expected in message(await service.submit(body(lora)))


async def test_more_loras_than_allowed_or_the_same_twice_are_a_400(
    tmp_path: Path, lora_dir: Path
) -> None:
    settings = lora_settings(tmp_path, lora_dir, max_loras=1)
    async with run_service(settings, run_worker=False) as service:
        two = await service.submit(body({"name": "ink"}, {"name": "plain"}))
        assert "at most 1 LoRAs" in message(two)
        settings = settings.model_copy(update={"max_loras": 2})
    async with run_service(settings, run_worker=False) as service:
        twice = await service.submit(body({"name": "ink"}, {"name": "ink", "scale": 0.5}))
        assert "repeats 'ink'" in message(twice)


async def test_url_loras_are_refused_by_default_and_private_ones_when_allowed(
    tmp_path: Path, lora_dir: Path
) -> None:
    url = {"url": "http://127.0.0.1:9/a.safetensors"}
    defaults = Settings(data_dir=tmp_path / "data", lora_dir=lora_dir)
    async with run_service(defaults, run_worker=False) as service:
        assert "allow_lora_urls" in message(await service.submit(body(url)))
    allowed = defaults.model_copy(update={"allow_lora_urls": True})
    async with run_service(allowed, run_worker=False) as service:
        private = message(await service.submit(body(url)))
    assert "input.loras[0].url is not allowed" in private
    assert "private networks are not allowed" in private


def test_a_route_whose_engine_cannot_load_loras_refuses_them(
    lora_dir: Path, tmp_path: Path
) -> None:
    settings = lora_settings(tmp_path, lora_dir)
    # An engine that runs no diffusers pipeline, as an upstream API would be.
    upstream = ModelRoute.model_construct(**{**ModelRoute().model_dump(), "engine": "upstream"})
    settings.models["flux-2-pro"] = upstream
    rules = LoraRules(settings, NetPolicy())
    with pytest.raises(InvalidRequest, match="not accepted by flux-2-pro: its engine"):
        rules.check("flux-2-pro", [LoraSpec(name="ink")])
    rules.check("flux-2-flex", [LoraSpec(name="ink")])


def test_each_lora_adds_its_price(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, prices={"flux-2-pro": {"1K": 5}}, lora_price=2)
    assert settings.price("flux-2-pro", "1K") == 5
    assert settings.price("flux-2-pro", "1K", loras=2) == 9


async def test_a_batch_holds_only_tasks_with_the_same_loras_and_scales(store: Store) -> None:
    ink, half = (LoraSpec(name="ink"),), (LoraSpec(name="ink", scale=0.5),)
    a = await queue_task(store, loras=ink)
    b = await queue_task(store)
    c = await queue_task(store, loras=half)
    d = await queue_task(store, loras=ink)
    e = await queue_task(store)
    claimed = []
    for _ in range(3):
        claims = await store.claim_batch(["flux-2-pro"], "w1", 30, limit=3, window=8)
        claimed.append([claim.task.task_id for claim in claims])
        assert all(claim.task.input.loras == claims[0].task.input.loras for claim in claims)
    assert claimed == [[a, d], [b, e], [c]]


def cache_repo(hub: Path, repo: str, files: dict[str, str]) -> Path:
    """`repo` in a Hugging Face cache at `hub`, as a download leaves it; its snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def test_a_lora_in_the_hugging_face_cache_is_found_by_repo_id(
    tmp_path: Path, lora_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    card = "---\nbase_model: someone/tiny-klein\ntags: [lora]\n---\n# Ink\n"
    snapshot = cache_repo(hub, "someone/ink-lora", {"README.md": card})
    make_lora(snapshot / "pytorch_lora_weights.safetensors", 1, base_model=None)
    cache_repo(hub, "someone/a-pipeline", {"model_index.json": "{}"})
    catalog = LoraCatalog(lora_dir)
    assert catalog.names() == ["ink", "plain", "wide", "someone/ink-lora"]
    found = catalog.find("someone/ink-lora")
    assert found is not None and found.source == "huggingface"
    assert found.base_model == "someone/tiny-klein"
    assert found.path == snapshot / "pytorch_lora_weights.safetensors"
    assert catalog.find("someone/a-pipeline") is None
    assert catalog.find("someone/not-cached") is None
