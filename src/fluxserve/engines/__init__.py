"""Engines turn a generation request into images; see `base.Engine`.

Each engine is imported only when chosen: torch and diffusers are an extra.
"""

from __future__ import annotations

from fluxserve.engines.base import Engine
from fluxserve.errors import EngineUnavailable
from fluxserve.settings import Settings

LOCAL_EXTRA_HINT = "pip install 'fluxserve[local]' torch==2.13.0"


def make_engine(settings: Settings) -> Engine:
    """The engine `settings.engine` names, not yet loaded."""
    if settings.engine == "tiny":
        try:
            from fluxserve.engines.tiny import TinyEngine
        except ImportError as exc:
            raise EngineUnavailable(
                f"the tiny engine needs torch and diffusers ({exc.name} is missing): "
                f"{LOCAL_EXTRA_HINT}"
            ) from exc
        return TinyEngine(steps=settings.tiny_steps)
    raise EngineUnavailable(f"unknown engine {settings.engine!r}")
