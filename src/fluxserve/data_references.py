"""The `data:` references of a submit, moved into storage before the task is stored.

A `data:` URL carries its image in the request. Kept in the task, it would make
the task's row as large as the image, and every read of the task pay for it; so
at submit each one is decoded under the base64 upload's byte limit, checked as an
upload is (JPEG, PNG, GIF or WebP that decodes whole within the pixel limit) and
for a shape FLUX.2 can use, stored as an upload of the account, and replaced in
the task by that upload's URL. The worker then reads it from storage, as it reads
any upload. Every reference is checked before any is stored, so a refused submit
leaves no file behind.
"""

from __future__ import annotations

from collections.abc import Sequence

from fluxserve.errors import InvalidRequest, PayloadTooLarge, ReferenceImageError
from fluxserve.reference_shape import header_size, shape_problem
from fluxserve.references import DataURLTooLarge, decode_data_url
from fluxserve.uploads import Destination, Uploads


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def decode_data_reference(url: str, max_bytes: int, field: str) -> bytes:
    """The image bytes of a `data:image/...;base64,` URL; 413 past `max_bytes`, else 400."""
    try:
        return decode_data_url(url, max_bytes)
    except DataURLTooLarge as exc:
        raise PayloadTooLarge(
            f"{field} holds more than {max_bytes} bytes, the most a data: URL may"
        ) from exc
    except ReferenceImageError as exc:
        raise InvalidRequest(f"{field}: {exc}") from exc


async def check_reference(uploads: Uploads, data: bytes, field: str) -> str:
    """The image format of `data`, once it is an image that uploads accept (see
    `Uploads.check`) in a shape FLUX.2 can use; else a 400 naming `field`."""
    found = await uploads.check(data, field=field)
    size = header_size(data)
    problem = None if size is None else shape_problem(*size)
    if problem:
        raise InvalidRequest(f"{field} {problem}")
    return found


async def store_data_references(
    uploads: Uploads, account_id: str, image_urls: Sequence[str]
) -> tuple[str, ...]:
    """`image_urls` with each `data:` URL replaced by the URL of its stored upload."""
    limit = uploads.settings.max_base64_upload_bytes
    checked: dict[int, tuple[bytes, str]] = {}
    for index, url in enumerate(image_urls):
        if not is_data_url(url):
            continue
        field = f"input.image_urls[{index}]"
        data = decode_data_reference(url, limit, field)
        checked[index] = data, await check_reference(uploads, data, field)
    stored = list(image_urls)
    for index, (data, found) in checked.items():
        upload = await uploads.keep(
            account_id, data, Destination(None, None), found, original_name=None
        )
        stored[index] = uploads.storage.url(upload.key)
    return tuple(stored)
