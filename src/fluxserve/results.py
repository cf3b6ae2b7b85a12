"""Turning generated images into stored result files."""

from __future__ import annotations

import io
import secrets

from PIL import Image

from fluxserve.tasks import OUTPUT_FORMATS, ResultFile

_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    # Level 1 costs a little size and saves most of zlib's time on a 1-4 MP image.
    "png": {"format": "PNG", "compress_level": 1},
    "jpeg": {"format": "JPEG", "quality": 95},
    "webp": {"format": "WEBP", "quality": 95},
}


def encode(image: Image.Image, output_format: str) -> bytes:
    """The image in `output_format` (png, jpeg or webp)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, **_SAVE_OPTIONS[output_format])  # type: ignore[arg-type]
    return buffer.getvalue()


def result_file(task_id: str, index: int, data: bytes, output_format: str) -> ResultFile:
    """The record of one result; its key carries a random part so URLs are unguessable."""
    extension = "jpg" if output_format == "jpeg" else output_format
    file_name = f"image.{extension}" if index == 0 else f"image-{index}.{extension}"
    return ResultFile(
        key=f"results/{task_id}-{secrets.token_hex(8)}/{file_name}",
        file_name=file_name,
        content_type=OUTPUT_FORMATS[output_format],
        file_size=len(data),
    )
