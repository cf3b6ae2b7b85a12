"""One wrapper for every test that needs an engine to pause, slow down, count its steps,
hold its load or fail at a chosen step: the real engine inside, a hook around it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

from fluxserve.engines.base import BatchEngine, Engine, GenerationRequest, ProgressCallback

StepHook = Callable[[Sequence[GenerationRequest], int, int], object]
"""Called as `hook(requests, steps_done, steps_total)` on the engine's thread; it may
block (to pause or slow the task) or raise (to fail it)."""


class Hooked:
    """`inner`, with `at_step` run at each denoising step, before the step's progress is
    reported (after it, with `after_report`), and `before_load` run before it loads.

    It reports `inner`'s name, and draws one request per call: see `HookedBatch` for
    an engine that batches.
    """

    def __init__(
        self,
        inner: Engine,
        at_step: StepHook | None = None,
        *,
        after_report: bool = False,
        before_load: Callable[[], object] | None = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.at_step = at_step
        self.after_report = after_report
        self.before_load = before_load

    def load(self) -> None:
        if self.before_load is not None:
            self.before_load()
        self.inner.load()

    def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback
    ) -> list[Image.Image]:
        return self.inner.generate(request, self.hooked([request], on_progress))

    def hooked(
        self, requests: Sequence[GenerationRequest], on_progress: ProgressCallback
    ) -> ProgressCallback:
        """`on_progress`, with the step hook run before or after it."""

        def progress(done: int, total: int) -> None:
            if self.at_step is not None and not self.after_report:
                self.at_step(requests, done, total)
            on_progress(done, total)
            if self.at_step is not None and self.after_report:
                self.at_step(requests, done, total)

        return progress


class HookedBatch(Hooked):
    """`Hooked`, for an inner engine that batches: the hook sees the whole batch."""

    def generate_batch(
        self, requests: Sequence[GenerationRequest], on_progress: ProgressCallback
    ) -> list[list[Image.Image]]:
        assert isinstance(self.inner, BatchEngine)
        return self.inner.generate_batch(requests, self.hooked(requests, on_progress))
