"""The LoRAs of one diffusers pipeline: loaded into its transformer, kept warm, swapped.

Two ways, chosen by whether the transformer is compiled:

* Resident (not compiled): each LoRA is its own peft adapter, named by its key,
  and stays loaded after its task; the least recently used unload once their
  weights pass `memory_bytes`. Switching between loaded LoRAs is `set_adapters`,
  with no reading and no copying; the base weights are never touched.
* Hotswap (compiled, `hotswap_rank` set): a fixed set of adapter slots whose
  weights are replaced in place (`load_lora_weights(..., hotswap=True)`, prepared
  by `enable_lora_hotswap` before the first load and before compiling), so the
  compiled graph is reused. Unused slots are kept at scale 0. The LoRAs' weights
  are kept on the CPU, the least recently used dropped past `memory_bytes`.

A task with no LoRA runs with none active. A LoRA that does not fit the
transformer (a layer it lacks, another width) is refused before it is loaded, and
one whose load fails anyway is removed again: the message says it does not fit,
and nothing of it is left behind.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fluxserve.engines.base import LoraWeights
from fluxserve.errors import EngineError
from fluxserve.loras import base_model_of, safetensors_header

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def adapter_name(key: str) -> str:
    """A peft adapter name for a LoRA key: no dots, which module paths would split."""
    return f"lora_{key[:24]}"


class LoraAdapters:
    """The LoRAs loaded into `pipeline`'s transformer; not thread-safe (call under the
    pipeline's lock)."""

    def __init__(
        self,
        pipeline: Any,
        *,
        base: str,
        memory_bytes: int,
        hotswap_rank: int | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.base = base
        self.memory_bytes = memory_bytes
        self.hotswap = hotswap_rank is not None
        if hotswap_rank is not None:
            # "warn": a transformer compiled before this (handed over already
            # compiled) recompiles once at the first LoRA instead of failing it.
            pipeline.enable_lora_hotswap(target_rank=hotswap_rank, check_compiled="warn")
        # Resident: adapter name -> bytes, least recently used first.
        self._resident: OrderedDict[str, int] = OrderedDict()
        # Hotswap: slot -> the key of the LoRA in it; LoRA key -> its weights.
        self._slots: dict[str, str] = {}
        self._weights: OrderedDict[str, tuple[StateDict, int]] = OrderedDict()

    @property
    def loaded(self) -> list[str]:
        """The adapters in the transformer, least recently used first (slots when hotswapping)."""
        return list(self._slots) if self.hotswap else list(self._resident)

    def activate(self, loras: Sequence[LoraWeights]) -> None:
        """Make exactly `loras`, at their scales, the active adapters (none: no adapter).

        EngineError when one cannot be read or does not fit; then none is active.
        """
        try:
            if self.hotswap:
                self._activate_slots(loras)
            else:
                self._activate_resident(loras)
        except EngineError:
            self._deactivate()
            raise

    def _activate_resident(self, loras: Sequence[LoraWeights]) -> None:
        names = [adapter_name(lora.key) for lora in loras]
        for lora, name in zip(loras, names, strict=True):
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            state = self._read(lora)
            size = _bytes(state, self.pipeline.transformer.dtype)
            self._make_room(self._resident, size, keep=names, drop=self._unload)
            self._load(state, name, lora, hotswap=False)
            self._resident[name] = size
        if names:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(names, [lora.scale for lora in loras])
        else:
            self._deactivate()

    def _activate_slots(self, loras: Sequence[LoraWeights]) -> None:
        for index, lora in enumerate(loras):
            slot = f"slot{index}"
            if self._slots.get(slot) == lora.key:
                continue
            swap = slot in self._slots
            try:
                self._load(self._kept_weights(lora, [x.key for x in loras]), slot, lora, swap)
            except EngineError:
                if swap:  # a failed swap leaves the slot half-written: drop it
                    self._unload(slot)
                    del self._slots[slot]
                raise
            self._slots[slot] = lora.key
        self._set_slot_scales(loras)

    def _set_slot_scales(self, loras: Sequence[LoraWeights]) -> None:
        if not self._slots:
            return
        slots = list(self._slots)
        scales = [_slot_scale(slot, loras) for slot in slots]
        self.pipeline.enable_lora()
        self.pipeline.set_adapters(slots, scales)

    def _kept_weights(self, lora: LoraWeights, keep: Sequence[str]) -> StateDict:
        if lora.key in self._weights:
            self._weights.move_to_end(lora.key)
            return self._weights[lora.key][0]
        state = self._read(lora)
        size = sum(t.numel() * t.element_size() for t in state.values())
        sizes = OrderedDict((key, kept[1]) for key, kept in self._weights.items())
        self._make_room(sizes, size, keep=keep, drop=lambda key: self._weights.pop(key))
        self._weights[lora.key] = (state, size)
        return state

    def _deactivate(self) -> None:
        if self.hotswap:
            self._set_slot_scales(())
        elif self._resident:
            self.pipeline.disable_lora()

    def _make_room(
        self,
        sizes: OrderedDict[str, int],
        needed: int,
        *,
        keep: Sequence[str],
        drop: Callable[[str], object],
    ) -> None:
        """Drop the least recently used of `sizes` (never one in `keep`) until `needed` fits."""
        for name in list(sizes):
            if sum(sizes.values()) + needed <= self.memory_bytes:
                return
            if name not in keep:
                drop(name)
                sizes.pop(name, None)

    def _unload(self, name: str) -> None:
        logger.info("unloading LoRA adapter %s (least recently used)", name)
        self.pipeline.delete_adapters(name)

    def _read(self, lora: LoraWeights) -> StateDict:
        try:
            state: StateDict = self.pipeline.lora_state_dict(str(lora.path))
        except Exception as exc:
            raise EngineError(f"LoRA {lora.label} could not be read: {exc}") from exc
        self._check_fits(state, lora)
        return state

    def _check_fits(self, state: StateDict, lora: LoraWeights) -> None:
        """Refuse a LoRA whose layers the transformer lacks or whose widths differ."""
        transformer = self.pipeline.transformer
        matched = 0
        for key, tensor in state.items():
            if not key.endswith(LORA_SUFFIXES) or tensor.ndim != 2:
                continue
            path, _, part = key.removeprefix("transformer.").rpartition(".lora_")
            try:
                module = transformer.get_submodule(path)
            except AttributeError:
                raise self._misfit(lora, f"it has a layer {path} this model lacks") from None
            layer = getattr(module, "base_layer", module)
            a_side = part.startswith("A")
            expected = getattr(layer, "in_features" if a_side else "out_features", None)
            actual = tensor.shape[1] if a_side else tensor.shape[0]
            if expected is not None and expected != actual:
                raise self._misfit(
                    lora, f"its layer {path} is {actual} wide where this model's is {expected}"
                )
            matched += 1
        if matched == 0:
            raise self._misfit(lora, "none of its layers is in this model")

    def _load(self, state: StateDict, name: str, lora: LoraWeights, hotswap: bool) -> None:
        try:
            with warnings.catch_warnings():
                # peft's note that a second adapter joins the first: here, by design.
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                self.pipeline.load_lora_weights(state, adapter_name=name, hotswap=hotswap)
        except torch.OutOfMemoryError:
            raise  # the engine's to explain: it names memory_mode
        except Exception as exc:
            raise self._misfit(lora, str(exc)) from exc

    def _misfit(self, lora: LoraWeights, why: str) -> EngineError:
        made_for = base_model_of(safetensors_header(lora.path))
        stated = f" (it was made for {made_for})" if made_for else ""
        return EngineError(f"LoRA {lora.label} does not fit {self.base}{stated}: {why}")


def _slot_scale(slot: str, loras: Sequence[LoraWeights]) -> float:
    index = int(slot.removeprefix("slot"))
    return loras[index].scale if index < len(loras) else 0.0


def _bytes(state: StateDict, dtype: torch.dtype) -> int:
    """What `state` takes once loaded in `dtype`."""
    return sum(tensor.numel() for tensor in state.values()) * dtype.itemsize
