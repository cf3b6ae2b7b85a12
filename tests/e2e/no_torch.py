"""`fluxserve`, in a process where the `[local]` extra cannot be imported.

Run as `python tests/e2e/no_torch.py serve` (or any other command): importing torch,
diffusers, transformers, accelerate or huggingface_hub raises ImportError, as on a
machine where only `pip install fluxserve` was run.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

BLOCKED = frozenset({"torch", "diffusers", "transformers", "accelerate", "huggingface_hub"})


class RefuseLocalExtra(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname.partition(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is not installed here", name=fullname)
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, RefuseLocalExtra())
    from fluxserve.cli import app

    app(prog_name="fluxserve")
