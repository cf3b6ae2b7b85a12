"""The request bodies of the wire contract, with the rules docs/api.md gives under "Submit"."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    model_validator,
)
from pydantic.json_schema import JsonDict, JsonValue

from fluxserve.sizes import SIZE_CHOICES
from fluxserve.tasks import (
    CALLBACK_EVENTS,
    EDIT_MODELS,
    MODELS,
    OUTPUT_FORMATS,
    TERMINAL_EVENTS,
    LoraSpec,
    TaskInput,
)

MAX_URL_LENGTH = 2048
MAX_IMAGES = 8
PROMPT_MIN, PROMPT_MAX = 3, 5000
RESOLUTIONS = ("1K", "2K")
STEPS_RANGE = (1, 50)
GUIDANCE_RANGE = (1.5, 10.0)
LORA_SCALE_RANGE = (-2.0, 2.0)
# What the body may hold at all; the max_loras setting is the limit, checked at submit.
MAX_LORA_ENTRIES = 16
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
LORA_SUFFIX = ".safetensors"


# What str.strip() strips, spelled out: `\s` differs between Python's regular
# expressions and the ECMA ones a JSON Schema pattern is read with.
_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# What the checks below accept, for the OpenAPI document; the checks give the messages.
PROMPT_SCHEMA: JsonDict = {
    "pattern": rf"^[{_SPACE}]*[^{_SPACE}][\s\S]{{{PROMPT_MIN - 2},{PROMPT_MAX - 2}}}"
    rf"[^{_SPACE}][{_SPACE}]*$",
    "description": f"{PROMPT_MIN} to {PROMPT_MAX} characters once leading and trailing "
    "whitespace is stripped (the stripped text is what is kept)",
}
HTTP_URL_SCHEMA: JsonDict = {
    "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]",
    "maxLength": MAX_URL_LENGTH,
}
IMAGE_URLS_SCHEMA: JsonDict = {"items": {"anyOf": [HTTP_URL_SCHEMA, {"pattern": "^data:"}]}}
CALLBACK_EVENTS_SCHEMA: JsonDict = {"minItems": 1, "items": {"enum": list(CALLBACK_EVENTS)}}


def _whole(value: Any) -> Any:
    # JSON does not tell 7 from 7.0, and neither does a JSON Schema "integer".
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = Annotated[StrictInt, BeforeValidator(_whole)]
"""An integer, written with or without a zero fraction; never a string or a bool."""


def one_of(choices: Sequence[str], default: Any = ...) -> Any:
    """A text field whose documented schema lists `choices`; the model's own
    validator checks it, with a message naming the field."""
    return Field(default, json_schema_extra={"enum": list(choices)})


# JSON's \ud800-style escapes can spell half of a UTF-16 pair alone: no UTF-8
# text holds one, so the store, the tokenizer and every JSON answer would fail on it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _one_of(choices: tuple[str, ...]) -> str:
    return "must be one of " + ", ".join(choices)


def check_http_url(value: str, field: str, *, allow_data: bool = False) -> None:
    if allow_data and value.startswith("data:"):
        return
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"{field} must be at most {MAX_URL_LENGTH} characters")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest[0] in "/?#":
        kinds = "an http(s) or data:image URL" if allow_data else "an http(s) URL"
        raise ValueError(f"{field} must be {kinds}")


def clean_prompt(prompt: str, field: str) -> str:
    """`prompt` stripped; a ValueError naming `field` when that is too short, too
    long, or not valid Unicode text."""
    # The text kept, counted and handed to the engine is the stripped one:
    # surrounding whitespace means nothing to a text encoder, and counting
    # one text while storing another let "a cat" and ten million spaces in.
    prompt = prompt.strip()
    if not PROMPT_MIN <= len(prompt) <= PROMPT_MAX:
        raise ValueError(
            f"{field} must be {PROMPT_MIN} to {PROMPT_MAX} characters (got {len(prompt)})"
        )
    surrogate = _LONE_SURROGATE.search(prompt)
    if surrogate:
        raise ValueError(
            f"{field} must be valid Unicode text: it holds a lone surrogate "
            f"(U+{ord(surrogate.group()):04X}) at character {surrogate.start()}"
        )
    return prompt


class LoraEntry(BaseModel):
    """One of `input.loras`: a `name` (see GET /api/loras) or a `url`, and a `scale`."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, json_schema_extra={"pattern": LORA_NAME_PATTERN})
    url: str | None = Field(None, json_schema_extra=HTTP_URL_SCHEMA)
    scale: StrictFloat | StrictInt = Field(
        1.0, json_schema_extra={"minimum": LORA_SCALE_RANGE[0], "maximum": LORA_SCALE_RANGE[1]}
    )

    def check(self, field: str) -> None:
        if (self.name is None) == (self.url is None):
            raise ValueError(f"{field} must have a name or a url, not both")
        if self.name is not None and not re.fullmatch(LORA_NAME_PATTERN, self.name):
            raise ValueError(
                f"{field}.name must be a LoRA file's name or an owner/name repo id (see GET "
                "/api/loras)"
            )
        if self.url is not None:
            check_http_url(self.url, f"{field}.url")
            if not self.url.split("?", 1)[0].split("#", 1)[0].lower().endswith(LORA_SUFFIX):
                raise ValueError(f"{field}.url must name a {LORA_SUFFIX} file")
        if not LORA_SCALE_RANGE[0] <= self.scale <= LORA_SCALE_RANGE[1]:
            raise ValueError(
                f"{field}.scale must be between {LORA_SCALE_RANGE[0]:g} and {LORA_SCALE_RANGE[1]:g}"
            )

    def spec(self) -> LoraSpec:
        return LoraSpec(name=self.name, url=self.url, scale=float(self.scale))


class SubmitInput(BaseModel):
    """`input` of POST /api/generate/submit."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(json_schema_extra=PROMPT_SCHEMA)
    size: str = one_of(SIZE_CHOICES, "auto")
    resolution: str = one_of(RESOLUTIONS, "1K")
    image_urls: list[str] | None = Field(None, json_schema_extra=IMAGE_URLS_SCHEMA)
    seed: Annotated[WholeNumber, Field(ge=0, le=2**32 - 1)] | None = None
    output_format: str = one_of(tuple(OUTPUT_FORMATS), "png")
    steps: WholeNumber | None = None
    guidance: StrictFloat | StrictInt | None = None
    loras: list[LoraEntry] | None = Field(None, max_length=MAX_LORA_ENTRIES)

    @model_validator(mode="after")
    def _check(self) -> SubmitInput:
        self.prompt = clean_prompt(self.prompt, "input.prompt")
        if self.size not in SIZE_CHOICES:
            raise ValueError(f"input.size {_one_of(SIZE_CHOICES)}")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"input.resolution {_one_of(RESOLUTIONS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"input.output_format {_one_of(tuple(OUTPUT_FORMATS))}")
        for index, url in enumerate(self.image_urls or ()):
            check_http_url(url, f"input.image_urls[{index}]", allow_data=True)
        for index, lora in enumerate(self.loras or ()):
            lora.check(f"input.loras[{index}]")
        return self


def _submit_rules(schema: JsonDict) -> None:
    """The rules between fields, for the document: what each model takes in `input`,
    and callback_events only with a callback_url."""
    null: JsonDict = {"type": "null"}
    images: JsonDict = {"type": "array", "minItems": 1, "maxItems": MAX_IMAGES}
    no_images: JsonDict = {"anyOf": [null, {"type": "array", "maxItems": 0}]}
    steps: JsonDict = {"type": "integer", "minimum": STEPS_RANGE[0], "maximum": STEPS_RANGE[1]}
    guidance: JsonDict = {
        "type": "number",
        "minimum": GUIDANCE_RANGE[0],
        "maximum": GUIDANCE_RANGE[1],
    }
    branches: list[JsonValue] = []
    for model in MODELS:
        edit, flex = model in EDIT_MODELS, model.startswith("flux-2-flex")
        rules: JsonDict = {
            "required": ["image_urls"] if edit else [],
            "properties": {
                "image_urls": images if edit else no_images,
                "steps": {"anyOf": [steps, null]} if flex else null,
                "guidance": {"anyOf": [guidance, null]} if flex else null,
            },
        }
        branches.append({"properties": {"model": {"const": model}, "input": rules}})
    schema["oneOf"] = branches
    schema["anyOf"] = [
        {"properties": {"callback_events": {"type": "null"}}},
        {"required": ["callback_url"], "properties": {"callback_url": {"type": "string"}}},
    ]


class SubmitBody(BaseModel):
    """The body of POST /api/generate/submit."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_submit_rules)

    model: str = one_of(MODELS)
    callback_url: str | None = Field(None, json_schema_extra=HTTP_URL_SCHEMA)
    callback_events: list[str] | None = Field(None, json_schema_extra=CALLBACK_EVENTS_SCHEMA)
    input: SubmitInput

    @model_validator(mode="after")
    def _check(self) -> SubmitBody:
        if self.model not in MODELS:
            raise ValueError(f"model {_one_of(MODELS)}")
        if self.callback_url is not None:
            check_http_url(self.callback_url, "callback_url")
        self._check_callback_events()
        urls = self.input.image_urls
        if self.model in EDIT_MODELS:
            if not urls:
                raise ValueError(f"input.image_urls is required for {self.model} (1 to 8 URLs)")
            if len(urls) > MAX_IMAGES:
                raise ValueError(f"input.image_urls must hold at most {MAX_IMAGES} URLs")
        elif urls:
            raise ValueError(
                f"input.image_urls is only accepted by the edit models, not {self.model}"
            )
        self._check_sampler()
        return self

    def _check_callback_events(self) -> None:
        events = self.callback_events
        if events is None:
            return
        if self.callback_url is None:
            raise ValueError("callback_events needs a callback_url to send them to")
        unknown = [event for event in events if event not in CALLBACK_EVENTS]
        if not events or unknown:
            raise ValueError(
                "callback_events must be a non-empty list of "
                + ", ".join(CALLBACK_EVENTS)
                + (f" (got {unknown[0]!r})" if unknown else "")
            )

    def task_callback_events(self) -> tuple[str, ...]:
        """The events asked for, in the order a task meets them; the terminal ones by default."""
        if self.callback_events is None:
            return TERMINAL_EVENTS
        return tuple(event for event in CALLBACK_EVENTS if event in self.callback_events)

    def _check_sampler(self) -> None:
        steps, guidance = self.input.steps, self.input.guidance
        flex = self.model.startswith("flux-2-flex")
        for name, value in (("steps", steps), ("guidance", guidance)):
            if value is not None and not flex:
                raise ValueError(f"input.{name} is only accepted by the flex models")
        if steps is not None and not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
            raise ValueError(f"input.steps must be between {STEPS_RANGE[0]} and {STEPS_RANGE[1]}")
        if guidance is not None and not GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]:
            raise ValueError(
                f"input.guidance must be between {GUIDANCE_RANGE[0]} and {GUIDANCE_RANGE[1]}"
            )

    def digest(self) -> str:
        """A hash of what this body asks for: equal bodies, however spelled, hash equal."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def task_input(self) -> TaskInput:
        i = self.input
        return TaskInput(
            prompt=i.prompt,
            size=i.size,
            resolution=i.resolution,
            image_urls=tuple(i.image_urls or ()),
            seed=i.seed,
            output_format=i.output_format,
            steps=i.steps,
            guidance=float(i.guidance) if i.guidance is not None else None,
            loras=tuple(lora.spec() for lora in i.loras or ()),
        )


NOT_JSON = "Request body is not valid JSON"


def describe_validation_error(errors: list[Any]) -> str:
    """One message naming the field and what was wrong, from pydantic's errors."""
    if not errors:
        return "Invalid request"
    error = errors[0]
    kind = error.get("type", "")
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    field = ".".join(loc) if loc else "body"
    if kind == "json_invalid":
        return NOT_JSON
    if field == "body" and kind in ("model_type", "dict_type", "model_attributes_type"):
        return "Request body must be a JSON object"
    if kind == "missing":
        return f"{field} is required"
    if kind == "value_error":
        # Our own validators name the field themselves.
        return str(error.get("ctx", {}).get("error", error.get("msg")))
    return f"{field}: {error.get('msg', 'is invalid')}"
