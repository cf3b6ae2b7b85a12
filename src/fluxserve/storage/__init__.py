"""Where result files live; see `base.Storage`."""

from __future__ import annotations

from fluxserve.storage.base import Storage
from fluxserve.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage"]
