"""What Black Forest Labs' wire answers, for the OpenAPI document (see openapi.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from fluxserve.bfl_wire import STATUSES

_WHEN = {
    400: "A reference that cannot be used (not an image, refused by the net guard)",
    401: "Missing, unknown or revoked API key (`x-key`)",
    402: "The task's price is more than the account's available credits",
    413: "The request is larger than allowed",
    422: "A field that does not validate; `detail` lists each",
    429: "Past the key's rate or active-task limit",
    503: "The database cannot be reached right now",
}


class AsyncResponse(BaseModel):
    id: str
    polling_url: str = Field(description="GET it with the same key until `status` is final")
    cost: float | None = Field(description="Credits the task holds, charged if it finishes")
    input_mp: float | None = Field(description="Not measured at submit: always null")
    output_mp: float | None = Field(description="Megapixels asked for; null when unset")


class Sample(BaseModel):
    sample: str | None = Field(description="The image's fluxserve URL; null once removed")
    prompt: str
    seed: int | None
    start_time: float
    end_time: float
    duration: float = Field(ge=0)


class ResultResponse(BaseModel):
    id: str
    status: Literal[STATUSES]  # type: ignore[valid-type]
    result: Sample | None
    progress: float | None = Field(ge=0, le=1)
    details: dict[str, Any] | None
    preview: None


class BflError(BaseModel):
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class BflValidationError(BaseModel):
    detail: list[FieldError]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "model": BflValidationError if status == 422 else BflError,
            "description": _WHEN[status],
        }
        for status in statuses
    }


SUBMIT_ANSWERS: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": AsyncResponse}, **_errors(400, 401, 402, 413, 422, 429, 503)},
}
RESULT_ANSWERS: dict[str, Any] = {
    "response_model": None,
    "responses": {
        200: {"model": ResultResponse},
        404: {"model": ResultResponse, "description": "`status` is `Task not found`"},
        **_errors(401, 413, 422, 503),
    },
}
