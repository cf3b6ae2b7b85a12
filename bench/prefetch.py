"""A plain task queued behind a task whose reference host is slow: time to finish.

One `serve`-like runtime in this process (SQLite store, worker, tiny engine, 1K
1:1, 2 steps) and a reference host on 127.0.0.1 that answers each request after
--delay seconds. Scenarios, --rounds times each, alternating:

  alone          a flux-2-flex task on an idle worker       (baseline)
  behind slow    a flux-2-flex-edit task whose one reference is on the slow
                 host, then at once the same flux-2-flex task; the plain task's
                 time is measured

Time to finish is submit -> `finished`, read from the store every 10 ms. The table
shows each scenario's median and its ratio to the baseline's.

    .venv/bin/python bench/prefetch.py [--delay 5] [--rounds 3]

To measure the code before a change, run a copy of it:
`git archive COMMIT src | tar -x -C /tmp/snap` then `PYTHONPATH=/tmp/snap/src ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.accounts import create_key
from fluxserve.engines.tiny import TinyEngine
from fluxserve.runtime import Runtime
from fluxserve.settings import Settings
from fluxserve.store.base import ApiKeyRecord
from fluxserve.tasks import TaskInput

from harness import HOST, in_process

PROMPT = "a harbour at noon"


def reference_host(delay: float) -> Starlette:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    data = buffer.getvalue()

    async def slow(_: Request) -> Response:
        await asyncio.sleep(delay)
        return Response(data, media_type="image/png")

    return Starlette(routes=[Route("/slow.png", slow)])


async def finished(runtime: Runtime, task_id: str, since: float) -> float:
    """Seconds from `since` to `task_id` finished."""
    while True:
        task = await runtime.store.get_task(task_id)
        assert task is not None
        if task.status.terminal:
            if task.error_message:
                raise RuntimeError(f"{task_id} failed: {task.error_message}")
            return time.perf_counter() - since
        await asyncio.sleep(0.01)


async def plain_task_time(runtime: Runtime, key: ApiKeyRecord, slow_url: str | None) -> float:
    """Time to finish of a plain task, submitted right after a slow one if `slow_url`."""
    plain = TaskInput(prompt=PROMPT, size="1:1", resolution="1K", seed=1, steps=2)
    slow_id = None
    if slow_url is not None:
        edit = TaskInput(
            prompt=PROMPT, size="1:1", resolution="1K", steps=2, image_urls=(slow_url,)
        )
        slow_id = (await runtime.service.submit(key, "flux-2-flex-edit", edit, None)).task_id
    start = time.perf_counter()
    task = await runtime.service.submit(key, "flux-2-flex", plain, None)
    seconds = await finished(runtime, task.task_id, start)
    if slow_id is not None:
        await finished(runtime, slow_id, start)  # the next round starts on an idle worker
    return seconds


async def main(args: argparse.Namespace) -> None:
    async with in_process(reference_host(args.delay)) as port:
        slow_url = f"http://{HOST}:{port}/slow.png"
        with tempfile.TemporaryDirectory() as folder:
            settings = Settings(
                data_dir=Path(folder),
                poll_interval=0.05,
                allow_private_networks=True,
                engine="tiny",
            )
            runtime = Runtime(settings, run_worker=True, engine=TinyEngine())
            await runtime.start()
            try:
                new_key, _ = await create_key(runtime.store, "bench")
                key = await runtime.store.key_for_hash(new_key.key_hash)
                assert key is not None
                await plain_task_time(runtime, key, None)  # warm-up: the engine loads
                alone, behind = [], []
                for _ in range(args.rounds):
                    alone.append(await plain_task_time(runtime, key, None))
                    behind.append(await plain_task_time(runtime, key, slow_url))
            finally:
                await runtime.stop()
    baseline = statistics.median(alone)
    print(f"reference delay {args.delay:g} s, {args.rounds} rounds, median time to finish")
    print("| scenario | plain task s | x baseline |")
    print("|---|---|---|")
    for name, times in (("alone (baseline)", alone), ("behind slow reference", behind)):
        median = statistics.median(times)
        print(f"| {name} | {median:.2f} | {median / baseline:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
