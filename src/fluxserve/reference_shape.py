"""Whether a reference image's shape suits FLUX.2: sides of 64 px or more, ratio up to 8.

The check runs twice. At submit, for `data:` URLs only: their bytes are in the
request (see data_references), so a bad reference is a 400. http(s) references
are not fetched at submit: that would put a third party's latency and failures
into every submit and make the API process fetch each image twice (the worker
needs the pixels later anyway). The worker checks them once fetched, and the
task fails with the same message.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

from fluxserve.errors import ReferenceImageError
from fluxserve.references import _FORMATS, sniff_format

MIN_SIDE = 64
MAX_RATIO = 8.0


def shape_problem(width: int, height: int) -> str | None:
    """Why a width x height reference cannot be used, or None when it can."""
    if min(width, height) < MIN_SIDE:
        return f"is {width}x{height}: FLUX.2 needs at least {MIN_SIDE} pixels a side"
    if max(width, height) / min(width, height) > MAX_RATIO:
        return (
            f"is {width}x{height}: too elongated for FLUX.2 "
            f"(sides may differ by a factor of {MAX_RATIO:g} at most)"
        )
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """The size a JPEG/PNG/GIF/WebP header declares; None when it cannot be read."""
    fmt = sniff_format(data)
    if fmt is None:
        return None
    try:
        with _FORMATS[fmt](io.BytesIO(data)) as image:
            return image.size
    except (Exception, Image.DecompressionBombWarning):
        return None  # the worker's full decode reports what is wrong


def check_loaded(images: Sequence[Image.Image]) -> None:
    """ReferenceImageError for a fetched reference whose shape FLUX.2 cannot use."""
    for index, image in enumerate(images):
        problem = shape_problem(*image.size)
        if problem:
            raise ReferenceImageError(f"input.image_urls[{index}] {problem}")
