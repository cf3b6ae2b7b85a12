"""FLUX.2 [klein] 4B: a plain diffusers loop against tasks through fluxserve's worker.

Builds the pipeline at its real size with random weights (the compute does not
depend on the weight values), from the published klein 4B shapes: transformer 5
double + 20 single blocks, 24 heads x 128, text encoder Qwen3-4B (36 layers,
2560 wide); check them against the checkpoint's config.json when you have it.
The tokenizer is a byte-level stand-in; prompts are padded to 512 tokens either
way, so the text encoder's work is the same.

Then, at 1K and 2K: (a) N images from a plain `pipeline(...)` loop, (b) N tasks
submitted to fluxserve (SQLite store, worker, the diffusers engine holding the
same pipeline, PNG results stored), timed from first submit to last finished,
once with the prompt-embedding cache off, once on, and once on with
`max_batch_size` (`--batch`): the tasks that queue while the worker draws (all
of one shape here) are then drawn together, up to that many per pipeline call.
Every image has the same prompt (a new seed each), so with the cache on only the
first task runs the text encoder. With `--lora`, two more rows (prompt cache on):
every task with LoRA A (rank 16, random weights, on the attention projections),
and tasks alternating LoRAs A and B, each a named LoRA in a LoRA folder; their
s/image against the no-LoRA row is the cost of a LoRA, and of switching. Prints
images/s, s/image and the ratio plain_s_per_image / fluxserve_s_per_image for
each (>= 1.0: fluxserve at least matches the loop).

    python bench/gpu.py                 # on a CUDA card, bf16
    python bench/gpu.py --compile       # with compile_transformer = true
    python bench/gpu.py --lora          # with the LoRA rows
    python bench/gpu.py --cpu-smoke     # tiny pipeline on the CPU: proves it runs
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lora import write_lora

from fluxserve.accounts import create_key
from fluxserve.checkpoints import EnginePlan, ModelRoute
from fluxserve.engines.diffusers import DiffusersEngine
from fluxserve.runtime import Runtime
from fluxserve.settings import Settings
from fluxserve.tasks import LoraSpec, TaskInput
from fluxserve.worker import WorkerState

PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"
RESOLUTIONS = {"1K": 1024, "2K": 2048}
PROMPT_CACHE_SIZE = Settings.model_fields["prompt_cache_size"].default


def build_klein_4b(device: torch.device, dtype: torch.dtype) -> Any:
    """FLUX.2 [klein] 4B at full size, random weights, built on `device`."""
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fluxserve.engines.tiny import build_tokenizer

    with torch.device(device):
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=151936,
                hidden_size=2560,
                intermediate_size=9728,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                max_position_embeddings=40960,
                rope_theta=1_000_000,
                tie_word_embeddings=True,
            )
        ).to(dtype)
        transformer = Flux2Transformer2DModel(
            num_layers=5,
            num_single_layers=20,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3 * 2560,
            guidance_embeds=False,
        ).to(dtype)
        vae = AutoencoderKLFlux2().to(dtype)
    for model in (text_encoder, transformer, vae):
        model.eval()
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        transformer=transformer,
        is_distilled=True,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def plain_loop(pipeline: Any, size: int, count: int, steps: int) -> float:
    """Seconds for `count` images, one pipeline call each."""
    start = time.perf_counter()
    for seed in range(count):
        pipeline(
            prompt=PROMPT,
            width=size,
            height=size,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


LoraChoice = Callable[[int], tuple[LoraSpec, ...]]


def no_loras(_seed: int) -> tuple[LoraSpec, ...]:
    return ()


async def through_fluxserve(
    engine: DiffusersEngine,
    resolution: str,
    count: int,
    data_dir: Path,
    max_batch_size: int,
    loras: LoraChoice = no_loras,
    lora_dir: Path | None = None,
) -> float:
    """Seconds from the first submit of `count` tasks to the last one finished; task
    `seed` asks for `loras(seed)`, named in `lora_dir`."""
    settings = Settings(
        data_dir=data_dir,
        poll_interval=0.05,
        engine="diffusers",
        max_batch_size=max_batch_size,
        lora_dir=lora_dir,
    )
    runtime = Runtime(settings, run_worker=True, models=["flux-2-pro"], engine=engine)
    await runtime.start()
    try:
        worker = runtime.worker
        assert worker is not None
        for _ in range(60_000):  # ten minutes at most
            if worker.state is WorkerState.READY:
                break
            await asyncio.sleep(0.01)
        new_key, _ = await create_key(runtime.store, "bench")
        key = await runtime.store.key_for_hash(new_key.key_hash)
        assert key is not None
        start = time.perf_counter()
        ids = []
        for seed in range(count):
            task = await runtime.service.submit(
                key,
                "flux-2-pro",
                TaskInput(
                    prompt=PROMPT, size="1:1", resolution=resolution, seed=seed, loras=loras(seed)
                ),
                None,
            )
            ids.append(task.task_id)
        pending = set(ids)
        while pending:
            for task_id in list(pending):
                found = await runtime.store.get_task(task_id)
                assert found is not None
                if found.status.terminal:
                    if found.error_message:
                        raise RuntimeError(f"{task_id} failed: {found.error_message}")
                    pending.discard(task_id)
            await asyncio.sleep(0.01)
        return time.perf_counter() - start
    finally:
        await runtime.stop()


def served_by(pipeline: Any, plan: EnginePlan, *, compile: bool, prompt_cache_size: int) -> Any:
    """A diffusers engine holding the already built `pipeline`, its prompt cache empty."""
    engine = DiffusersEngine(
        [plan], compile_transformer=compile, prompt_cache_size=prompt_cache_size
    )
    # Handed over as if loaded from disk.
    engine._loaded[plan.route.pipeline_key()] = pipeline
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny pipeline on the CPU")
    parser.add_argument("--count", type=int, default=8, help="images per measurement")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    parser.add_argument("--resolutions", default="1K,2K")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size of the batched row")
    parser.add_argument("--lora", action="store_true", help="add the LoRA rows")
    args = parser.parse_args()

    if args.cpu_smoke:
        from fluxserve.engines.tiny import build_tiny_pipeline

        device, dtype = torch.device("cpu"), torch.float32
        pipeline = build_tiny_pipeline()
        label = "tiny klein (random weights), CPU, float32"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --cpu-smoke to check the bench runs")
        device, dtype = torch.device("cuda"), torch.bfloat16
        pipeline = build_klein_4b(device, dtype)
        label = f"FLUX.2 [klein] 4B (random weights), {torch.cuda.get_device_name()}, bf16"
    route = ModelRoute(checkpoint="bench:in-memory", steps=args.steps)
    plan = EnginePlan("flux-2-pro", route, "diffusers", "built in memory", Path("."))
    if args.compile:
        pipeline.transformer.compile()

    print(f"# {label}; {args.steps} steps, {args.count} images per row")
    print("| resolution | path | images/s | s/image |")
    print("|---|---|---|---|")
    ratios = []
    for resolution in args.resolutions.split(","):
        size = RESOLUTIONS[resolution]
        plain_loop(pipeline, size, 1, args.steps)  # warm-up (and compile)
        plain = plain_loop(pipeline, size, args.count, args.steps) / args.count
        print(f"| {resolution} | plain diffusers loop | {1 / plain:.3f} | {plain:.3f} |")
        served_rows = (
            ("prompt cache off", 0, 1),
            ("prompt cache on", PROMPT_CACHE_SIZE, 1),
            (f"prompt cache on, batches of {args.batch}", PROMPT_CACHE_SIZE, args.batch),
        )
        for row, cache_size, batch in served_rows:
            engine = served_by(pipeline, plan, compile=args.compile, prompt_cache_size=cache_size)
            with tempfile.TemporaryDirectory() as folder:
                served = asyncio.run(
                    through_fluxserve(engine, resolution, args.count, Path(folder), batch)
                )
            served /= args.count
            print(f"| {resolution} | fluxserve worker, {row} | {1 / served:.3f} | {served:.3f} |")
            ratios.append((resolution, row, plain / served))
    for resolution, row, ratio in ratios:
        print(f"ratio plain/fluxserve s/image at {resolution}, {row}: {ratio:.2f}")
    if args.lora:
        lora_rows(pipeline, plan, args)


def lora_rows(pipeline: Any, plan: EnginePlan, args: argparse.Namespace) -> None:
    """Tasks with LoRA A throughout, then alternating A and B, against none."""
    one: LoraChoice = lambda _seed: (LoraSpec(name="a"),)  # noqa: E731
    switching: LoraChoice = lambda seed: (LoraSpec(name="ab"[seed % 2]),)  # noqa: E731
    rows = (("none", no_loras), ("LoRA A throughout", one), ("LoRAs A, B alternating", switching))
    print("| resolution | LoRAs | s/image | vs none |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        lora_dir = Path(folder) / "loras"
        lora_dir.mkdir()
        for name, seed in (("a", 1), ("b", 2)):
            write_lora(pipeline.transformer, lora_dir / f"{name}.safetensors", seed, rank=16)
        # One engine throughout: it holds the LoRAs it loads into the pipeline.
        cache = PROMPT_CACHE_SIZE
        engine = served_by(pipeline, plan, compile=args.compile, prompt_cache_size=cache)
        for resolution in args.resolutions.split(","):
            base = None
            for row, choice in rows:
                data_dir = Path(folder) / f"{resolution}-{row}"
                # Once unmeasured: the LoRAs' first loads are not what the row measures.
                asyncio.run(through_fluxserve(engine, resolution, 2, data_dir, 1, choice, lora_dir))
                served = asyncio.run(
                    through_fluxserve(engine, resolution, args.count, data_dir, 1, choice, lora_dir)
                )
                served /= args.count
                base = base or served
                print(f"| {resolution} | {row} | {served:.3f} | {served / base:.3f} |")


if __name__ == "__main__":
    main()
