"""Engines turn a generation request into images; see `base.Engine`.

Each engine is imported only when chosen: torch and diffusers are an extra.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fluxserve.checkpoints import fallback_warning, plan_engines
from fluxserve.engines.base import Engine
from fluxserve.errors import EngineUnavailable
from fluxserve.settings import Settings
from fluxserve.tasks import MODELS

logger = logging.getLogger(__name__)

LOCAL_EXTRA_HINT = "pip install 'fluxserve[local]' torch==2.13.0"


def make_engine(settings: Settings, models: Sequence[str] = MODELS) -> Engine:
    """The engine for `models` as `settings` route them, not yet loaded.

    All on tiny: the tiny engine. Otherwise one engine per model behind a router;
    models that `engine = "auto"` put on tiny are logged loudly here.
    """
    plans = plan_engines(settings, models)
    upstream = [plan.model for plan in plans if plan.engine == "bfl"]
    if upstream:
        # Never a local engine in their place: the upstream worker runs them.
        raise EngineUnavailable(f"{', '.join(upstream)} run at Black Forest Labs' API (bfl)")
    warning = fallback_warning(plans)
    if warning:
        logger.warning(warning)
    if all(plan.engine == "tiny" for plan in plans):
        return _tiny(settings)
    try:
        from fluxserve.engines.diffusers import DiffusersEngine
    except ImportError as exc:
        raise EngineUnavailable(
            f"the diffusers engine needs torch and diffusers ({exc.name} is missing): "
            f"{LOCAL_EXTRA_HINT}"
        ) from exc
    real = [plan for plan in plans if plan.engine == "diffusers"]
    diffusers_engine = DiffusersEngine(
        real,
        max_loaded=settings.max_loaded_pipelines,
        allow_downloads=settings.allow_downloads,
        compile_transformer=settings.compile_transformer,
        prompt_cache_size=settings.prompt_cache_size,
        lora_memory_bytes=settings.lora_memory_bytes,
        lora_hotswap_rank=settings.lora_hotswap_rank,
    )
    tiny = _tiny(settings) if len(real) < len(plans) else diffusers_engine
    from fluxserve.engines.routed import RoutedEngine

    return RoutedEngine(
        {plan.model: diffusers_engine if plan.engine == "diffusers" else tiny for plan in plans}
    )


def upstream_models(settings: Settings, models: Sequence[str] = MODELS) -> list[str]:
    """Those of `models` that run at Black Forest Labs' API (`engine = "bfl"`)."""
    return [plan.model for plan in plan_engines(settings, models) if plan.engine == "bfl"]


def _tiny(settings: Settings) -> Engine:
    try:
        from fluxserve.engines.tiny import TinyEngine
    except ImportError as exc:
        raise EngineUnavailable(
            f"the tiny engine needs torch and diffusers ({exc.name} is missing): {LOCAL_EXTRA_HINT}"
        ) from exc
    return TinyEngine(
        steps=settings.tiny_steps,
        prompt_cache_size=settings.prompt_cache_size,
        lora_memory_bytes=settings.lora_memory_bytes,
    )
