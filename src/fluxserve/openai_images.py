"""What OpenAI's images API asks for, in fluxserve's words: which model runs, and
at which `size` and `resolution` (see docs/openai-api.md)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from fluxserve.sizes import (
    MAX_PIXELS,
    MAX_SIDE,
    MIN_SIDE,
    MULTIPLE,
    RESOLUTIONS,
    SIZES,
    makes_exactly,
    price_resolution,
)
from fluxserve.tasks import EDIT_MODELS, MODELS

OPENAI_IMAGE_MODELS: tuple[str, ...] = (
    "gpt-image-1",
    "gpt-image-1-mini",
    "gpt-image-1.5",
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
    "gpt-image-2.5-sunburst",
    "gpt-image-2.5-sunburst-2026-09-08",
    "gpt-image-2.5-flare",
    "gpt-image-2.5-flare-2026-09-08",
    "gpt-image-2.6-sunburst",
    "gpt-image-2.6-flare",
    "chatgpt-image-latest",
    "dall-e-2",
    "dall-e-3",
)
"""OpenAI's image model names, as its SDK lists them: what clients send by default."""

EDIT_SUFFIX = "-edit"
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
_SIZE = re.compile(SIZE_PATTERN)
RATIO_TOLERANCE = 0.02
"""How far (relatively) a `WxH` may be from one of fluxserve's ratios: 1792x1024
is 1.6% from 16:9."""
# Past the area halfway (geometrically) between 1K and 2K, the image is made at 2K.
_TWO_K_FROM = (RESOLUTIONS["1K"] * RESOLUTIONS["2K"]) ** 0.5


class OpenAIValueError(ValueError):
    """A request field fluxserve cannot honour; `param` names it, as OpenAI's errors do."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def generation_model(name: str) -> str:
    """The generation model of a fluxserve model name: `flux-2-pro-edit` -> `flux-2-pro`."""
    return name.removesuffix(EDIT_SUFFIX)


def fluxserve_model(
    requested: str | None, mapping: Mapping[str, str], default: str, *, edit: bool
) -> str:
    """The fluxserve model an OpenAI `model` runs on: a fluxserve name as it is, a
    name in `mapping` as mapped, none at all as `default`; the edit model for an edit."""
    if requested is None or requested == "":
        family = generation_model(default)
    elif requested in MODELS:
        family = generation_model(requested)
    elif requested in mapping:
        family = generation_model(mapping[requested])
    else:
        known = sorted({*mapping, *(m for m in MODELS if m not in EDIT_MODELS)})
        raise OpenAIValueError(
            "model",
            f"model {requested!r} is not served here; the models are {', '.join(known)}",
        )
    chosen = family + EDIT_SUFFIX if edit else family
    if chosen not in MODELS:
        raise OpenAIValueError("model", f"model {requested or default!r} has no edit model")
    return chosen


@dataclass(frozen=True)
class SizeChoice:
    """fluxserve's `size` (an aspect ratio, or auto) and `resolution` for an OpenAI
    size, and its `width` and `height` when it is made exactly."""

    size: str
    resolution: str
    width: int | None = None
    height: int | None = None


def size_choice(size: str | None) -> SizeChoice:
    """`auto` (or none) follows the first reference of an edit, else 1:1, at 1K; a
    `WxH` fluxserve can make exactly (sizes.py `makes_exactly`) is made so, priced by
    its area; any other picks the fluxserve ratio within 2% of it and the resolution
    nearest its area."""
    if size is None or size == "auto":
        return SizeChoice("auto", "1K")
    # fullmatch: `$` alone also matches before a final line break.
    if not _SIZE.fullmatch(size):
        raise OpenAIValueError("size", f"size must be 'auto' or WIDTHxHEIGHT, got {size!r}")
    width, height = (int(side) for side in size.split("x"))
    if makes_exactly(width, height):
        return SizeChoice("auto", price_resolution(width, height), width, height)
    asked = width / height
    for name, (w, h) in SIZES.items():
        if abs(asked / (w / h) - 1) <= RATIO_TOLERANCE:
            resolution = "2K" if width * height > _TWO_K_FROM else "1K"
            return SizeChoice(name, resolution)
    ratios = ", ".join(SIZES)
    raise OpenAIValueError(
        "size",
        f"size {size} is not made exactly (sides multiples of {MULTIPLE} from {MIN_SIDE} "
        f"to {MAX_SIDE}, at most {MAX_PIXELS} pixels) and has an aspect ratio fluxserve "
        f"does not make; use 'auto', such a size, or one of the ratios {ratios}",
    )
