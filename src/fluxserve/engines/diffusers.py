"""The diffusers engine: real FLUX.2 checkpoints through `from_pretrained`.

[klein] 4B/9B load as `Flux2KleinPipeline`, [dev] as `Flux2Pipeline`. Each
distinct checkpoint (with its dtype and memory mode) is one pipeline, loaded once
and kept warm, with the embeddings of its recent prompts (`prompt_cache_size`);
when more are routed than `max_loaded` allows, the least recently used one is
unloaded, its embeddings with it. Memory modes: "gpu" (all on the card),
"model_cpu_offload", "group_offload", "4bit" and "8bit" (bitsandbytes). An
out-of-memory error fails the task with a message naming `memory_mode`, and the
device cache (and the prompt embeddings) are emptied so the next task runs.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from fluxserve.checkpoints import EnginePlan, ModelRoute, pull_hint
from fluxserve.engines.base import GenerationRequest, ProgressCallback
from fluxserve.engines.flux2 import run_pipeline
from fluxserve.engines.lora_adapters import LoraAdapters
from fluxserve.engines.prompts import PromptCache
from fluxserve.errors import EngineError, EngineUnavailable

logger = logging.getLogger(__name__)

PipelineKey = tuple[str, str, str | None, str, str]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_COMPONENTS = ["transformer", "text_encoder"]


def device() -> torch.device:
    """The CUDA card when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, on: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA, float32 on the CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if on.type == "cuda" else torch.float32
    return DTYPES[name]


def empty_device_cache() -> None:
    """Give freed activations back to the allocator after an out-of-memory error."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pipeline_class(name: str) -> Any:
    # From their modules: diffusers' lazy top-level names type-check as placeholders.
    if name == "Flux2Pipeline":
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        return Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    return Flux2KleinPipeline


def quantization_config(route: ModelRoute, dtype: torch.dtype) -> Any:
    """bitsandbytes settings for the 4bit/8bit memory modes; None for the others."""
    if route.memory_mode not in ("4bit", "8bit"):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EngineUnavailable(
            f"memory_mode {route.memory_mode!r} needs bitsandbytes: pip install bitsandbytes "
            "(or set memory_mode to 'model_cpu_offload' or 'group_offload')"
        )
    from diffusers.quantizers import PipelineQuantizationConfig

    if route.memory_mode == "4bit":
        backend = "bitsandbytes_4bit"
        kwargs: dict[str, Any] = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": dtype,
        }
    else:
        backend, kwargs = "bitsandbytes_8bit", {"load_in_8bit": True}
    return PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=QUANT_COMPONENTS
    )


def oom_message(
    model: str | None, route: ModelRoute, width: int, height: int, batch: int = 1
) -> str:
    table = f'models."{model}"' if model else "models"
    drawing = f"{width}x{height}" if batch == 1 else f"a batch of {batch} at {width}x{height}"
    lower = "max_loaded_pipelines" if batch == 1 else "max_batch_size or max_loaded_pipelines"
    return (
        f"Out of GPU memory drawing {drawing} with {route.checkpoint} "
        f"(memory_mode {route.memory_mode!r}). Set {table}.memory_mode to "
        f"'model_cpu_offload', 'group_offload' or '4bit', lower {lower}, "
        "or ask for a smaller resolution."
    )


class DiffusersEngine:
    """FLUX.2 pipelines loaded from checkpoints, one per distinct checkpoint, LRU-bounded."""

    name = "diffusers"

    def __init__(
        self,
        plans: Sequence[EnginePlan],
        *,
        max_loaded: int = 1,
        allow_downloads: bool = False,
        compile_transformer: bool = False,
        prompt_cache_size: int = 0,
        lora_memory_bytes: int = 2 * 1024**3,
        lora_hotswap_rank: int = 128,
    ) -> None:
        self.plans = {plan.model: plan for plan in plans}
        self.max_loaded = max_loaded
        self.allow_downloads = allow_downloads
        self.compile_transformer = compile_transformer
        self.prompt_cache_size = prompt_cache_size
        self.lora_memory_bytes = lora_memory_bytes
        self.lora_hotswap_rank = lora_hotswap_rank
        self.device = device()
        self._loaded: OrderedDict[PipelineKey, Any] = OrderedDict()
        self._prompts: dict[PipelineKey, PromptCache] = {}
        # Each loaded pipeline's LoRAs: see lora_adapters.
        self._adapters: dict[PipelineKey, LoraAdapters] = {}
        self._lock = threading.RLock()

    def load(self) -> None:
        """Check every route can load, then load the first `max_loaded` checkpoints."""
        for plan in self.plans.values():
            if plan.source is None and not self.allow_downloads:
                raise EngineUnavailable(
                    f"{plan.model}: {plan.reason}; engine 'diffusers' does not fall back to "
                    f"tiny. To fix: {pull_hint(plan.model)}, or set engine = 'auto'."
                )
            quantization_config(plan.route, torch.float32)  # bitsandbytes present?
        seen: list[PipelineKey] = []
        for plan in self.plans.values():
            key = plan.route.pipeline_key()
            if key not in seen and len(seen) < self.max_loaded:
                seen.append(key)
                self.pipeline_for(plan.model)

    def pipeline_for(self, model: str | None) -> Any:
        """The loaded pipeline serving `model` (the first route when None), loading it."""
        plan = self._plan(model)
        key = plan.route.pipeline_key()
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            while len(self._loaded) >= self.max_loaded:
                self._unload_oldest()
            try:
                pipeline = self._from_pretrained(plan)
            except torch.OutOfMemoryError:
                # Maybe what is still loaded elsewhere on the card: free it, once.
                self._unload_all()
                empty_device_cache()
                try:
                    pipeline = self._from_pretrained(plan)
                except torch.OutOfMemoryError as exc:
                    empty_device_cache()
                    raise EngineError(oom_message(plan.model, plan.route, 0, 0)) from exc
            self._loaded[key] = pipeline
            return pipeline

    @property
    def loaded(self) -> list[PipelineKey]:
        """The loaded checkpoints, least recently used first."""
        return list(self._loaded)

    def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback
    ) -> list[Image.Image]:
        """Run the model's pipeline; `on_progress` exceptions propagate unchanged."""
        return self.generate_batch([request], on_progress)[0]

    def generate_batch(
        self, requests: Sequence[GenerationRequest], on_progress: ProgressCallback
    ) -> list[list[Image.Image]]:
        """Draw `requests` (one model and shape, see `BatchEngine`) in one pipeline call."""
        first = requests[0]
        plan = self._plan(first.model)
        route = plan.route
        with self._lock:  # the pipeline and its cache, as one: neither unloads between
            pipeline = self.pipeline_for(first.model)
            prompts = self._prompts.setdefault(
                route.pipeline_key(), PromptCache(self.prompt_cache_size)
            )
            adapters = self._adapters.get(route.pipeline_key()) or self._adapters.setdefault(
                route.pipeline_key(), self._new_adapters(pipeline, route)
            )
        steps = first.steps or route.steps
        guidance = first.guidance if first.guidance is not None else route.guidance
        try:
            return run_pipeline(
                pipeline,
                requests,
                on_progress,
                steps=steps,
                guidance=guidance,
                lock=self._lock,
                prompts=prompts,
                failure=f"FLUX.2 ({route.checkpoint}) failed",
                adapters=adapters,
            )
        except torch.OutOfMemoryError as exc:
            with self._lock:
                prompts.clear()
            empty_device_cache()
            raise EngineError(
                oom_message(first.model, route, first.width, first.height, len(requests))
            ) from exc

    def _plan(self, model: str | None) -> EnginePlan:
        if model is None:
            return next(iter(self.plans.values()))
        try:
            return self.plans[model]
        except KeyError:
            raise EngineError(f"this worker has no route for model {model!r}") from None

    def _from_pretrained(self, plan: EnginePlan) -> Any:
        route = plan.route
        dtype = resolve_dtype(route.dtype, self.device)
        source = str(plan.source) if plan.source is not None else route.checkpoint
        logger.info(
            "loading %s (%s, %s, memory_mode %s) on %s",
            source,
            route.pipeline,
            dtype,
            route.memory_mode,
            self.device,
        )
        options: dict[str, Any] = {"dtype": dtype}
        quant = quantization_config(route, dtype)
        if quant is not None:
            if self.device.type != "cuda":
                raise EngineUnavailable(f"memory_mode {route.memory_mode!r} needs a CUDA GPU")
            options["quantization_config"] = quant
        if plan.source is None:
            options["revision"] = route.revision
        try:
            pipeline = pipeline_class(route.pipeline).from_pretrained(
                source, local_files_only=not self.allow_downloads, **options
            )
        except torch.OutOfMemoryError:
            raise
        except ImportError as exc:
            # FLUX.2 [dev]'s tokenizer is a PixtralProcessor: transformers needs torchvision.
            raise EngineUnavailable(
                f"loading {source} needs a package that is not installed: {exc}. For "
                "FLUX.2 [dev], pip install torchvision (the build matching your torch)"
            ) from exc
        except (OSError, ValueError) as exc:
            raise EngineUnavailable(
                f"could not load {source} as {route.pipeline}: {exc}. To fix: "
                f"{pull_hint(plan.model)}"
            ) from exc
        self._place(pipeline, route)
        pipeline.set_progress_bar_config(disable=True)  # progress goes to on_progress
        # Hotswap is prepared before the first LoRA and before compiling: a
        # compiled transformer then swaps LoRAs without recompiling.
        self._adapters[route.pipeline_key()] = self._new_adapters(pipeline, route)
        if self.compile_transformer:
            pipeline.transformer.compile()
        return pipeline

    def _new_adapters(self, pipeline: Any, route: ModelRoute) -> LoraAdapters:
        return LoraAdapters(
            pipeline,
            base=route.checkpoint,
            memory_bytes=self.lora_memory_bytes,
            hotswap_rank=self.lora_hotswap_rank if self.compile_transformer else None,
        )

    def _place(self, pipeline: Any, route: ModelRoute) -> None:
        mode = route.memory_mode
        if self.device.type != "cuda":
            if mode not in ("gpu", "4bit", "8bit"):
                logger.warning("no GPU: memory_mode %r has no effect on the CPU", mode)
            pipeline.to(self.device)
        elif mode == "model_cpu_offload":
            pipeline.enable_model_cpu_offload()
        elif mode == "group_offload":
            pipeline.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="leaf_level",
                use_stream=True,
            )
        elif mode == "gpu":
            pipeline.to(self.device)
        else:
            # 4bit/8bit: the quantized parts are on the card already; move the rest.
            for name, component in pipeline.components.items():
                if name not in QUANT_COMPONENTS and isinstance(component, torch.nn.Module):
                    component.to(self.device)

    def _unload_oldest(self) -> None:
        key, _ = self._loaded.popitem(last=False)
        self._prompts.pop(key, None)
        self._adapters.pop(key, None)
        logger.info("unloading %s (least recently used)", key[0])
        empty_device_cache()

    def _unload_all(self) -> None:
        while self._loaded:
            self._unload_oldest()
