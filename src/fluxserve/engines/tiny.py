"""The `tiny` engine: the real FLUX.2 [klein] pipeline with a few random weights.

Every component is the genuine diffusers or transformers class (the Flux2
transformer, the Flux2 VAE, a Qwen3 text encoder, a byte-level Qwen2 tokenizer,
the flow-match scheduler), so the whole serving path runs for real at the
requested output size: chat-template prompt encoding, reference-image encoding,
the denoising loop with its step callbacks, and VAE decoding. The weights are
random, built in code from a fixed seed, so nothing is downloaded and every image
is noise. It lets the service run, and be tested, on any CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

# Imported from their modules, not from `diffusers`: its lazy top-level names
# read as placeholder classes to a type checker.
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)
from PIL import Image

# Qwen2Tokenizer is the tokenizers-backed class in transformers 5 (the
# pipeline's `Qwen2TokenizerFast` is an alias of it), built here from an
# in-memory vocabulary.
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fluxserve.engines.base import GenerationRequest, ProgressCallback
from fluxserve.engines.flux2 import run_pipeline
from fluxserve.engines.lora_adapters import LoraAdapters
from fluxserve.engines.prompts import PromptCache

PipelineT = TypeVar("PipelineT", Flux2KleinPipeline, Flux2Pipeline)

TINY_BASE = "the tiny FLUX.2 [klein] pipeline"
"""What a LoRA made for another model is told it does not fit."""

WEIGHTS_SEED = 0
"""Seed for the random weights: every build of the tiny pipeline is identical."""

# The pipeline stacks the hidden states of text-encoder layers 9, 18 and 27 by
# default. 27 layers make those indices valid, so the pipeline (and a copy saved
# with `save_pretrained`) runs with its default arguments; the layers are so
# narrow that the depth costs next to nothing.
TEXT_LAYERS = 27
TEXT_HIDDEN = 16

# The real klein latent space: 32 VAE channels, patched 2x2 into the 128 channels
# the transformer reads. Four VAE blocks give the real 8x downscale, so every
# multiple of 16 (8 x the 2x2 patch) comes out at exactly the requested size.
LATENT_CHANNELS = 32
VAE_CHANNELS = (4, 4, 4, 4)

# One head: attention over every image token is the cost that grows fastest with
# the output size (16k tokens at 2048x2048), and it scales with the head count.
HEADS = 1
HEAD_DIM = 16
ROPE_AXES = (4, 4, 4, 4)  # rotary dims for the (T, H, W, L) ids; they sum to HEAD_DIM

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen3's chat template, cut down to what the pipeline asks of it: user turns,
# the generation prompt, and the empty think block of `enable_thinking=False`.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def build_byte_tokenizer(
    *, pad_token: str, special_tokens: Sequence[str], chat_template: str
) -> Qwen2Tokenizer:
    """A byte-level tokenizer with no merges: one token per UTF-8 byte.

    It encodes any text with no vocabulary file, and keeps the model family's
    special tokens whole so its chat template tokenizes as for the real model.
    """
    vocab = {pad_token: 0}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for token in special_tokens:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        pad_token=pad_token,
        chat_template=chat_template,
        extra_special_tokens=list(special_tokens),
    )


def build_tokenizer() -> Qwen2Tokenizer:
    """The byte-level tokenizer with Qwen's special tokens and chat template."""
    return build_byte_tokenizer(
        pad_token="<|endoftext|>",  # Qwen's pad token
        special_tokens=SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_transformer(*, guidance_embeds: bool) -> Flux2Transformer2DModel:
    """The FLUX.2 transformer at its smallest; [dev] embeds guidance, klein does not."""
    return Flux2Transformer2DModel(
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=3 * TEXT_HIDDEN,  # three stacked text-encoder layers
        timestep_guidance_channels=32,
        axes_dims_rope=ROPE_AXES,
        guidance_embeds=guidance_embeds,
    )


def build_tiny_vae() -> AutoencoderKLFlux2:
    """The FLUX.2 VAE with the real latent space and the fewest weights that keep it."""
    return AutoencoderKLFlux2(
        block_out_channels=VAE_CHANNELS,
        # The decoder's convolutions at full output resolution are the bulk of
        # a tiny image's time: keep one resnet per decoder block, none in the
        # encoder.
        layers_per_block=0,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        # Attention over every latent pixel grows with the square of the area.
        mid_block_add_attention=False,
    )


def build_tiny_pipeline() -> Flux2KleinPipeline:
    """Build the tiny klein pipeline on the CPU, with the same weights every time."""
    tokenizer = build_tokenizer()
    # fork_rng: the fixed seed must not reset the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN,
                intermediate_size=2 * TEXT_HIDDEN,
                num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
            )
        )
        transformer = build_tiny_transformer(guidance_embeds=False)  # klein takes no guidance
        vae = build_tiny_vae()
    return assemble(Flux2KleinPipeline, text_encoder, tokenizer, transformer, vae)


def assemble(
    pipeline_class: type[PipelineT],
    text_encoder: Any,
    tokenizer: Any,
    transformer: Flux2Transformer2DModel,
    vae: AutoencoderKLFlux2,
) -> PipelineT:
    """A FLUX.2 pipeline of freshly built parts, ready to call."""
    # Models start in training mode when built, in eval mode when loaded.
    text_encoder.eval()
    transformer.eval()
    vae.eval()
    pipeline = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)  # progress goes to on_progress
    return pipeline


class TinyEngine:
    """The tiny klein pipeline behind the `Engine` port: real work, noise out."""

    name = "tiny"

    def __init__(
        self, steps: int = 4, prompt_cache_size: int = 0, lora_memory_bytes: int = 2 * 1024**3
    ) -> None:
        self.steps = steps
        self.lora_memory_bytes = lora_memory_bytes
        self._pipeline: Flux2KleinPipeline | None = None
        self.adapters: LoraAdapters | None = None
        self._prompts = PromptCache(prompt_cache_size)
        self._load_lock = threading.Lock()
        # The scheduler keeps per-call state (timesteps, step index): one at a time.
        self._generate_lock = threading.Lock()

    def load(self) -> None:
        """Build the pipeline once; later or concurrent calls wait, then do nothing."""
        self._loaded()

    def _loaded(self) -> Flux2KleinPipeline:
        with self._load_lock:
            if self._pipeline is None:
                self._pipeline = build_tiny_pipeline()
                self.adapters = LoraAdapters(
                    self._pipeline, base=TINY_BASE, memory_bytes=self.lora_memory_bytes
                )
            return self._pipeline

    def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback
    ) -> list[Image.Image]:
        """Draw `request` through the real denoising loop, reporting every step.

        An exception from `on_progress` stops generation and propagates unchanged;
        any other failure becomes `EngineError`.
        """
        return self.generate_batch([request], on_progress)[0]

    def generate_batch(
        self, requests: Sequence[GenerationRequest], on_progress: ProgressCallback
    ) -> list[list[Image.Image]]:
        """Draw `requests` (one shape, see `BatchEngine`) in one pipeline call."""
        first = requests[0]
        # Unset, guidance is the pipeline's own default: 4.0, classifier-free
        # guidance (a second transformer pass per step), as on the undistilled base.
        return run_pipeline(
            self._loaded(),
            requests,
            on_progress,
            steps=first.steps or self.steps,
            guidance=first.guidance,
            lock=self._generate_lock,
            prompts=self._prompts,
            failure="The tiny engine failed",
            adapters=self.adapters,
        )
