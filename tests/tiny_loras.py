"""Tiny LoRAs for the tiny FLUX.2 transformer, made with peft and saved by diffusers."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from fluxserve.engines.tiny import build_tiny_transformer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def other_base_transformer() -> Flux2Transformer2DModel:
    """A FLUX.2 transformer twice as wide as the tiny one: its LoRAs do not fit tiny's."""
    return Flux2Transformer2DModel(
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=1,
        joint_attention_dim=48,
        timestep_guidance_channels=32,
        axes_dims_rope=(8, 8, 8, 8),
    )


def make_lora(
    path: Path,
    seed: int,
    *,
    base_model: str | None = "tiny",
    transformer: Flux2Transformer2DModel | None = None,
    rank: int = 4,
    strength: float = 5.0,
) -> Path:
    """A LoRA of random weights (drawn from `seed`, made `strength` times larger so
    that it shows), in diffusers' format, at `path`; `base_model` goes in its metadata."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformer or build_tiny_transformer(guidance_embeds=False)
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False
        )
        model = inject_adapter_in_model(config, model)
    layers = {key: value * strength for key, value in get_peft_model_state_dict(model).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    Flux2KleinPipeline.save_lora_weights(
        path.parent, transformer_lora_layers=layers, weight_name=path.name
    )
    if base_model is not None:
        save_file(load_file(path), path, metadata={"format": "pt", "base_model": base_model})
    return path


def lora_folder(folder: Path) -> Path:
    """`folder` with three LoRAs: `ink` (base model "tiny-klein") and `plain` (no base
    model stated) for the tiny transformer, and `wide` ("wide-klein"), which does not fit it."""
    make_lora(folder / "ink.safetensors", 1, base_model="tiny-klein")
    make_lora(folder / "plain.safetensors", 2, base_model=None)
    wide = other_base_transformer()
    make_lora(folder / "wide.safetensors", 3, base_model="wide-klein", transformer=wide)
    return folder
