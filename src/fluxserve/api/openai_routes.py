"""OpenAI's images API as a door onto fluxserve: POST /v1/images/generations and
POST /v1/images/edits (docs/openai-api.md).

Fields that change what is made are honoured, or refused with a 400 that names
them (`stream: true`, `background: transparent`, an `output_format` other than
png, jpeg or webp, a `mask` or `markup` image). OpenAI's fields that fluxserve
has no use for (`quality`, `style`, `moderation`, `output_compression`,
`partial_images`, `input_fidelity`, `safety_identifier`, `user`, ...) and fields
OpenAI does not define are ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from pydantic.json_schema import JsonDict
from starlette.datastructures import FormData, UploadFile

from fluxserve.api.openai_errors import (
    OpenAIError,
    OpenAIRoute,
    invalid,
    openai_error_answers,
)
from fluxserve.api.openai_tasks import ImagesPlan, ImagesResponse, run_images, with_images
from fluxserve.api.routes import KeyDep, RuntimeDep
from fluxserve.api.schemas import (
    MAX_IMAGES,
    PROMPT_SCHEMA,
    WholeNumber,
    clean_prompt,
    describe_validation_error,
)
from fluxserve.data_references import check_reference
from fluxserve.errors import InvalidRequest
from fluxserve.openai_images import SIZE_PATTERN, fluxserve_model, size_choice
from fluxserve.settings import Settings
from fluxserve.store import ApiKeyRecord
from fluxserve.store.base import SubmitLimits
from fluxserve.tasks import OUTPUT_FORMATS, TaskInput
from fluxserve.uploads import Destination, Uploads

router = APIRouter(route_class=OpenAIRoute)

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
MAX_N = 10  # OpenAI's limit
RESPONSE_FORMATS = ("url", "b64_json")
BACKGROUNDS = ("auto", "opaque")
IMAGE_FIELDS = ("image", "image[]")  # OpenAI's SDKs send a list as image[]
REFUSED_FILES = {"mask": "a mask", "markup": "a markup image"}
MAX_FORM_FIELDS, MAX_FORM_FIELD_BYTES = 64, 64 * 1024


def _nullable(choices: Sequence[Any]) -> Any:
    """A field whose documented values are `choices` or null; checked in `plan`."""
    return Field(None, json_schema_extra={"enum": [*choices, None]})


class ImageOptions(BaseModel):
    """Everything but the images: the body of a generation, the text fields of an edit."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(json_schema_extra=PROMPT_SCHEMA)
    model: str | None = Field(
        None, description="A fluxserve model, or a name the openai_models setting maps"
    )
    # The bounds documented beside the union: pydantic cannot place them inside it.
    n: WholeNumber | None = Field(
        None, ge=1, le=MAX_N, json_schema_extra={"minimum": 1, "maximum": MAX_N}
    )
    size: str | None = Field(
        None,
        json_schema_extra={
            "pattern": SIZE_PATTERN,
            "description": "auto, or WIDTHxHEIGHT: made exactly when sides are multiples "
            "of 16 from 64 to 4096 within 4 MP, else at the nearest aspect ratio",
        },
    )
    response_format: str | None = _nullable(RESPONSE_FORMATS)
    output_format: str | None = _nullable(tuple(OUTPUT_FORMATS))
    background: str | None = _nullable(BACKGROUNDS)
    stream: StrictBool | None = _nullable([False])
    user: str | None = None


def plan(
    options: ImageOptions, settings: Settings, limits: SubmitLimits | None, *, edit: bool
) -> ImagesPlan:
    """The tasks a request asks for; a 400 naming the field fluxserve cannot honour.
    `limits` are the key's submit limits, as the store checks them."""
    try:
        prompt = clean_prompt(options.prompt, "prompt")
    except ValueError as exc:
        raise invalid("prompt", str(exc)) from exc
    if options.stream:
        raise invalid("stream", "stream is not supported: the answer comes once the images exist")
    _check_choice("background", options.background, BACKGROUNDS, " (FLUX.2 makes opaque images)")
    _check_choice("response_format", options.response_format, RESPONSE_FORMATS)
    _check_choice("output_format", options.output_format, tuple(OUTPUT_FORMATS))
    model = fluxserve_model(
        options.model, settings.openai_models, settings.openai_default_model, edit=edit
    )
    n = options.n or 1
    _check_n_within_limits(n, limits)
    choice = size_choice(options.size)
    task_input = TaskInput(
        prompt=prompt,
        size=choice.size,
        resolution=choice.resolution,
        width=choice.width,
        height=choice.height,
        output_format=options.output_format or "png",
    )
    return ImagesPlan(
        model,
        task_input,
        n=n,
        # b64_json unless asked: what OpenAI's current models always answer.
        response_format="url" if options.response_format == "url" else "b64_json",
    )


def _check_n_within_limits(n: int, limits: SubmitLimits | None) -> None:
    """A 400 for `n` past a per-key limit: such a request is refused however long
    it waits (each image is one task), so a 429 that says "retry" would mislead."""
    if limits is None:
        return
    checks = (
        ("max_active_tasks", limits.concurrent, "tasks queued or running at once"),
        ("rate_limit_per_minute", limits.per_minute, "submits a minute"),
    )
    for setting, limit, what in checks:
        if limit is not None and n > limit:
            raise invalid(
                "n",
                f"n is {n}, but an API key may have at most {limit} {what} here "
                f"({setting}), one per image; ask for at most {limit}",
            )


def _check_choice(field: str, value: str | None, choices: Sequence[str], why: str = "") -> None:
    if value is not None and value not in choices:
        raise invalid(field, f"{field} {value!r} is not supported{why}; use {', '.join(choices)}")


_ANSWERS: dict[int | str, dict[str, Any]] = {200: {"model": ImagesResponse}}
_ANSWERS.update(openai_error_answers())


@router.post(GENERATIONS_PATH, response_model=None, responses=_ANSWERS)
async def generate(body: ImageOptions, key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """Make `n` images from `prompt`, one task each; answered once they exist."""
    return await run_images(rt, key, plan(body, rt.settings, rt.service.limits, edit=False))


def _edit_form_schema() -> JsonDict:
    binary: JsonDict = {"type": "string", "format": "binary"}
    options = ImageOptions.model_json_schema()
    return {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "image": binary,
            "image[]": {"type": "array", "items": binary, "minItems": 1, "maxItems": MAX_IMAGES},
            **options["properties"],
        },
        "anyOf": [{"required": ["image"]}, {"required": ["image[]"]}],
    }


@router.post(
    EDITS_PATH,
    response_model=None,
    responses=_ANSWERS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _edit_form_schema()}},
        }
    },
)
async def edit(request: Request, key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """Make `n` images from `prompt` and 1 to 8 reference images (`image`, or `image[]`
    repeated), one task each; answered once they exist."""
    limit = rt.settings.max_stream_upload_bytes
    form = await _read_form(request)
    try:
        options = _options(form)
        files = _images(form, limit)
        edit_plan = plan(options, rt.settings, rt.service.limits, edit=True)
        images = [(await file.read(), file.filename) for file in files]
    finally:
        await form.close()
    urls = await _store_images(rt.uploads, key, images)
    return await run_images(rt, key, with_images(edit_plan, urls))


async def _read_form(request: Request) -> FormData:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise invalid(None, "Request body must be multipart/form-data, with the images in 'image'")
    # The guard bounds the whole body (see app.body_caps); these bound its parts.
    return await request.form(
        max_files=MAX_IMAGES + len(REFUSED_FILES),
        max_fields=MAX_FORM_FIELDS,
        max_part_size=MAX_FORM_FIELD_BYTES,
    )


def _options(form: FormData) -> ImageOptions:
    """The text fields, as their JSON values: multipart sends `n` and `stream` as text."""
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if isinstance(value, str) and name not in fields:
            fields[name] = value
    n, stream = fields.get("n"), fields.get("stream")
    if isinstance(n, str) and n.isascii() and n.isdigit():
        # Digits past Python's conversion limit stay text, refused as not an integer.
        with contextlib.suppress(ValueError):
            fields["n"] = int(n)
    if isinstance(stream, str) and stream.lower() in ("true", "false"):
        fields["stream"] = stream.lower() == "true"
    try:
        return ImageOptions.model_validate(fields)
    except ValidationError as exc:
        errors = list(exc.errors())
        param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
        raise invalid(param, describe_validation_error(errors)) from exc


def _images(form: FormData, limit: int) -> list[UploadFile]:
    for name, what in REFUSED_FILES.items():
        if name in form:
            raise invalid(name, f"{name} is not supported: FLUX.2 edits without {what}")
    found = [value for name in IMAGE_FIELDS for value in form.getlist(name)]
    files = [value for value in found if isinstance(value, UploadFile)]
    if len(files) < len(found):
        raise invalid("image", "image must be sent as files, not text")
    if not 1 <= len(files) <= MAX_IMAGES:
        raise invalid("image", f"image must hold 1 to {MAX_IMAGES} images (got {len(files)})")
    for file in files:
        if file.size is not None and file.size > limit:
            raise OpenAIError(
                413,
                f"image {file.filename!r} is larger than {limit} bytes, the most allowed",
                param="image",
                code="request_too_large",
            )
    return files


async def _store_images(
    uploads: Uploads, key: ApiKeyRecord, images: Sequence[tuple[bytes, str | None]]
) -> list[str]:
    """Each image checked, then each stored as an upload of the account (so retention
    removes it in time); their URLs. None is stored unless all pass."""
    checked = []
    for index, (data, name) in enumerate(images):
        field = "image" if len(images) == 1 else f"image[{index}]"
        try:
            checked.append((data, await check_reference(uploads, data, field), name))
        except InvalidRequest as exc:
            raise invalid("image", exc.message) from exc
    # Keys made before accounts existed were given one by migration 0004.
    account = key.account_id or key.key_id
    urls = []
    for data, found, name in checked:
        where = Destination(None, None)
        upload = await uploads.keep(account, data, where, found, original_name=name)
        urls.append(uploads.storage.url(upload.key))
    return urls
