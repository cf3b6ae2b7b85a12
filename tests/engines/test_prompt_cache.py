"""Prompt-embedding reuse, on the real tiny [klein] and [dev] pipelines.

The text encoders' calls are counted with a wrapper around their `forward`;
images are compared byte for byte with the cache on and off.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from PIL import Image
from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from fluxserve.engines import make_engine
from fluxserve.engines.base import Engine, GenerationRequest
from fluxserve.engines.diffusers import DiffusersEngine
from fluxserve.engines.prompts import PromptCache
from fluxserve.engines.routed import RoutedEngine
from fluxserve.engines.tiny import TinyEngine, build_tiny_pipeline

from conftest import make_settings

SIZE = 64


def count_forwards(monkeypatch: pytest.MonkeyPatch, model_class: type[Any]) -> list[int]:
    """Count every forward of `model_class`, on every instance (one entry per call)."""
    calls: list[int] = []
    real: Callable[..., Any] = model_class.forward

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "forward", counted)
    return calls


def draw(engine: Engine, prompt: str = "a lighthouse at dusk", **fields: Any) -> Image.Image:
    request = GenerationRequest(prompt, SIZE, SIZE, seed=7, steps=1, **fields)
    return engine.generate(request, lambda done, total: None)[0]


@pytest.fixture(scope="module")
def klein_pipeline() -> Flux2KleinPipeline:
    return build_tiny_pipeline()


def diffusers_engine(tmp_path: Path, models: dict[str, Any], **settings: Any) -> RoutedEngine:
    built = make_engine(
        make_settings(tmp_path / "data", engine="diffusers", models=models, **settings),
        list(models),
    )
    assert isinstance(built, RoutedEngine)
    built.load()
    return built


# --- the cache itself, on the real klein pipeline ---------------------------------


def test_a_repeated_prompt_is_not_encoded_again(
    klein_pipeline: Flux2KleinPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = count_forwards(monkeypatch, Qwen3ForCausalLM)
    cache = PromptCache(4)
    first = cache.embeds(klein_pipeline, "a red fox")
    again = cache.embeds(klein_pipeline, "a red fox")
    assert len(encodes) == 1
    assert again is first


def test_different_prompts_and_options_do_not_collide(klein_pipeline: Flux2KleinPipeline) -> None:
    cache = PromptCache(8)
    fox = cache.embeds(klein_pipeline, "a red fox")
    owl = cache.embeds(klein_pipeline, "a red owl")
    short = cache.embeds(klein_pipeline, "a red fox", max_sequence_length=64)
    assert len(cache) == 3
    assert not torch.equal(fox, owl)
    assert short.shape[1] == 64 and fox.shape[1] == 512
    fresh, _ = klein_pipeline.encode_prompt(prompt="a red owl", device=torch.device("cpu"))
    assert torch.equal(owl, fresh)


def test_the_least_recent_prompt_is_dropped_at_the_bound(
    klein_pipeline: Flux2KleinPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = count_forwards(monkeypatch, Qwen3ForCausalLM)
    cache = PromptCache(2)
    for prompt in ("one", "two", "one", "three"):  # "one" used again: "two" is oldest
        cache.embeds(klein_pipeline, prompt)
    assert len(cache) == 2
    assert len(encodes) == 3
    cache.embeds(klein_pipeline, "one")
    assert len(encodes) == 3
    cache.embeds(klein_pipeline, "two")
    assert len(encodes) == 4
    assert len(cache) == 2


# --- through the engines: the same pixels, fewer encodes ---------------------------


def test_tiny_engine_same_pixels_and_no_second_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    cached, plain = TinyEngine(prompt_cache_size=8), TinyEngine(prompt_cache_size=0)
    encodes = count_forwards(monkeypatch, Qwen3ForCausalLM)
    first = draw(cached)
    assert len(encodes) == 2  # the prompt, and the empty negative prompt of guidance
    again = draw(cached)
    assert len(encodes) == 2
    reference = draw(plain)
    assert first.tobytes() == again.tobytes() == reference.tobytes()
    assert draw(cached, "another prompt").tobytes() != first.tobytes()


def test_diffusers_klein_same_pixels_with_and_without_the_cache(
    tmp_path: Path, klein_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"flux-2-pro": {"checkpoint": str(klein_dir), "steps": 1}}
    cached = diffusers_engine(tmp_path / "on", models, prompt_cache_size=8)
    plain = diffusers_engine(tmp_path / "off", models, prompt_cache_size=0)
    encodes = count_forwards(monkeypatch, Qwen3ForCausalLM)
    for guidance in (1.0, 4.0):  # without and with classifier-free guidance
        first = draw(cached, model="flux-2-pro", guidance=guidance)
        again = draw(cached, model="flux-2-pro", guidance=guidance)
        reference = draw(plain, model="flux-2-pro", guidance=guidance)
        assert first.tobytes() == again.tobytes() == reference.tobytes()
    # Cached: the prompt and the empty negative prompt, once each. Plain: every call.
    assert len(encodes) == 2 + 3


def test_diffusers_dev_same_pixels_with_and_without_the_cache(
    tmp_path: Path, dev_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = {"checkpoint": str(dev_dir), "pipeline": "Flux2Pipeline", "steps": 1}
    models = {"flux-2-pro": route}
    cached = diffusers_engine(tmp_path / "on", models, prompt_cache_size=8)
    plain = diffusers_engine(tmp_path / "off", models, prompt_cache_size=0)
    encodes = count_forwards(monkeypatch, Mistral3ForConditionalGeneration)
    first = draw(cached, model="flux-2-pro")
    again = draw(cached, model="flux-2-pro")
    assert len(encodes) == 1  # [dev] is guidance-distilled: no negative prompt
    reference = draw(plain, model="flux-2-pro")
    assert first.tobytes() == again.tobytes() == reference.tobytes()
    edit = draw(cached, model="flux-2-pro", images=(Image.new("RGB", (64, 64), "red"),))
    assert len(encodes) == 2  # the same prompt with a reference image: still cached
    assert edit.tobytes() != first.tobytes()


def test_an_unloaded_pipeline_takes_its_embeddings_with_it(
    tmp_path: Path, klein_dir: Path, dev_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {
        "flux-2-pro": {"checkpoint": str(klein_dir), "steps": 1},
        "flux-2-flex": {"checkpoint": str(dev_dir), "pipeline": "Flux2Pipeline", "steps": 1},
    }
    routed = diffusers_engine(tmp_path, models, prompt_cache_size=8, max_loaded_pipelines=1)
    engine = routed.engines["flux-2-pro"]
    assert isinstance(engine, DiffusersEngine)
    kept: list[weakref.ref[torch.Tensor]] = []
    real_encode = Flux2KleinPipeline.encode_prompt

    def encode(self: Any, *args: Any, **kwargs: Any) -> Any:
        embeds, text_ids = real_encode(self, *args, **kwargs)
        kept.append(weakref.ref(embeds))
        return embeds, text_ids

    monkeypatch.setattr(Flux2KleinPipeline, "encode_prompt", encode)
    encodes = count_forwards(monkeypatch, Qwen3ForCausalLM)
    draw(routed, model="flux-2-pro")
    assert len(encodes) == 2  # the prompt and the empty negative prompt
    draw(routed, model="flux-2-flex")  # unloads klein
    gc.collect()
    assert [key[0] for key in engine.loaded] == [str(dev_dir)]
    assert all(ref() is None for ref in kept)
    draw(routed, model="flux-2-pro")  # loaded again: encoded again
    assert len(encodes) == 4
