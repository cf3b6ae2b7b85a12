"""Turning generated images into stored result files."""

from __future__ import annotations

import io
import struct
import zlib
from types import ModuleType

import numpy as np
from PIL import Image

from fluxserve.tasks import OUTPUT_FORMATS, ResultFile

deflate: ModuleType
try:
    # ISA-L's deflate is about ten times faster than zlib's at the same ratio;
    # without it (a platform with no wheel) PNGs are only slower to write.
    from isal import isal_zlib as deflate
except ImportError:  # pragma: no cover - depends on the platform
    deflate = zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_FILTER_SUB = 1
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "jpeg": {"format": "JPEG", "quality": 95},
    "webp": {"format": "WEBP", "quality": 95, "method": 3},
}


def encode(image: Image.Image, output_format: str) -> bytes:
    """The image in `output_format` (png, jpeg or webp)."""
    rgb = image.convert("RGB")
    if output_format == "png":
        return encode_png(np.asarray(rgb))
    buffer = io.BytesIO()
    rgb.save(buffer, **_SAVE_OPTIONS[output_format])  # type: ignore[arg-type]
    return buffer.getvalue()


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (height, width, 3) uint8 array.

    Every row uses the Sub filter (each byte minus the one a pixel to its left),
    which suits photographic images, and one fast deflate pass: on a 1 MP image
    this takes ~10 ms where Pillow's adaptive filtering takes ~140 ms, for a file
    of about the same size. The GIL is released while compressing.
    """
    height, width, channels = pixels.shape
    if channels != 3 or pixels.dtype != np.uint8:
        raise ValueError("encode_png takes (height, width, 3) uint8 pixels")
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = PNG_FILTER_SUB
    body = rows[:, 1:].reshape(height, width, 3)
    body[:, 0] = pixels[:, 0]
    np.subtract(pixels[:, 1:], pixels[:, :-1], out=body[:, 1:])  # wraps mod 256
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", deflate.compress(rows.tobytes(), 1)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def result_file(task_id: str, index: int, data: bytes, output_format: str) -> ResultFile:
    """The record of one result. The key is the same on every run of the task, so a
    rerun overwrites rather than adds; the task id's random part keeps it unguessable."""
    extension = "jpg" if output_format == "jpeg" else output_format
    file_name = f"image.{extension}" if index == 0 else f"image-{index}.{extension}"
    return ResultFile(
        key=f"results/{task_id}/{file_name}",
        file_name=file_name,
        content_type=OUTPUT_FORMATS[output_format],
        file_size=len(data),
    )
