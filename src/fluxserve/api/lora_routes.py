"""GET /api/loras: the LoRAs a task may name, and what LoRAs this server accepts."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from fluxserve.api.openapi import answers
from fluxserve.api.routes import KeyDep, RuntimeDep
from fluxserve.wire import ok

router = APIRouter()


class LoraData(BaseModel):
    name: str = Field(description="What `input.loras[].name` takes")
    source: Literal["folder", "huggingface"]
    base_model: str | None = Field(description="The model it was made for; null when unstated")


class LoraList(BaseModel):
    loras: list[LoraData]
    max_loras: int = Field(description="LoRAs one task may ask for")
    urls_allowed: bool = Field(description="Whether `input.loras[].url` is accepted")
    models: list[str] = Field(description="The models whose engine loads LoRAs")


@router.get("/api/loras", **answers(LoraList))
async def loras(_key: KeyDep, rt: RuntimeDep) -> dict[str, Any]:
    """The LoRAs in this server's LoRA folder and Hugging Face cache, with their base model."""
    settings = rt.settings
    rules = rt.service.lora_rules
    found = [] if rules is None else await asyncio.to_thread(rules.catalog.available)
    return ok(
        {
            "loras": [lora.to_json() for lora in found],
            "max_loras": settings.max_loras,
            "urls_allowed": settings.allow_lora_urls,
            "models": [model for model, route in settings.models.items() if route.takes_loras],
        }
    )
