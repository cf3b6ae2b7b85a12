"""The tiny engine: the real klein pipeline, random weights, real output sizes."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from fluxserve.engines import tiny
from fluxserve.engines.base import Engine, GenerationRequest
from fluxserve.errors import EngineError


class Cancelled(Exception):
    """What a progress callback raises to stop a task."""


@pytest.fixture(scope="module")
def engine() -> tiny.TinyEngine:
    built = tiny.TinyEngine()
    built.load()
    return built


def draw(
    engine: tiny.TinyEngine, **fields: object
) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """Generate with small defaults; return the images and every progress call."""
    values: dict[str, object] = {
        "prompt": "a lighthouse at dusk",
        "width": 256,
        "height": 256,
        "seed": 7,
    }
    values.update(fields)
    calls: list[tuple[int, int]] = []
    images = engine.generate(
        GenerationRequest(**values),  # type: ignore[arg-type]
        lambda done, total: calls.append((done, total)),
    )
    return images, calls


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


def test_is_an_engine_named_tiny() -> None:
    port: Engine = tiny.TinyEngine()
    assert port.name == "tiny"


@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (1360, 768), (768, 1360)])
def test_output_has_exactly_the_requested_size(
    engine: tiny.TinyEngine, width: int, height: int
) -> None:
    images, _ = draw(engine, width=width, height=height, steps=1)
    assert len(images) == 1
    assert images[0].size == (width, height)
    assert images[0].mode == "RGB"


def test_progress_counts_every_step_in_order(engine: tiny.TinyEngine) -> None:
    _, calls = draw(engine, steps=3)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_steps_default_to_the_engine_setting(engine: tiny.TinyEngine) -> None:
    _, calls = draw(engine)
    assert calls == [(step, engine.steps) for step in range(1, engine.steps + 1)]


def test_same_seed_same_pixels_other_seed_other_pixels(engine: tiny.TinyEngine) -> None:
    first, _ = draw(engine, seed=42, steps=2)
    again, _ = draw(engine, seed=42, steps=2)
    other, _ = draw(engine, seed=43, steps=2)
    assert pixels(first[0]) == pixels(again[0])
    assert pixels(first[0]) != pixels(other[0])


def test_guidance_reaches_the_pipeline(engine: tiny.TinyEngine) -> None:
    plain, _ = draw(engine, guidance=1.0, steps=2)
    guided, _ = draw(engine, guidance=6.0, steps=2)
    assert pixels(plain[0]) != pixels(guided[0])


def test_edit_with_two_reference_images(engine: tiny.TinyEngine) -> None:
    references = (
        Image.new("RGB", (300, 200), "red"),
        Image.new("RGBA", (640, 900), (0, 0, 255, 128)),
    )
    edited, calls = draw(engine, width=512, height=384, steps=2, images=references)
    unedited, _ = draw(engine, width=512, height=384, steps=2)
    assert edited[0].size == (512, 384)
    assert calls == [(1, 2), (2, 2)]
    # The reference tokens take part in attention, so they change the result.
    assert pixels(edited[0]) != pixels(unedited[0])


def test_progress_exception_stops_generation_and_propagates(engine: tiny.TinyEngine) -> None:
    reached: list[int] = []
    error = Cancelled("task cancelled")

    def on_progress(done: int, total: int) -> None:
        reached.append(done)
        if done == 2:
            raise error

    request = GenerationRequest(prompt="x", width=256, height=256, seed=1, steps=4)
    with pytest.raises(Cancelled) as caught:
        engine.generate(request, on_progress)
    assert caught.value is error
    assert reached == [1, 2]


def test_progress_runtime_error_is_not_wrapped(engine: tiny.TinyEngine) -> None:
    def on_progress(done: int, total: int) -> None:
        raise RuntimeError("from the callback")

    request = GenerationRequest(prompt="x", width=256, height=256, seed=1, steps=2)
    with pytest.raises(RuntimeError, match="from the callback") as caught:
        engine.generate(request, on_progress)
    assert not isinstance(caught.value, EngineError)


def test_pipeline_failure_becomes_engine_error(engine: tiny.TinyEngine) -> None:
    # The klein pipeline refuses reference images under 64 pixels a side.
    with pytest.raises(EngineError, match="Image too small") as caught:
        draw(engine, images=(Image.new("RGB", (32, 32)),))
    assert isinstance(caught.value.__cause__, ValueError)


def test_load_builds_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[int] = []
    real_build = tiny.build_tiny_pipeline

    def counting_build() -> object:
        builds.append(1)
        return real_build()

    monkeypatch.setattr(tiny, "build_tiny_pipeline", counting_build)
    fresh = tiny.TinyEngine()
    threads = [threading.Thread(target=fresh.load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fresh.load()
    assert builds == [1]


def test_build_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = tiny.build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)

    second = tiny.build_tiny_pipeline()
    for name in ("transformer", "vae", "text_encoder"):
        weights = getattr(first, name).state_dict()
        same = getattr(second, name).state_dict()
        assert weights.keys() == same.keys()
        assert all(torch.equal(weights[key], same[key]) for key in weights), name


def test_tokenizer_applies_the_qwen_chat_template() -> None:
    tokenizer = tiny.build_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a café"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == (
        "<|im_start|>user\na café<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    ids = tokenizer(text)["input_ids"]
    # The five special tokens stay whole; all else is one token per UTF-8 byte.
    plain = text
    for token in tiny.SPECIAL_TOKENS:
        plain = plain.replace(token, "")
    assert len(ids) == len(plain.encode()) + 5
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
