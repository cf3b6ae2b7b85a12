"""Several engines behind one: each public model goes to the engine planned for it."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image

from fluxserve.engines.base import Engine, GenerationRequest, ProgressCallback
from fluxserve.errors import EngineError


class RoutedEngine:
    """Dispatches on `request.model`; loads every engine it holds."""

    def __init__(self, engines: Mapping[str, Engine]) -> None:
        self.engines = dict(engines)
        names = sorted({engine.name for engine in self.engines.values()})
        self.name = "+".join(names)

    def name_for(self, model: str) -> str:
        engine = self.engines.get(model)
        return engine.name if engine is not None else self.name

    def load(self) -> None:
        done: list[int] = []
        for engine in self.engines.values():
            if id(engine) not in done:
                done.append(id(engine))
                engine.load()

    def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback
    ) -> list[Image.Image]:
        engine = self.engines.get(request.model or "")
        if engine is None:
            raise EngineError(f"this worker does not serve model {request.model!r}")
        return engine.generate(request, on_progress)
