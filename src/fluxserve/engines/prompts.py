"""Prompt embeddings kept for reuse: a repeated prompt skips the text encoder."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

MAX_SEQUENCE_LENGTH = 512
"""Tokens each prompt is padded or cut to: the FLUX.2 pipelines' default."""

# The prompt and the options it was encoded with.
PromptKey = tuple[str, int]


class PromptCache:
    """The embeddings of one pipeline's most recent prompts, the least recent dropped.

    Embeddings stay on the device that computed them and go with the cache, so
    with their pipeline. Not locked itself: callers hold the pipeline's lock,
    which the text encoder needs anyway. Size 0 disables it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._embeds: OrderedDict[PromptKey, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._embeds)

    def clear(self) -> None:
        """Drop every kept embedding (to give the memory back)."""
        self._embeds.clear()

    def text_inputs(self, pipeline: Any, prompts: Sequence[str]) -> dict[str, Any]:
        """The pipeline call's text arguments for `prompts`: their embeddings when cached.

        Each distinct prompt is encoded once and the batch's embeddings stacked
        in order. The pipelines derive text ids from the embeddings alone, so the
        embeddings are all there is to keep. [klein] without guidance
        distillation also encodes an empty negative prompt for classifier-free
        guidance: kept too, and repeated for each image.
        """
        if self.size == 0:
            return {"prompt": list(prompts), "max_sequence_length": MAX_SEQUENCE_LENGTH}
        inputs = {"prompt_embeds": _stacked([self.embeds(pipeline, p) for p in prompts])}
        if pipeline.config.get("is_distilled") is False:
            inputs["negative_prompt_embeds"] = _stacked([self.embeds(pipeline, "")] * len(prompts))
        return inputs

    def embeds(
        self, pipeline: Any, prompt: str, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH
    ) -> torch.Tensor:
        """`prompt` encoded by `pipeline`'s text encoder, or taken from the cache."""
        key = (prompt, max_sequence_length)
        if key in self._embeds:
            self._embeds.move_to_end(key)
            return self._embeds[key]
        embeds, _text_ids = pipeline.encode_prompt(
            prompt=prompt,
            device=pipeline._execution_device,
            max_sequence_length=max_sequence_length,
        )
        self._embeds[key] = embeds
        while len(self._embeds) > self.size:
            self._embeds.popitem(last=False)
        return embeds


def _stacked(embeds: list[torch.Tensor]) -> torch.Tensor:
    """One batch of embeddings; a batch of one is the kept tensor itself, not a copy."""
    return embeds[0] if len(embeds) == 1 else torch.cat(embeds)
