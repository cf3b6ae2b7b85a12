"""The paths of Black Forest Labs' wire, and which fluxserve models each runs on
(the `bfl_models` setting; docs/bfl-api.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from fluxserve.protocol import EDIT_MODELS, MODELS

BFL_PATHS: tuple[str, ...] = (
    "flux-2-pro",
    "flux-2-flex",
    "flux-2-max",
    "flux-2-klein-4b",
    "flux-2-klein-9b",
)
FLEX_PATHS = frozenset({"flux-2-flex"})
"""The paths that take `steps` and `guidance`."""


class BflRoute(BaseModel):
    """The fluxserve models one BFL path runs on: without and with input images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generate: str
    edit: str

    @field_validator("generate")
    @classmethod
    def _text_model(cls, value: str) -> str:
        if value not in MODELS or value in EDIT_MODELS:
            text_models = ", ".join(m for m in MODELS if m not in EDIT_MODELS)
            raise ValueError(f"generate must be one of {text_models}, not {value!r}")
        return value

    @field_validator("edit")
    @classmethod
    def _edit_model(cls, value: str) -> str:
        if value not in EDIT_MODELS:
            raise ValueError(f"edit must be one of {', '.join(sorted(EDIT_MODELS))}, not {value!r}")
        return value

    def model_for(self, has_images: bool) -> str:
        return self.edit if has_images else self.generate


def default_bfl_routes() -> dict[str, BflRoute]:
    """flex runs on fluxserve's flex models, every other path on its pro models."""
    pro = BflRoute(generate="flux-2-pro", edit="flux-2-pro-edit")
    flex = BflRoute(generate="flux-2-flex", edit="flux-2-flex-edit")
    return {path: flex if path in FLEX_PATHS else pro for path in BFL_PATHS}
