"""size x resolution -> pixels."""

from __future__ import annotations

import pytest

from fluxserve.sizes import MAX_PIXELS, RESOLUTIONS, SIZES, dimensions, size_ratio


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [
        ("1:1", "1K", (1024, 1024)),
        ("16:9", "1K", (1360, 768)),
        ("9:16", "1K", (768, 1360)),
        ("1:1", "2K", (2048, 2048)),
        ("3:2", "1K", (1248, 832)),
    ],
)
def test_documented_sizes(size: str, resolution: str, expected: tuple[int, int]) -> None:
    assert dimensions(size_ratio(size), resolution) == expected


@pytest.mark.parametrize("resolution", list(RESOLUTIONS))
@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_is_close_in_ratio_and_area(size: str, resolution: str) -> None:
    width, height = dimensions(size_ratio(size), resolution)
    assert width % 16 == 0 and height % 16 == 0
    assert width * height <= MAX_PIXELS
    assert abs(width * height / RESOLUTIONS[resolution] - 1) < 0.03
    # Within one multiple of 16 of the exact ratio.
    w, h = SIZES[size]
    assert abs(width / height - w / h) <= 16 / min(width, height)
    assert (width >= height) == (w >= h)


def test_auto_follows_the_first_reference_else_square() -> None:
    assert size_ratio("auto") == 1.0
    assert dimensions(size_ratio("auto", (1600, 900)), "1K") == (1360, 768)
    assert dimensions(size_ratio("auto", (300, 1200)), "1K")[1] > 1024
