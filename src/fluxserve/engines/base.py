"""The engine port: one small interface every image backend implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

ProgressCallback = Callable[[int, int], None]
"""Called as `on_progress(steps_done, steps_total)` after each denoising step.

It runs on the engine's thread. It may raise (for example to cancel the task):
the engine must let the exception stop generation and propagate it unchanged.
"""


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file on this machine, to apply at `scale`."""

    key: str
    """The same for the same file: adapters are kept loaded, and found again, by it."""
    path: Path
    scale: float
    label: str
    """Its name or URL, for messages."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to draw: everything an engine needs, already validated and sized."""

    prompt: str
    width: int
    height: int
    seed: int
    steps: int | None = None
    guidance: float | None = None
    images: Sequence[Image.Image] = field(default_factory=tuple)
    model: str | None = None
    """The public model name; engines that route per model read it."""
    loras: tuple[LoraWeights, ...] = ()
    """Applied in this order; a batch's requests share them."""


class Engine(Protocol):
    """An image backend. `load` and `generate` block: call them off the event loop."""

    name: str
    """Short label reported in each task's status data, e.g. "tiny"."""

    def load(self) -> None:
        """Build or load the model once; later calls do nothing."""

    def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback
    ) -> list[Image.Image]:
        """Draw the images for `request`, reporting each step to `on_progress`."""
        ...


@runtime_checkable
class BatchEngine(Engine, Protocol):
    """An engine that can also draw several requests in one pipeline call."""

    def generate_batch(
        self, requests: Sequence[GenerationRequest], on_progress: ProgressCallback
    ) -> list[list[Image.Image]]:
        """Draw `requests` together: one list of images per request, in order.

        The requests share model, size, steps, guidance and LoRAs, and have no
        references; each keeps its own prompt and seed. `on_progress` counts the
        batch's steps.
        """
        ...


def batches(engine: Engine) -> bool:
    """Whether `engine` draws several requests in one call."""
    return isinstance(engine, BatchEngine)


def generate_batch(
    engine: Engine, requests: Sequence[GenerationRequest], on_progress: ProgressCallback
) -> list[list[Image.Image]]:
    """`requests` drawn by `engine`: in one call where it batches, else one at a time.

    A single request always goes to `generate`.
    """
    if len(requests) == 1:
        return [engine.generate(requests[0], on_progress)]
    if isinstance(engine, BatchEngine):
        return engine.generate_batch(requests, on_progress)
    images = []
    for index, request in enumerate(requests):

        def counted(done: int, total: int, before: int = index) -> None:
            on_progress(before * total + done, len(requests) * total)

        images.append(engine.generate(request, counted))
    return images


def engine_label(engine: Engine, model: str) -> str:
    """What a task of `model` reports as its engine: per model where the engine routes."""
    name_for: Callable[[str], str] | None = getattr(engine, "name_for", None)
    return name_for(model) if name_for is not None else engine.name
