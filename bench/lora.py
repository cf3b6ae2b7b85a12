"""Per-task cost of LoRAs on the tiny pipeline: switching (A, B, A, B) against one LoRA
throughout and against none, in one run.

Each task is one `engine.generate` call of the tiny FLUX.2 [klein] engine, LoRAs
and all (the adapters' activation is inside the call). Both LoRAs are loaded
once before timing, so "switching" is the warm switch between loaded adapters
that a worker makes between tasks (see src/fluxserve/engines/lora_adapters.py);
the cold first load of a LoRA is printed apart, and so is the activation alone
(the `set_adapters` that a switch is), timed over many switches. The three rows run as blocks of
`--tasks` tasks, in turn, `--rounds` times; each block's first task is not
counted (it follows another block's LoRAs). Time is the process's CPU time, which
other processes on a shared machine do not inflate as they do wall time; the
median per-task time of each row is compared with the no-LoRA row.

    python bench/lora.py                       # 1024x1024, 2 steps
    python bench/lora.py --size 512 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fluxserve.engines.base import GenerationRequest, LoraWeights
from fluxserve.engines.tiny import TinyEngine

PROMPT = "a lighthouse on a cliff at dusk"
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


def write_lora(transformer: torch.nn.Module, path: Path, seed: int, rank: int) -> Path:
    """A LoRA of random weights (drawn from `seed`) on the attention projections of
    `transformer`, in diffusers' format, at `path`; the transformer is not changed."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if name.endswith(TARGETS) and isinstance(module, torch.nn.Linear):
            down = torch.randn(rank, module.in_features, generator=generator) / rank
            up = torch.randn(module.out_features, rank, generator=generator) / rank
            tensors[f"transformer.{name}.lora_A.weight"] = down.contiguous()
            tensors[f"transformer.{name}.lora_B.weight"] = up.contiguous()
    save_file(tensors, str(path))
    return path


def lora_pair(transformer: torch.nn.Module, folder: Path, rank: int) -> tuple[LoraWeights, ...]:
    """LoRAs A and B for `transformer`, written in `folder`."""
    return tuple(
        LoraWeights(
            name, write_lora(transformer, folder / f"{name}.safetensors", seed, rank), 1.0, name
        )
        for name, seed in (("a", 1), ("b", 2))
    )


def task(engine: TinyEngine, size: int, seed: int, *loras: LoraWeights) -> tuple[float, float]:
    """CPU seconds (all of this process's threads; unlike wall time, not inflated by
    other processes on a shared machine) and wall seconds for one task of `size`."""
    request = GenerationRequest(PROMPT, size, size, seed=seed, loras=loras)
    cpu, wall = time.process_time(), time.perf_counter()
    engine.generate(request, lambda done, total: None)
    return time.process_time() - cpu, time.perf_counter() - wall


def activation_ms(engine: TinyEngine, cycle: list[tuple[LoraWeights, ...]], count: int) -> float:
    """Median milliseconds of making each of `cycle` in turn the active LoRAs, alone:
    the part of a task's time that switching adds, apart from the denoising."""
    assert engine.adapters is not None
    times = []
    for index in range(count):
        start = time.perf_counter()
        engine.adapters.activate(cycle[index % len(cycle)])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="width and height")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per block (one not counted)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--switches", type=int, default=200, help="activations timed alone")
    args = parser.parse_args()

    engine = TinyEngine(steps=args.steps)
    engine.load()
    assert engine.adapters is not None
    transformer = engine.adapters.pipeline.transformer
    with tempfile.TemporaryDirectory() as folder:
        a, b = lora_pair(transformer, Path(folder), args.rank)
        task(engine, args.size, 0)  # warm-up
        cold = [task(engine, args.size, 0, lora) for lora in (a, b)]  # first loads
        rows: dict[str, list[tuple[float, float]]] = {
            "none": [],
            "one LoRA (A, A, ...)": [],
            "switching (A, B, A, B)": [],
        }
        for _ in range(args.rounds):
            for row, times in rows.items():
                for index in range(args.tasks):
                    if row == "none":
                        loras: tuple[LoraWeights, ...] = ()
                    elif row.startswith("one"):
                        loras = (a,)
                    else:
                        loras = ((a, b)[index % 2],)
                    seconds = task(engine, args.size, index, *loras)
                    if index > 0:
                        times.append(seconds)

        switch_ms = activation_ms(engine, [(a,), (b,)], args.switches)
        same_ms = activation_ms(engine, [(a,)], args.switches)

    medians = {
        row: tuple(statistics.median(t[which] for t in times) for which in (0, 1))
        for row, times in rows.items()
    }
    cpu_base, wall_base = medians["none"]
    print(
        f"# tiny klein, CPU, float32; {args.size}x{args.size}, {args.steps} steps, "
        f"LoRA rank {args.rank}; {len(rows['none'])} counted tasks per row"
    )
    print(
        "# first load of a LoRA (cold, counted nowhere else): "
        + " and ".join(f"{cpu:.2f} CPU s ({wall:.2f} s wall)" for cpu, wall in cold)
    )
    print("| LoRAs | median CPU s/task | vs none | median wall s/task | vs none |")
    print("|---|---|---|---|---|")
    for row, (cpu, wall) in medians.items():
        print(f"| {row} | {cpu:.3f} | {cpu / cpu_base:.3f} | {wall:.3f} | {wall / wall_base:.3f} |")
    print(
        f"activating the task's LoRAs (median of {args.switches}, wall): switching A/B "
        f"{switch_ms:.2f} ms, the same LoRA again {same_ms:.2f} ms; the switch is "
        f"{100 * switch_ms / 1000 / wall_base:.3f}% of a task without LoRAs"
    )
    switching = medians["switching (A, B, A, B)"][0]
    one = medians["one LoRA (A, A, ...)"][0]
    print(
        f"CPU time: switching adds {100 * (switching / cpu_base - 1):+.1f}% to a task without "
        f"LoRAs, {100 * (switching / one - 1):+.1f}% to one with the same LoRA throughout"
    )


if __name__ == "__main__":
    main()
