"""A tiny FLUX.2 [dev] pipeline: `Flux2Pipeline` with a few random weights.

The genuine classes, as in `tiny`: a Mistral3 text encoder (Pixtral vision tower
and all), the Flux2 transformer with guidance embeddings (as [dev] has), the
Flux2 VAE. Used to test the `Flux2Pipeline` loading path without the 60 GB
checkpoint; images are noise.

The real checkpoint's `tokenizer` is a `PixtralProcessor`, which transformers
builds only where torchvision is installed. The pipeline asks of it one call,
`apply_chat_template(..., tokenize=True)`, which a tokenizer answers the same
way; so here, without torchvision, the component is a byte-level tokenizer with
a Mistral-style chat template.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2Tokenizer,
)

from fluxserve.engines.tiny import (
    WEIGHTS_SEED,
    assemble,
    build_byte_tokenizer,
    build_tiny_transformer,
    build_tiny_vae,
)

# Flux2Pipeline stacks Mistral layers 10, 20 and 30: 30 narrow layers keep that valid.
TEXT_LAYERS = 30
TEXT_HIDDEN = 16
SPECIAL_TOKENS = ("<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")

# Mistral's template cut down to what `format_input` sends: a system turn, then
# user turns whose content is a list of text parts.
CHAT_TEMPLATE = (
    "<s>"
    "{%- for message in messages %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}"
    "{%- if message['role'] == 'user' %}[INST]{{ part['text'] }}[/INST]"
    "{%- else %}{{ part['text'] }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endfor %}"
)


def build_processor() -> Qwen2Tokenizer:
    """A byte-level tokenizer (one token per UTF-8 byte) with Mistral's special tokens."""
    return build_byte_tokenizer(
        pad_token="<pad>", special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE
    )


def build_tiny_dev_pipeline() -> Flux2Pipeline:
    """Build the tiny [dev] pipeline on the CPU, with the same weights every time."""
    processor = build_processor()
    vocab_size = len(processor)
    image_token = processor.convert_tokens_to_ids("[IMG]")
    assert isinstance(image_token, int)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        text_encoder = Mistral3ForConditionalGeneration(
            Mistral3Config(
                text_config=MistralConfig(
                    vocab_size=vocab_size,
                    hidden_size=TEXT_HIDDEN,
                    intermediate_size=2 * TEXT_HIDDEN,
                    num_hidden_layers=TEXT_LAYERS,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    head_dim=8,
                    max_position_embeddings=1024,
                ),
                vision_config=PixtralVisionConfig(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    patch_size=8,
                    image_size=64,
                ),
                image_token_index=image_token,
                spatial_merge_size=1,
            )
        )
        # [dev] is guidance-distilled: guidance is an input of the transformer.
        transformer = build_tiny_transformer(guidance_embeds=True)
        vae = build_tiny_vae()
    # The processor stands in for [dev]'s PixtralProcessor: see the module docstring.
    return assemble(Flux2Pipeline, text_encoder, processor, transformer, vae)
