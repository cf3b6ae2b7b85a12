"""What the service adds over the raw pipeline, on the tiny FLUX.2 engine.

Times the same tiny pipeline at the same size two ways, in one run:
  raw      the diffusers pipeline called directly in a loop
  service  tasks through a running `fluxserve serve` process, one at a time
           (submit -> finished callback received -> file on disk)
and prints both medians, the overhead per task, their ratio, and the time from
submit to `running` on an idle worker (server timestamps, from the database).

    .venv/bin/python bench/overhead.py [--tasks 10] [--size 1:1] [--resolution 1K]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.engines.tiny import build_tiny_pipeline
from fluxserve.sizes import dimensions, size_ratio

PROMPT = "A lighthouse on a cliff at dawn, oil painting"
STEPS = 4


def time_raw(width: int, height: int, runs: int) -> list[float]:
    pipe = build_tiny_pipeline()
    times = []
    for seed in range(runs + 1):
        started = time.perf_counter()
        pipe(
            prompt=PROMPT,
            width=width,
            height=height,
            num_inference_steps=STEPS,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        times.append(time.perf_counter() - started)
    return times[1:]  # the first call warms caches up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def time_service(size: str, resolution: str, runs: int) -> tuple[list[float], list[float]]:
    data_dir = Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "FLUXSERVE_DATA_DIR": str(data_dir),
        "FLUXSERVE_PORT": str(port),
        "FLUXSERVE_ALLOW_PRIVATE_NETWORKS": "true",
        "FLUXSERVE_TINY_STEPS": str(STEPS),
    }
    cli = [sys.executable, "-m", "fluxserve"]
    keys = await asyncio.create_subprocess_exec(
        *cli, "keys", "create", "--name", "bench", env=env, stdout=subprocess.PIPE
    )
    key = (await keys.communicate())[0].decode().split()[-1]

    arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def hook(request: Request) -> Response:
        arrived.put_nowait(await request.json())
        return Response(status_code=204)

    hook_port = free_port()
    receiver = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/hook", hook, methods=["POST"])]),
            host="127.0.0.1",
            port=hook_port,
            log_level="warning",
        )
    )
    receiver_task = asyncio.create_task(receiver.serve())
    server = await asyncio.create_subprocess_exec(
        *cli, "serve", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    totals: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            while True:
                try:
                    health = (await client.get("/health")).json()
                    if health["worker"]["state"] == "ready":
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            body = {
                "model": "flux-2-pro",
                "callback_url": f"http://127.0.0.1:{hook_port}/hook",
                "input": {"prompt": PROMPT, "size": size, "resolution": resolution},
            }
            headers = {"Authorization": f"Bearer {key}"}
            for run in range(runs + 1):
                body["input"]["seed"] = run
                started = time.perf_counter()
                response = await client.post("/api/generate/submit", json=body, headers=headers)
                task_id = response.json()["data"]["task_id"]
                done = await arrived.get()
                elapsed = time.perf_counter() - started
                assert done["data"]["task_id"] == task_id
                assert done["data"]["status"] == "finished", done
                file_name = done["data"]["files"][0]["file_url"].split("/files/", 1)[1]
                assert (data_dir / "files" / file_name).is_file()
                if run:
                    totals.append(elapsed)
    finally:
        server.terminate()
        await server.wait()
        receiver.should_exit = True
        await receiver_task
    with closing(sqlite3.connect(data_dir / "fluxserve.db")) as conn:
        rows = conn.execute("select started_at - created_at from tasks order by seq").fetchall()
    return totals, [row[0] for row in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--size", default="1:1")
    parser.add_argument("--resolution", default="1K")
    args = parser.parse_args()
    width, height = dimensions(size_ratio(args.size), args.resolution)

    raw = statistics.median(time_raw(width, height, args.tasks))
    totals, to_running = asyncio.run(time_service(args.size, args.resolution, args.tasks))
    service = statistics.median(totals)
    print(
        f"tiny FLUX.2 [klein], {width}x{height}, {STEPS} steps, {args.tasks} tasks each, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'':28}{'median':>10}")
    print(f"{'raw pipeline (s/image)':28}{raw:>10.3f}")
    print(f"{'service (s/task)':28}{service:>10.3f}")
    print(f"{'overhead per task (ms)':28}{(service - raw) * 1000:>10.1f}")
    print(f"{'ratio raw/service':28}{raw / service:>10.3f}")
    print(f"{'submit -> running (ms)':28}{statistics.median(to_running) * 1000:>10.2f}")


if __name__ == "__main__":
    main()
