"""The request bodies of Black Forest Labs' wire, and the fluxserve task each asks for.

Sizes are checked as BFL checks them: `width` and `height` at least 64,
multiples of 16, at most 4 megapixels together (docs/bfl-api.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonDict

from fluxserve.api.schemas import (
    GUIDANCE_RANGE,
    HTTP_URL_SCHEMA,
    PROMPT_SCHEMA,
    STEPS_RANGE,
    WholeNumber,
    check_http_url,
    clean_prompt,
)
from fluxserve.bfl_models import FLEX_PATHS, BflRoute
from fluxserve.sizes import MAX_PIXELS, MAX_SIDE, MIN_SIDE, MULTIPLE, price_resolution
from fluxserve.tasks import BflOptions, TaskInput

KLEIN_MAX_IMAGES = 4
IMAGE_FIELDS = ("input_image", *(f"input_image_{n}" for n in range(2, 9)))

Side = Annotated[WholeNumber, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=MULTIPLE)]
IMAGE_SCHEMA: JsonDict = {
    "anyOf": [
        HTTP_URL_SCHEMA,
        {"pattern": "^[Dd][Aa][Tt][Aa]:"},
        {"pattern": "^[A-Za-z0-9+/]+=*$"},
    ],
    "description": "An http(s) URL, a data: URL, or the image's bytes in base64",
}
Image = Annotated[str, Field(json_schema_extra=IMAGE_SCHEMA)] | None


def reference(value: str, field: str) -> str:
    """An input image as the unified submit takes it: a URL as it is, base64 as a
    data: URL (its media type is read from the bytes when it is stored)."""
    if value[:5].lower() == "data:":
        return value
    if "://" in value[:16]:  # never in base64, whose alphabet has no ':'
        check_http_url(value, field)
        return value
    if not value:
        raise ValueError(f"{field} must be an image URL or base64, not empty")
    return "data:image/png;base64," + value


def _size_rule(schema: JsonDict) -> None:
    """For the document: width and height both, or neither."""
    null: JsonDict = {"type": "null"}
    schema["anyOf"] = [
        {"properties": {"width": null, "height": null}},
        {"required": ["width", "height"], "properties": {"width": {"type": "integer"}}},
    ]


class BflInputs(BaseModel):
    """The body of POST /v1/flux-2-pro, -max, -klein-4b and -klein-9b."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_size_rule)

    prompt: str = Field(json_schema_extra=PROMPT_SCHEMA)
    input_image: Image = None
    input_image_2: Image = None
    input_image_3: Image = None
    input_image_4: Image = None
    input_image_5: Image = None
    input_image_6: Image = None
    input_image_7: Image = None
    input_image_8: Image = None
    seed: Annotated[WholeNumber, Field(ge=0, le=2**32 - 1)] | None = None
    width: Side | None = Field(
        None, description="With height; omitted: 1 MP, or the first image's shape"
    )
    height: Side | None = None
    safety_tolerance: Annotated[WholeNumber, Field(ge=0, le=5)] = 2
    output_format: Literal["jpeg", "png"] | None = "jpeg"
    prompt_upsampling: StrictBool = False
    webhook_url: Annotated[str, Field(json_schema_extra=HTTP_URL_SCHEMA)] | None = None
    webhook_secret: Annotated[str, Field(max_length=255)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return clean_prompt(value, "prompt")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_http_url(value, "webhook_url")
        return value

    @field_validator(*IMAGE_FIELDS)
    @classmethod
    def _image(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else reference(value, str(info.field_name))

    @model_validator(mode="after")
    def _size(self) -> BflInputs:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        if (
            self.width is not None
            and self.height is not None
            and (self.width * self.height > MAX_PIXELS)
        ):
            raise ValueError(
                f"width x height must be at most {MAX_PIXELS} pixels (4 MP), "
                f"not {self.width * self.height}"
            )
        return self

    def images(self) -> list[tuple[str, str]]:
        """The input images given, in order, each with its field's name."""
        given = ((name, getattr(self, name)) for name in IMAGE_FIELDS)
        return [(name, value) for name, value in given if value is not None]

    def sampler(self) -> tuple[int | None, float | None]:
        """Steps and guidance: only the flex path takes them."""
        return None, None

    def task_input(self, path: str, route: BflRoute) -> tuple[str, TaskInput]:
        """The fluxserve model and task input this body asks for on `path`."""
        images = self.images()
        model = route.model_for(bool(images))
        steps, guidance = self.sampler() if model.startswith("flux-2-flex") else (None, None)
        task_input = TaskInput(
            prompt=self.prompt,
            size="auto",
            resolution=price_resolution(self.width or 0, self.height or 0),
            image_urls=tuple(value for _, value in images),
            seed=self.seed,
            output_format=self.output_format or "jpeg",
            steps=steps,
            guidance=guidance,
            width=self.width,
            height=self.height,
            bfl=BflOptions(
                path, self.safety_tolerance, self.prompt_upsampling, self.webhook_secret
            ),
        )
        return model, task_input


class BflKleinInputs(BflInputs):
    """The body of POST /v1/flux-2-klein-4b and -9b: at most 4 input images."""

    @model_validator(mode="after")
    def _few_images(self) -> BflKleinInputs:
        if len(self.images()) > KLEIN_MAX_IMAGES:
            raise ValueError(f"FLUX.2 [klein] takes at most {KLEIN_MAX_IMAGES} input images")
        return self


class BflFlexInputs(BflInputs):
    """The body of POST /v1/flux-2-flex: the others' fields, with steps and guidance.
    Omitted, they are the fluxserve model's own defaults."""

    steps: Annotated[WholeNumber, Field(ge=STEPS_RANGE[0], le=STEPS_RANGE[1])] | None = None
    guidance: (
        Annotated[StrictFloat | StrictInt, Field(ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])] | None
    ) = None

    def sampler(self) -> tuple[int | None, float | None]:
        return self.steps, None if self.guidance is None else float(self.guidance)


def inputs_of(path: str) -> type[BflInputs]:
    """The body `path` reads."""
    if path in FLEX_PATHS:
        return BflFlexInputs
    return BflKleinInputs if path.startswith("flux-2-klein") else BflInputs
