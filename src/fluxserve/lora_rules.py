"""What a task may ask of LoRAs, checked at submit: how many, on which models, which
names, which URLs. See docs/lora.md."""

from __future__ import annotations

from collections.abc import Sequence

from fluxserve.errors import InvalidRequest, UnsafeURLError
from fluxserve.loras import LoraCatalog
from fluxserve.net_policy import NetPolicy, check_url
from fluxserve.settings import Settings
from fluxserve.tasks import LoraSpec


class LoraRules:
    """The submit-time checks of `input.loras`, for one process's settings."""

    def __init__(self, settings: Settings, policy: NetPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self.catalog = LoraCatalog(settings.resolved_lora_dir)

    def check(self, model: str, loras: Sequence[LoraSpec]) -> None:
        """Raise InvalidRequest (a 400) naming what is wrong with `loras` for `model`."""
        if not loras:
            return
        limit = self.settings.max_loras
        if limit == 0:
            raise InvalidRequest("input.loras is not accepted: LoRAs are turned off (max_loras)")
        if len(loras) > limit:
            raise InvalidRequest(f"input.loras must hold at most {limit} LoRAs (max_loras)")
        route = self.settings.models.get(model)
        if route is None or not route.takes_loras:
            engine = "none" if route is None else repr(route.engine)
            raise InvalidRequest(
                f"input.loras is not accepted by {model}: its engine ({engine}) cannot load LoRAs"
            )
        seen: set[str] = set()
        for index, lora in enumerate(loras):
            if lora.label in seen:
                raise InvalidRequest(f"input.loras[{index}] repeats {lora.label!r}")
            seen.add(lora.label)
            if lora.name is not None:
                self._check_name(index, lora.name)
            elif lora.url is not None:
                self._check_url(index, lora.url)

    def _check_name(self, index: int, name: str) -> None:
        if self.catalog.find(name) is not None:
            return
        names = self.catalog.names()
        known = (
            "available: " + ", ".join(names)
            if names
            else f"none is available (LoRA files go in {self.catalog.folder})"
        )
        raise InvalidRequest(f"input.loras[{index}].name: unknown LoRA {name!r}; {known}")

    def _check_url(self, index: int, url: str) -> None:
        if not self.settings.allow_lora_urls:
            raise InvalidRequest(
                f"input.loras[{index}].url is not accepted: LoRAs by URL are turned off "
                "(allow_lora_urls); name one of GET /api/loras instead"
            )
        try:
            check_url(url, self.policy)
        except UnsafeURLError as exc:
            raise InvalidRequest(f"input.loras[{index}].url is not allowed: {exc}") from exc
