"""Result files: the fast PNG writer must give back exactly the pixels it was handed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fluxserve.results import encode, encode_png, result_file


@pytest.mark.parametrize(("width", "height"), [(1, 1), (3, 7), (1360, 768), (17, 1024)])
def test_png_round_trips_exactly(width: int, height: int) -> None:
    pixels = np.random.default_rng(width * height).integers(
        0, 256, (height, width, 3), dtype=np.uint8
    )
    decoded = Image.open(io.BytesIO(encode_png(pixels)))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    assert decoded.size == (width, height)
    assert np.array_equal(np.asarray(decoded), pixels)


def test_png_compresses_smooth_images() -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    pixels = np.stack([ramp, ramp.T, ramp // 2], axis=-1)
    assert len(encode_png(pixels)) < pixels.nbytes / 20


def test_png_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 4), dtype=np.uint8))


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_every_output_format_decodes(fmt: str, pil_format: str) -> None:
    image = Image.new("RGBA", (64, 48), (10, 200, 30, 128))
    decoded = Image.open(io.BytesIO(encode(image, fmt)))
    assert decoded.format == pil_format and decoded.size == (64, 48)


def test_result_keys_are_stable_per_task_and_named_by_format() -> None:
    first = result_file("task-unified-1-abcdefgh", 0, b"x" * 10, "jpeg")
    again = result_file("task-unified-1-abcdefgh", 0, b"y" * 12, "jpeg")
    assert first.file_name == "image.jpg" and first.content_type == "image/jpeg"
    assert first.file_size == 10
    assert first.key == again.key == "results/task-unified-1-abcdefgh/image.jpg"
