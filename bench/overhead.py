"""What the service adds over the raw pipeline, on the tiny FLUX.2 engine.

Times the same tiny pipeline at the same size two ways, in one run, alternating
one of each so that the machine's drift hits both alike:
  raw      the diffusers pipeline called directly, in this process
  service  a task through a running `fluxserve serve` process (submit ->
           finished callback received -> file on disk), while this process waits
and prints both medians, the overhead per task, their ratio, and the time from
submit to `running` on an idle worker (server timestamps, from the database).

    .venv/bin/python bench/overhead.py [--tasks 10] [--size 1:1] [--resolution 1K]
                                       [--prompt-cache-size 0]

Every task has the same prompt, so the service's prompt cache (on by default)
skips the text encoder the raw loop runs each time; `--prompt-cache-size 0`
measures the service's own overhead alone.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from contextlib import AsyncExitStack, closing
from pathlib import Path
from typing import Any

import httpx
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.engines.tiny import build_tiny_pipeline
from fluxserve.sizes import dimensions, size_ratio

from harness import HOST, Children, create_key, fluxserve_env, in_process

PROMPT = "A lighthouse on a cliff at dawn, oil painting"
STEPS = 4


def raw_call(pipe: Any, width: int, height: int, seed: int) -> float:
    """One direct pipeline call; seconds."""
    started = time.perf_counter()
    pipe(
        prompt=PROMPT,
        width=width,
        height=height,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    return time.perf_counter() - started


class Service:
    """A `fluxserve serve` child process and a callback receiver in this process."""

    def __init__(self, prompt_cache_size: int | None) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
        settings = {"data_dir": str(self.data_dir), "tiny_steps": str(STEPS)}
        if prompt_cache_size is not None:
            settings["prompt_cache_size"] = str(prompt_cache_size)
        self.env = fluxserve_env(**settings)
        self.children = Children(self.data_dir)
        self.arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.stack = AsyncExitStack()

    async def start(self) -> None:
        self.key = create_key(self.env)[1]

        async def hook(request: Request) -> Response:
            self.arrived.put_nowait(await request.json())
            return Response(status_code=204)

        app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
        self.hook_port = await self.stack.enter_async_context(in_process(app))
        server = await self.children.fluxserve("serve", self.env, worker_ready=True)
        self.client = httpx.AsyncClient(base_url=f"http://{HOST}:{server.port}", timeout=60)

    async def task(self, size: str, resolution: str, seed: int) -> float:
        """One task, submit to callback; seconds."""
        body = {
            "model": "flux-2-pro",
            "callback_url": f"http://{HOST}:{self.hook_port}/hook",
            "input": {"prompt": PROMPT, "size": size, "resolution": resolution, "seed": seed},
        }
        headers = {"Authorization": f"Bearer {self.key}"}
        started = time.perf_counter()
        response = await self.client.post("/api/generate/submit", json=body, headers=headers)
        task_id = response.json()["data"]["task_id"]
        done = await self.arrived.get()
        elapsed = time.perf_counter() - started
        data = done["data"]
        assert data["task_id"] == task_id and data["status"] == "finished", done
        key = data["files"][0]["file_url"].split("/files/", 1)[1]
        assert (self.data_dir / "files" / key).is_file()
        return elapsed

    async def stop(self) -> list[tuple[float, float]]:
        """Stop everything; per task, the server's submit -> running and running -> done."""
        await self.client.aclose()
        self.children.close()
        await self.stack.aclose()
        with closing(sqlite3.connect(self.data_dir / "fluxserve.db")) as conn:
            rows = conn.execute(
                "select started_at - created_at, finished_at - started_at from tasks order by seq"
            )
            return [(row[0], row[1]) for row in rows]


async def run(
    size: str, resolution: str, tasks: int, prompt_cache_size: int | None
) -> dict[str, list[float]]:
    width, height = dimensions(size_ratio(size), resolution)
    pipe = build_tiny_pipeline()
    service = Service(prompt_cache_size)
    await service.start()
    raw, served = [], []
    try:
        for seed in range(tasks + 1):  # the first of each warms caches up
            raw.append(await asyncio.to_thread(raw_call, pipe, width, height, seed))
            served.append(await service.task(size, resolution, seed))
    finally:
        recorded = await service.stop()
    return {
        "raw": raw[1:],
        "service": served[1:],
        "to_running": [queued for queued, _ in recorded[1:]],
        "running": [ran for _, ran in recorded[1:]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--size", default="1:1")
    parser.add_argument("--resolution", default="1K")
    parser.add_argument(
        "--prompt-cache-size", type=int, default=None, help="the service's; default its own"
    )
    args = parser.parse_args()
    width, height = dimensions(size_ratio(args.size), args.resolution)
    cache = args.prompt_cache_size
    times = asyncio.run(run(args.size, args.resolution, args.tasks, cache))
    raw, service = statistics.median(times["raw"]), statistics.median(times["service"])
    to_running = statistics.median(times["to_running"])
    running = statistics.median(times["running"])
    print(
        f"tiny FLUX.2 [klein] pipeline, {width}x{height}, {STEPS} steps, "
        f"{args.tasks} of each, alternating; torch threads {torch.get_num_threads()}; "
        f"service prompt cache {'default' if cache is None else cache}"
    )
    rows = [
        ("raw pipeline, s/image", f"{raw:.3f}"),
        ("service, s/task", f"{service:.3f}"),
        ("overhead per task, ms", f"{(service - raw) * 1000:.1f}"),
        ("ratio raw/service", f"{raw / service:.3f}"),
        ("submit -> running, ms", f"{to_running * 1000:.2f}"),
        ("running -> finished, s", f"{running:.3f}"),
    ]
    for label, value in rows:
        print(f"  {label:<26}{value:>10}   (median)")


if __name__ == "__main__":
    main()
