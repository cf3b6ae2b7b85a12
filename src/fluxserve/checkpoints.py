"""Model routing: which engine and checkpoint serve each public model name.

`ModelRoute` is one row of the settings' `models` table. `plan_engines` decides,
for the worker's models, what will actually run: the real checkpoint through
diffusers, `tiny` when `engine = "auto"` finds no weights, or Black Forest Labs'
API (`engine = "bfl"`, see docs/bfl-engine.md). Presence is read
from the local disk only (a folder, or the Hugging Face cache); nothing here
touches the network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fluxserve.settings import Settings

logger = logging.getLogger(__name__)

PipelineClass = Literal["Flux2KleinPipeline", "Flux2Pipeline"]
MemoryMode = Literal["gpu", "model_cpu_offload", "group_offload", "4bit", "8bit"]
DType = Literal["auto", "bfloat16", "float16", "float32"]

KLEIN_4B = "black-forest-labs/FLUX.2-klein-4B"
RouteEngine = Literal["diffusers", "tiny", "bfl"]
# The engines that run a diffusers pipeline on this machine, and so can load LoRAs.
LORA_ENGINES = frozenset({"diffusers", "tiny"})


class ModelRoute(BaseModel):
    """How one public model name is served (a `[models."flux-2-pro"]` TOML table)."""

    model_config = ConfigDict(extra="forbid")

    engine: RouteEngine = "diffusers"
    checkpoint: str = Field(default=KLEIN_4B, description="Hugging Face repo id or local folder")
    pipeline: PipelineClass = "Flux2KleinPipeline"
    revision: str | None = None
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    steps: int = Field(default=4, ge=1, le=50, description="when the task gives none")
    guidance: float | None = Field(
        default=None, ge=0, le=20, description="when the task gives none; unset: the pipeline's"
    )
    memory_mode: MemoryMode = "gpu"
    bfl_endpoint: str | None = Field(
        default=None,
        description="engine bfl: the path posted to, e.g. /v1/flux-2-pro; "
        "unset: the one named like the model",
    )

    def upstream_endpoint(self, model: str) -> str:
        """The path of Black Forest Labs' API a task of `model` is posted to; edits go
        to the generation's endpoint, with their references as `input_image`s."""
        return self.bfl_endpoint or "/v1/" + model.removesuffix("-edit")

    @property
    def takes_loras(self) -> bool:
        """Whether this route's engine loads LoRAs; an engine not in LORA_ENGINES does not."""
        return self.engine in LORA_ENGINES

    def pipeline_key(self) -> tuple[str, str, str | None, str, str]:
        """Routes with the same key share one loaded pipeline."""
        return (self.checkpoint, self.pipeline, self.revision, self.dtype, self.memory_mode)


def default_routes() -> dict[str, ModelRoute]:
    """All four public models on FLUX.2 [klein] 4B, distilled: 4 steps, no guidance."""
    from fluxserve.tasks import MODELS

    return {model: ModelRoute() for model in MODELS}


def is_local_folder(checkpoint: str) -> bool:
    """A path (absolute, ./relative, ~) rather than an `owner/name` repo id."""
    return checkpoint.startswith(("/", ".", "~")) or Path(checkpoint).expanduser().is_dir()


def local_checkpoint(route: ModelRoute) -> Path | None:
    """The folder holding the route's weights on this machine, or None. No network."""
    if is_local_folder(route.checkpoint):
        folder = Path(route.checkpoint).expanduser()
        return folder if (folder / "model_index.json").is_file() else None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        # local_files_only: answered from the cache folder alone, even online.
        path = snapshot_download(route.checkpoint, revision=route.revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    folder = Path(path)
    return folder if (folder / "model_index.json").is_file() else None


@dataclass(frozen=True)
class EnginePlan:
    """What serves one public model in this process, and why."""

    model: str
    route: ModelRoute
    engine: RouteEngine
    reason: str
    source: Path | None = None
    """The local folder of the weights; None for tiny, or when they are to be downloaded."""

    @property
    def fell_back(self) -> bool:
        return self.engine == "tiny" and self.route.engine == "diffusers"


def pull_hint(model: str) -> str:
    return (
        f"run `fluxserve models pull {model}` on a machine with internet (or copy the "
        "Hugging Face cache here), set allow_downloads = true, or point "
        f'models."{model}".checkpoint at a local folder'
    )


def plan_engines(settings: Settings, models: Sequence[str]) -> list[EnginePlan]:
    """Decide the engine of each model; `engine = "diffusers"` plans never fall back.

    A "diffusers" plan whose weights are absent and may not be downloaded keeps
    engine "diffusers" with `source=None`: the engine refuses at load, naming why.
    """
    plans = []
    for model in models:
        route = settings.models.get(model)
        if route is None:
            route = ModelRoute(engine="tiny")
            reason = f"no models.{model!r} table in the settings"
            plans.append(EnginePlan(model, route, "tiny", reason))
            continue
        if settings.engine == "bfl" or route.engine == "bfl":
            chosen = "engine = 'bfl'" if settings.engine == "bfl" else "its route says bfl"
            endpoint = route.upstream_endpoint(model)
            reason = f"{chosen}: upstream at {settings.bfl_base_url}{endpoint}"
            plans.append(EnginePlan(model, route, "bfl", reason))
            continue
        if settings.engine == "tiny" or route.engine == "tiny":
            chosen = "engine = 'tiny'" if settings.engine == "tiny" else "its route says tiny"
            plans.append(EnginePlan(model, route, "tiny", chosen))
            continue
        folder = local_checkpoint(route)
        if folder is not None:
            plans.append(EnginePlan(model, route, "diffusers", f"weights at {folder}", folder))
        elif settings.allow_downloads and not is_local_folder(route.checkpoint):
            reason = f"{route.checkpoint} is not cached; it will be downloaded at load"
            plans.append(EnginePlan(model, route, "diffusers", reason))
        elif settings.engine == "diffusers":
            reason = f"weights of {route.checkpoint} are not on this machine"
            plans.append(EnginePlan(model, route, "diffusers", reason))
        else:
            reason = f"weights of {route.checkpoint} are not on this machine; serving tiny"
            plans.append(EnginePlan(model, route, "tiny", reason))
    return plans


def fallback_warning(plans: Sequence[EnginePlan]) -> str | None:
    """The loud line for models that `auto` put on tiny, or None."""
    fallen = [plan for plan in plans if plan.fell_back]
    if not fallen:
        return None
    names = ", ".join(plan.model for plan in fallen)
    return (
        f"WARNING: engine 'auto' found no FLUX.2 weights for {names} "
        f"({fallen[0].route.checkpoint}): they are served by 'tiny', random weights, "
        f"every image is noise. To fix: {pull_hint(fallen[0].model)}."
    )
