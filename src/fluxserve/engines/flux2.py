"""One call of a diffusers FLUX.2 pipeline, as every diffusers-backed engine makes it."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from PIL import Image

from fluxserve.engines.base import GenerationRequest, ProgressCallback
from fluxserve.errors import EngineError


def run_pipeline(
    pipeline: Any,
    request: GenerationRequest,
    on_progress: ProgressCallback,
    *,
    steps: int,
    guidance: float | None,
    lock: AbstractContextManager[Any],
    failure: str,
) -> list[Image.Image]:
    """Draw `request` with `pipeline`, reporting every step to `on_progress`.

    An exception from `on_progress` stops the denoising loop at that step and
    propagates unchanged; so does an out-of-memory error, for the caller to
    explain. Any other failure becomes `EngineError("<failure>: ...")`. Unset,
    `guidance` leaves the pipeline's own default.
    """
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
    try:
        # The scheduler keeps per-call state (timesteps, step index): one at a time.
        with lock:
            output = pipeline(
                prompt=request.prompt,
                image=list(request.images) or None,
                width=request.width,
                height=request.height,
                num_inference_steps=steps,
                # A CPU generator draws the same noise on every device: seeds
                # reproduce across cards and offload modes.
                generator=torch.Generator("cpu").manual_seed(request.seed),
                callback_on_step_end=step_end,
                **options,
            )
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if raised and exc is raised[0]:
            raise
        raise EngineError(f"{failure}: {exc}") from exc
    return list(output.images)
