"""Loading the reference images of an image-editing task.

Every reference arrives as a URL: `data:image/...;base64,...`, a URL of fluxserve's
own storage (an upload or a result, read from storage directly), or any other
http(s) URL, fetched through the net guard. Bytes become an image only after three checks:
the content is JPEG, PNG, GIF or WebP by its signature, the size in its header is
within the pixel limit (checked before any pixel is decoded), and the decoder
accepts the data.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Sequence

import httpx
from PIL import (
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

from fluxserve.errors import FetchError, ReferenceImageError, UnsafeURLError
from fluxserve.net_fetch import fetch_bytes
from fluxserve.net_policy import NetPolicy
from fluxserve.storage import Storage

MAX_REFERENCE_IMAGES = 8

# Formats by their file signature, with the Pillow class that reads each one.
# Calling the plugin class directly, rather than Image.open, lets us compare the
# header's size with max_pixels before Pillow's own decompression-bomb check,
# which warns (a process-wide warnings filter is not thread-safe to change) and
# uses a fixed global limit.
_FORMATS: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}

_DATA_URL_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/png", "image/gif", "image/webp"}
)


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes' signature names: JPEG, PNG, GIF, WEBP, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode JPEG/PNG/GIF/WebP bytes into a loaded RGB image of at most max_pixels."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ReferenceImageError("not a JPEG, PNG, GIF or WebP image")
    try:
        # Reads the header only; no pixel memory yet.
        source = _FORMATS[fmt](io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # A GIF frame can enlarge the canvas while the header is read; Pillow then
        # raises (or warns, which `-W error` turns into an exception).
        raise ReferenceImageError(f"{fmt} image is too large: {exc}") from exc
    except Exception as exc:
        raise ReferenceImageError(f"not a valid {fmt} image: {exc or type(exc).__name__}") from exc
    try:
        width, height = source.size
        if width * height > max_pixels:
            raise ReferenceImageError(
                f"{fmt} image is {width}x{height} ({width * height} pixels), "
                f"more than the {max_pixels} allowed"
            )
        try:
            # Only the current frame is decoded: the first one of a GIF or
            # animated WebP.
            source.load()
            image = _to_rgb(_upright(source))
        except ReferenceImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ReferenceImageError(f"{fmt} image is too large: {exc}") from exc
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise ReferenceImageError(f"could not decode {fmt} image: {reason}") from exc
    finally:
        source.close()
    return image


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation says, as viewers show it."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return image  # unreadable EXIF is no reason to refuse the pixels
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image; transparent parts are composited on white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in image.info)
    if not has_alpha:
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):
            # 16-bit greyscale PNG: scale to 8 bits; a plain convert would clip.
            image = image.convert("F").point(lambda v: v / 257).convert("L")
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,` URL; ReferenceImageError if unusable."""
    if url[:5].lower() != "data:":
        raise ReferenceImageError("not a data: URL")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ReferenceImageError("data: URL has no ',' before its data")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if not media_type.startswith("image/"):
        shown = media_type or "none"
        raise ReferenceImageError(f"data: URL media type must be an image, not {shown!r}")
    if media_type not in _DATA_URL_IMAGE_TYPES:
        raise ReferenceImageError(
            f"data: URL media type {media_type!r} is not supported (use JPEG, PNG, GIF or WebP)"
        )
    if "base64" not in params[1:]:
        raise ReferenceImageError("data: URL must be base64-encoded (';base64,')")
    try:
        return decode_base64_payload(payload, max_bytes)
    except Base64TooLarge as exc:
        raise DataURLTooLarge(f"data: URL holds more than {max_bytes} bytes") from exc
    except (binascii.Error, ValueError) as exc:
        raise ReferenceImageError(f"data: URL is not valid base64: {exc}") from exc


class Base64TooLarge(Exception):
    """Base64 that holds more bytes than allowed."""


class DataURLTooLarge(ReferenceImageError):
    """A data: URL that holds more bytes than allowed."""


def decode_base64_payload(payload: str, max_bytes: int) -> bytes:
    """The bytes of base64 text, spaces and line breaks ignored, padding optional.

    Base64TooLarge past `max_bytes`, refused from its length before anything is
    decoded; binascii.Error when it is not base64.
    """
    # Line breaks and spaces are common in pasted base64; they carry no data.
    compact = "".join(payload.split())
    if len(compact) // 4 * 3 - 2 > max_bytes:
        raise Base64TooLarge
    compact += "=" * (-len(compact) % 4)  # some encoders drop the padding
    data = base64.b64decode(compact, validate=True)
    if len(data) > max_bytes:
        raise Base64TooLarge
    return data


def _shown(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


async def _read_stored(storage: Storage, key: str, where: str, max_bytes: int) -> bytes:
    data = await storage.get(key)
    if data is None:
        raise ReferenceImageError(
            f"{where}: the file is no longer stored (uploads and results expire)"
        )
    if len(data) > max_bytes:
        raise ReferenceImageError(f"{where}: file is larger than {max_bytes} bytes")
    return data


async def _load_one(
    url: str,
    *,
    client: httpx.AsyncClient,
    policy: NetPolicy,
    max_bytes: int,
    max_pixels: int,
    total_timeout: float | None,
    storage: Storage | None,
) -> Image.Image:
    if url[:5].lower() == "data:":
        data = decode_data_url(url, max_bytes)
        where = "data: URL"
    elif storage is not None and (key := storage.key_for_url(url)) is not None:
        where = _shown(url)
        data = await _read_stored(storage, key, where, max_bytes)
    else:
        fetched = await fetch_bytes(
            client, url, policy=policy, max_bytes=max_bytes, total_timeout=total_timeout
        )
        data = fetched.content
        where = _shown(fetched.url)
    try:
        # Decoding is CPU-bound; keep it off the event loop.
        return await asyncio.to_thread(decode_image, data, max_pixels=max_pixels)
    except ReferenceImageError as exc:
        raise ReferenceImageError(f"{where}: {exc}") from exc


async def load_references(
    urls: Sequence[str],
    *,
    client: httpx.AsyncClient,
    policy: NetPolicy,
    max_bytes: int,
    max_pixels: int,
    total_timeout: float | None = None,
    field: str = "image_urls",
    storage: Storage | None = None,
) -> list[Image.Image]:
    """Fetch and decode reference images concurrently, in the order given.

    URLs of `storage`'s own files are read from it, without a request.

    Errors keep their type (UnsafeURLError, FetchError, ReferenceImageError) and
    name the failing entry, e.g. "image_urls[1]: could not fetch ...: HTTP 404".
    """
    if len(urls) > MAX_REFERENCE_IMAGES:
        raise ReferenceImageError(
            f"{field}: at most {MAX_REFERENCE_IMAGES} reference images are allowed, got {len(urls)}"
        )
    results = await asyncio.gather(
        *(
            _load_one(
                url,
                client=client,
                policy=policy,
                max_bytes=max_bytes,
                max_pixels=max_pixels,
                total_timeout=total_timeout,
                storage=storage,
            )
            for url in urls
        ),
        # Let every fetch finish (each is bounded by timeouts) so none is left
        # running unobserved, then report the first failure by position.
        return_exceptions=True,
    )
    images: list[Image.Image] = []
    for index, result in enumerate(results):
        if isinstance(result, UnsafeURLError | FetchError | ReferenceImageError):
            raise type(result)(f"{field}[{index}]: {result}") from result
        if isinstance(result, BaseException):
            raise result
        images.append(result)
    return images


__all__ = [
    "MAX_REFERENCE_IMAGES",
    "Base64TooLarge",
    "DataURLTooLarge",
    "decode_base64_payload",
    "decode_data_url",
    "decode_image",
    "load_references",
    "sniff_format",
]
