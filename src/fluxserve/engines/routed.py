"""Several engines behind one: each public model goes to the engine planned for it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image

from fluxserve.engines.base import Engine, GenerationRequest, ProgressCallback, generate_batch
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
        return self._engine(request.model).generate(request, on_progress)

    def generate_batch(
        self, requests: Sequence[GenerationRequest], on_progress: ProgressCallback
    ) -> list[list[Image.Image]]:
        """A batch of one model, to its engine: in one call where that engine batches."""
        return generate_batch(self._engine(requests[0].model), requests, on_progress)

    def _engine(self, model: str | None) -> Engine:
        engine = self.engines.get(model or "")
        if engine is None:
            raise EngineError(f"this worker does not serve model {model!r}")
        return engine
