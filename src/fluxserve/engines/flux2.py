"""One call of a diffusers FLUX.2 pipeline, as every diffusers-backed engine makes it."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from PIL import Image

from fluxserve.engines.base import GenerationRequest, ProgressCallback
from fluxserve.engines.lora_adapters import LoraAdapters
from fluxserve.engines.prompts import PromptCache
from fluxserve.errors import EngineError


def run_pipeline(
    pipeline: Any,
    requests: Sequence[GenerationRequest],
    on_progress: ProgressCallback,
    *,
    steps: int,
    guidance: float | None,
    lock: AbstractContextManager[Any],
    prompts: PromptCache,
    failure: str,
    adapters: LoraAdapters | None = None,
) -> list[list[Image.Image]]:
    """Draw `requests` in one call of `pipeline`, reporting every step to `on_progress`.

    Several requests must share their size and have no references (see
    `BatchEngine`); each gets its own prompt and seed, and its own list of
    images back, in order.

    An exception from `on_progress` stops the denoising loop at that step and
    propagates unchanged; so does an out-of-memory error, for the caller to
    explain. Any other failure becomes `EngineError("<failure>: ...")`. Unset,
    `guidance` leaves the pipeline's own default. A prompt in `prompts` is not
    encoded again; `lock` guards `prompts` too, and `adapters`, which apply the
    requests' LoRAs (EngineError when one does not fit).
    """
    first = requests[0]
    if len(requests) > 1 and any(
        (r.width, r.height, r.loras) != (first.width, first.height, first.loras) or r.images
        for r in requests
    ):
        raise ValueError("a batch shares one size and its LoRAs, and has no reference images")
    if first.loras and adapters is None:
        raise EngineError(f"{failure}: this engine does not load LoRAs")
    # on_progress's own exception, kept to tell it apart from pipeline failures.
    raised: list[BaseException] = []

    def step_end(_pipeline: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        try:
            on_progress(i + 1, steps)
        except BaseException as exc:
            raised.append(exc)
            raise
        return tensors  # diffusers reads the (unchanged) latents back from it

    options: dict[str, Any] = {}
    if guidance is not None:
        options["guidance_scale"] = guidance
    # The scheduler keeps per-call state (timesteps, step index): one at a time.
    with lock:
        if adapters is not None:
            adapters.activate(first.loras)
        try:
            output = pipeline(
                **prompts.text_inputs(pipeline, [r.prompt for r in requests]),
                image=list(first.images) or None,
                width=first.width,
                height=first.height,
                num_inference_steps=steps,
                # A CPU generator per image draws the same noise on every device
                # and in any batch: seeds reproduce across cards and offload modes.
                generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
                callback_on_step_end=step_end,
                **options,
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if raised and exc is raised[0]:
                raise
            raise EngineError(f"{failure}: {exc}") from exc
    return [[image] for image in output.images]
