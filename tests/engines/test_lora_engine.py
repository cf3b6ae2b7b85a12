"""LoRAs on the real tiny pipeline: applied, combined, switched, refused when they do
not fit, kept warm within their memory bound, and hot-swapped in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fluxserve.engines.base import GenerationRequest, LoraWeights
from fluxserve.engines.lora_adapters import LoraAdapters
from fluxserve.engines.tiny import TinyEngine
from fluxserve.errors import EngineError

SIZE = 64


def lora(folder: Path, name: str, scale: float = 1.0) -> LoraWeights:
    return LoraWeights(key=name, path=folder / f"{name}.safetensors", scale=scale, label=name)


def draw(engine: TinyEngine, *loras: LoraWeights, seed: int = 5) -> np.ndarray:
    request = GenerationRequest("a lighthouse", SIZE, SIZE, seed=seed, loras=loras)
    return np.asarray(engine.generate(request, lambda done, total: None)[0])


def test_a_lora_changes_the_image_and_scale_zero_does_not(
    lora_engine: TinyEngine, lora_dir: Path
) -> None:
    plain = draw(lora_engine)
    with_a = draw(lora_engine, lora(lora_dir, "ink"))
    assert (with_a != plain).any()
    assert np.array_equal(draw(lora_engine, lora(lora_dir, "ink", 0.0)), plain)
    assert np.array_equal(draw(lora_engine), plain)  # nothing stays active after a LoRA task


def test_two_loras_combine_and_switching_back_gives_the_same_image(
    lora_engine: TinyEngine, lora_dir: Path
) -> None:
    a, b = lora(lora_dir, "ink"), lora(lora_dir, "plain")
    with_a = draw(lora_engine, a)
    assert lora_engine.adapters is not None
    base = lora_engine.adapters.pipeline.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    weight, before = base.base_layer.weight, base.base_layer.weight.detach().clone()
    with_b = draw(lora_engine, b)
    both = draw(lora_engine, a, b)
    assert not np.array_equal(with_a, with_b)
    assert not np.array_equal(both, with_a) and not np.array_equal(both, with_b)
    assert np.array_equal(draw(lora_engine, a), with_a)
    assert np.array_equal(draw(lora_engine, a, b), both)
    half = draw(lora_engine, a, lora(lora_dir, "plain", 0.5))
    assert not np.array_equal(half, both) and not np.array_equal(half, with_a)
    # The base model's weights were neither reloaded nor changed by the switches.
    assert base.base_layer.weight is weight and torch.equal(weight, before)


def test_a_lora_for_another_base_fails_and_leaves_nothing_loaded(
    lora_engine: TinyEngine, lora_dir: Path
) -> None:
    plain, with_a = draw(lora_engine), draw(lora_engine, lora(lora_dir, "ink"))
    with pytest.raises(EngineError) as caught:
        draw(lora_engine, lora(lora_dir, "wide"))
    message = str(caught.value)
    assert "LoRA wide does not fit the tiny FLUX.2 [klein] pipeline" in message
    assert "made for wide-klein" in message and "32 wide where this model's is 16" in message
    assert lora_engine.adapters is not None
    assert not any("wide" in name for name in lora_engine.adapters.loaded)
    assert "wide" not in str(lora_engine.adapters.pipeline.get_list_adapters())
    assert np.array_equal(draw(lora_engine), plain)
    assert np.array_equal(draw(lora_engine, lora(lora_dir, "ink")), with_a)


def test_adapters_past_the_memory_bound_unload_least_recent_first(lora_dir: Path) -> None:
    small = TinyEngine(steps=1, lora_memory_bytes=1)  # room for the current task's only
    small.load()
    a, b = lora(lora_dir, "ink"), lora(lora_dir, "plain")
    with_a = draw(small, a)
    draw(small, b)
    assert small.adapters is not None and small.adapters.loaded == ["lora_plain"]
    assert np.array_equal(draw(small, a), with_a)
    assert small.adapters.loaded == ["lora_ink"]


@pytest.mark.timeout(600)  # two pipelines, a dozen images, on a shared CPU
def test_hotswapped_slots_draw_what_resident_adapters_draw(
    lora_engine: TinyEngine, lora_dir: Path
) -> None:
    a, b = lora(lora_dir, "ink"), lora(lora_dir, "plain")
    engine = lora_engine
    expected = [draw(engine, a), draw(engine, b), draw(engine, a, b), draw(engine)]
    hot = TinyEngine(steps=1)
    hot.load()
    assert hot.adapters is not None
    pipeline = hot.adapters.pipeline
    hot.adapters = LoraAdapters(pipeline, base="tiny", memory_bytes=1 << 30, hotswap_rank=8)
    for _ in range(2):
        got = [draw(hot, a), draw(hot, b), draw(hot, a, b), draw(hot)]
        assert all(np.array_equal(x, y) for x, y in zip(got, expected, strict=True))
    assert hot.adapters.loaded == ["slot0", "slot1"]  # swapped in place, never added
    with pytest.raises(EngineError, match="does not fit"):
        draw(hot, lora(lora_dir, "wide"))
    assert np.array_equal(draw(hot, b), expected[1])
