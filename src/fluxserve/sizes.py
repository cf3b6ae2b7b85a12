"""`size` (an aspect ratio) and `resolution` (1K, 2K) to pixel width and height."""

from __future__ import annotations

import math

SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "3:2": (3, 2),
    "2:3": (2, 3),
}
SIZE_CHOICES: tuple[str, ...] = (*SIZES, "auto")

# Target area per resolution, and the most pixels an image may have.
RESOLUTIONS: dict[str, int] = {"1K": 1024 * 1024, "2K": 2048 * 2048}
MAX_PIXELS = 2048 * 2048
MULTIPLE = 16
# The sides an exact width x height may have (BFL's rule, docs/bfl-api.md).
MIN_SIDE, MAX_SIDE = 64, 4096


def makes_exactly(width: int, height: int) -> bool:
    """Whether `width` x `height` can be made as it is: sides multiples of 16 from
    64 to 4096, at most MAX_PIXELS together."""
    sides_fit = all(
        MIN_SIDE <= side <= MAX_SIDE and side % MULTIPLE == 0 for side in (width, height)
    )
    return sides_fit and width * height <= MAX_PIXELS


def price_resolution(width: int, height: int) -> str:
    """The resolution an exact width x height is priced at: 2K past 1K's area."""
    return "2K" if width * height > RESOLUTIONS["1K"] else "1K"


def _round16(value: float) -> int:
    return max(MULTIPLE, round(value / MULTIPLE) * MULTIPLE)


def dimensions(ratio: float, resolution: str) -> tuple[int, int]:
    """Width and height, multiples of 16, near the resolution's area and `ratio` (w/h)."""
    area = RESOLUTIONS[resolution]
    landscape = ratio >= 1
    long_over_short = ratio if landscape else 1 / ratio
    # Fix the short side first: it is the one rounding hurts most, in relative terms.
    short = _round16(math.sqrt(area / long_over_short))
    long = _round16(short * long_over_short)
    # Over the cap, step the short side down so the ratio stays as close as before.
    while long * short > MAX_PIXELS:
        short -= MULTIPLE
        long = _round16(short * long_over_short)
    return (long, short) if landscape else (short, long)


def size_ratio(size: str, reference: tuple[int, int] | None = None) -> float:
    """The width/height ratio `size` asks for; `auto` follows the first reference image."""
    if size == "auto":
        if reference is None:
            return 1.0
        width, height = reference
        return width / height
    w, h = SIZES[size]
    return w / h
