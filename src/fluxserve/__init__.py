"""fluxserve: self-hosted FLUX.2 image generation behind the unified task API."""

from __future__ import annotations

__version__ = "0.1.0"
