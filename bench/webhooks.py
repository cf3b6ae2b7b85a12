"""Status latency, task processing and a healthy receiver, with and without dead receivers.

Each scenario runs its own `fluxserve serve` child process (SQLite, tiny engine)
on a fresh data folder. Before it starts, this script ends --tasks tasks in that
store, as a worker would, so that their callbacks are waiting when it boots (a
restart with a backlog). Their callback_url is:

  baseline  a healthy receiver (answers 204 at once)
  refused   a port nothing listens on: every attempt fails at once
  hanging   a server that accepts and never answers: every attempt waits out
            callback_timeout (10 s), holding a delivery slot

Retries follow the default schedule (1, 2, 4 s, then minutes: most of the
backlog's retries fall in the window), or come every --retry seconds, to keep
the dead receivers hammered throughout. During --duration seconds this process
  - reads GET /api/generate/status of a random task, one request at a time, and
    times each answer;
  - submits real tasks (flux-2-pro, tiny engine, --steps steps) one after the
    other, each with its callback to the healthy receiver.
It prints, per scenario: status latency (median, p99, and both over baseline's),
the real tasks' seconds from submit to finished, the healthy receiver's
deliveries and their delay from the task's end (server timestamps), and how
many attempts the backlog's callbacks got meanwhile. With --rounds, the
scenarios run that many times, in rotated order, and the numbers are pooled.

    .venv/bin/python bench/webhooks.py [--tasks 100] [--duration 20] [--rounds 1]
                                       [--retry SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sqlite3
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.accounts import create_key
from fluxserve.store import open_store
from fluxserve.store.base import Outcome
from fluxserve.tasks import NewTask, ResultFile, TaskInput, new_task_id

from harness import HOST, Children, fluxserve_env, in_process

SCENARIOS = ("baseline", "refused", "hanging")
INPUT = TaskInput(
    prompt="A lighthouse on a cliff at dawn, oil painting", size="1:1", resolution="1K"
)


@dataclass
class Result:
    latencies: list[float]
    task_seconds: list[float]
    deliveries: int
    delivery_delays: list[float]
    backlog_attempts: int

    def add(self, other: Result) -> None:
        """Pool another round's measurements into these."""
        self.latencies += other.latencies
        self.task_seconds += other.task_seconds
        self.deliveries += other.deliveries
        self.delivery_delays += other.delivery_delays
        self.backlog_attempts += other.backlog_attempts


@asynccontextmanager
async def receivers() -> AsyncIterator[dict[str, str]]:
    """The three callback targets, by scenario: healthy, refused, hanging."""

    async def hook(_: Request) -> Response:
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    writers: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until fluxserve gives up on the attempt
        writer.close()

    hanging = await asyncio.start_server(hang, HOST, 0)
    refused = socket.socket()  # bound, never listening: connections are refused
    refused.bind((HOST, 0))
    try:
        async with in_process(app) as healthy_port:
            yield {
                "baseline": f"http://{HOST}:{healthy_port}/hook",
                "refused": f"http://{HOST}:{refused.getsockname()[1]}/hook",
                "hanging": f"http://{HOST}:{hanging.sockets[0].getsockname()[1]}/hook",
            }
    finally:
        refused.close()
        hanging.close()
        for writer in writers:
            writer.close()


async def seed_backlog(data_dir: Path, tasks: int, url: str) -> tuple[str, list[str]]:
    """A key, and `tasks` ended tasks of it with callbacks to `url`, not yet delivered."""
    store = open_store(f"sqlite:///{data_dir / 'fluxserve.db'}")
    await store.start()
    try:
        key, account = await create_key(store, "bench")
        ids = []
        for _ in range(tasks):
            task = NewTask(
                new_task_id(),
                key.key_id,
                account.account_id,
                "flux-2-flex",
                INPUT,
                url,
                time.time(),
            )
            await store.create_task(task)
            claim = await store.claim_task(["flux-2-flex"], "bench", 60)
            assert claim is not None and claim.task.task_id == task.task_id
            image = ResultFile(f"results/{task.task_id}/image.png", "image.png", "image/png", 1)
            await store.finish_task(claim, Outcome("tiny", 1, 1024, 1024, [image]))
            ids.append(task.task_id)
        return key.secret, ids
    finally:
        await store.close()


async def run_scenario(name: str, targets: dict[str, str], args: argparse.Namespace) -> Result:
    data_dir = Path(tempfile.mkdtemp(prefix=f"fluxserve-webhooks-{name}-"))
    key, backlog = await seed_backlog(data_dir, args.tasks, targets[name])
    settings = {"data_dir": str(data_dir), "tiny_steps": str(args.steps)}
    if args.retry is not None:
        settings["callback_retry_delays"] = json.dumps([args.retry] * 10_000)
    headers = {"Authorization": f"Bearer {key}"}
    with Children(data_dir) as group:
        server = await group.fluxserve("serve", fluxserve_env(**settings), worker_ready=True)
        url = f"http://{HOST}:{server.port}"
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            real: list[str] = []
            deadline = time.monotonic() + args.duration
            hook = targets["baseline"]
            submitter = asyncio.create_task(submit_real(client, hook, real, deadline))
            latencies = await read_status(client, backlog, real, deadline)
            await submitter
    return collect(data_dir, latencies, real, backlog)


async def submit_real(
    client: httpx.AsyncClient, hook: str, real: list[str], deadline: float
) -> None:
    """Real tasks one after another until the deadline, each waited for."""
    while time.monotonic() < deadline:
        body = {"model": "flux-2-pro", "callback_url": hook, "input": {"prompt": INPUT.prompt}}
        task_id = (await client.post("/api/generate/submit", json=body)).json()["data"]["task_id"]
        real.append(task_id)
        while True:
            status = (await client.get(f"/api/generate/status/{task_id}")).json()["data"]
            if status["status"] in ("finished", "failed"):
                break
            await asyncio.sleep(0.2)


async def read_status(
    client: httpx.AsyncClient, backlog: list[str], real: list[str], deadline: float
) -> list[float]:
    latencies = []
    while time.monotonic() < deadline:
        task_id = random.choice(backlog + real)
        started = time.perf_counter()
        response = await client.get(f"/api/generate/status/{task_id}")
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return latencies


def collect(data_dir: Path, latencies: list[float], real: list[str], backlog: list[str]) -> Result:
    with closing(sqlite3.connect(data_dir / "fluxserve.db")) as db:
        marks = ",".join("?" * len(real))
        finished = db.execute(
            f"select finished_at - created_at from tasks where task_id in ({marks})"
            " and status = 'finished'",
            real,
        ).fetchall()
        delivered = db.execute(
            f"select delivered_at - created_at from callbacks where task_id in ({marks})"
            " and state = 'delivered'",
            real,
        ).fetchall()
        backlog_marks = ",".join("?" * len(backlog))
        attempts = db.execute(
            "select count(*) from callback_attempts a join callbacks c"
            f" on a.callback_id = c.callback_id where c.task_id in ({backlog_marks})",
            backlog,
        ).fetchone()[0]
    return Result(
        latencies=latencies,
        task_seconds=[row[0] for row in finished],
        deliveries=len(delivered),
        delivery_delays=[row[0] for row in delivered],
        backlog_attempts=attempts,
    )


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def report(results: dict[str, Result], args: argparse.Namespace) -> None:
    base = results["baseline"]
    base_p50, base_p99 = statistics.median(base.latencies), p99(base.latencies)
    retries = "the default schedule" if args.retry is None else f"every {args.retry:g} s"
    print(
        f"{args.tasks} ended tasks with waiting callbacks; retries {retries}; "
        f"{args.rounds} x {args.duration:g} s per scenario; status reads one at a time; "
        f"{os.cpu_count()} CPUs"
    )
    header = (
        f"{'scenario':<10}{'reads':>7}{'p50 ms':>8}{'p99 ms':>8}{'p50 x':>7}{'p99 x':>7}"
        f"{'real tasks':>12}{'s/task':>8}{'healthy cb':>12}{'cb delay ms':>13}"
        f"{'backlog attempts':>18}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        p50, p_99 = statistics.median(r.latencies), p99(r.latencies)
        real = len(r.task_seconds)
        delay = statistics.median(r.delivery_delays) * 1000 if r.delivery_delays else float("nan")
        seconds = statistics.median(r.task_seconds) if r.task_seconds else float("nan")
        print(
            f"{name:<10}{len(r.latencies):>7}{p50 * 1000:>8.2f}{p_99 * 1000:>8.2f}"
            f"{p50 / base_p50:>7.2f}{p_99 / base_p99:>7.2f}"
            f"{real:>12}{seconds:>8.2f}{f'{r.deliveries}/{real}':>12}{delay:>13.1f}"
            f"{r.backlog_attempts:>18}"
        )


async def main_async(args: argparse.Namespace) -> None:
    results = {name: Result([], [], 0, [], 0) for name in SCENARIOS}
    async with receivers() as targets:
        for round_ in range(args.rounds):
            # Each round in another order, so the machine's drift hits all alike.
            shift = round_ % len(SCENARIOS)
            for name in SCENARIOS[shift:] + SCENARIOS[:shift]:
                results[name].add(await run_scenario(name, targets, args))
    report(results, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100, help="ended tasks in the backlog")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per scenario")
    parser.add_argument("--retry", type=float, help="seconds between retries (default: schedule)")
    parser.add_argument("--steps", type=int, default=2, help="tiny engine steps of a real task")
    parser.add_argument("--rounds", type=int, default=1, help="scenario rounds, pooled")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
