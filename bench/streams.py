"""Progress streams on one `fluxserve api` process: memory per stream, database load.

One `fluxserve api` process on a fresh PostgreSQL database; this process opens the
streams (GET /api/generate/stream/{id}, httpx) and plays the worker: through
fluxserve's own store it holds --running flux-2-flex tasks and raises each one's
progress --rate times a second (a task that reaches 90 is handed back and claimed
again), so every change is a real write with its NOTIFY, as a worker's is.
Scenarios, in this order, on the same process:

  idle                  no streams, no progress                  (baseline: memory, load)
  1000 idle streams     --idle streams on queued tasks, no progress
  + progress            the same streams, progress on the running tasks
  + 100 watching        and --watching streams on the running tasks
  progress alone        every stream closed, progress on          (baseline: load)

Database load is counted by PostgreSQL itself: transactions (xact_commit +
xact_rollback of pg_stat_database) per second on the bench's database, which
every statement of the API process and of this worker is part of. Backends
report these counters up to 10 s late, so each window starts --settle seconds
after its scenario began (a steady rate: the lag shifts as much into a window as
out of it). `xacts/event` divides by the progress events of the window (this
process counts its writes); its baseline, progress alone, is the worker's own
cost of a change (its transaction and the pool's ping), so what streams add is
the difference. Memory is the API process's VmRSS.

    .venv/bin/python bench/streams.py [--idle 1000] [--watching 100] [--running 20]
        [--rate 2.5] [--window 10] [--settle 11]

It connects as $BENCH_PG_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/test)
to make its database, and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from httpx_sse import aconnect_sse

from fluxserve.store import open_store
from fluxserve.store.base import LeaseState
from fluxserve.tasks import Claim

from harness import (
    HOST,
    PG_ADMIN_URL,
    Children,
    create_key,
    fluxserve_env,
    postgres_database,
    rss_mb,
)

TARGET_MB = 100.0


@dataclass
class Row:
    scenario: str
    streams: int
    events_per_s: float
    xacts_per_s: float
    rss_mb: float


class Worker:
    """Holds the running tasks and raises their progress, counting its own writes."""

    def __init__(self, url: str, running: int, rate: float) -> None:
        self.store = open_store(url)
        self.running = running
        self.rate = rate
        self.writes = 0  # transactions of this process: claims, progress, hand-backs
        self.claims: list[Claim] = []
        self.progress: dict[str, int] = {}
        self._job: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.start()
        for _ in range(self.running):
            self.claims.append(await self._claim())

    async def _claim(self) -> Claim:
        claim = await self.store.claim_task(["flux-2-flex"], "bench-worker", 600)
        assert claim is not None
        self.writes += 1
        self.progress[claim.task.task_id] = 0
        return claim

    def run(self, on: bool) -> None:
        if on and self._job is None:
            self._job = asyncio.create_task(self._raise_forever())
        elif not on and self._job is not None:
            self._job.cancel()
            self._job = None

    async def _raise_forever(self) -> None:
        while True:
            started = time.monotonic()
            for index, claim in enumerate(self.claims):
                task_id = claim.task.task_id
                value = self.progress[task_id] + 1
                if value >= 90:
                    await self.store.release_task(claim)
                    self.writes += 1
                    self.claims[index] = await self._claim()
                    continue
                state = await self.store.report_progress(claim, value, 600)
                assert state is LeaseState.HELD
                self.writes += 1
                self.progress[task_id] = value
            await asyncio.sleep(max(0.0, 1 / self.rate - (time.monotonic() - started)))

    async def close(self) -> None:
        self.run(False)
        await self.store.close()


async def xacts(admin: asyncpg.Connection, database: str) -> int:
    value: int = await admin.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", database
    )
    return value


async def stream(
    client: httpx.AsyncClient, task_id: str, opened: asyncio.Event, seen: list[int]
) -> None:
    """Hold one stream open, counting its events, until cancelled."""
    async with aconnect_sse(client, "GET", f"/api/generate/stream/{task_id}") as source:
        async for event in source.aiter_sse():
            if event.data:
                seen[0] += 1
                opened.set()


async def open_streams(
    client: httpx.AsyncClient, task_ids: Sequence[str], seen: list[int]
) -> list[asyncio.Task[None]]:
    jobs = []
    for start in range(0, len(task_ids), 50):
        batch = []
        for task_id in task_ids[start : start + 50]:
            opened = asyncio.Event()
            jobs.append(asyncio.create_task(stream(client, task_id, opened, seen)))
            batch.append(opened.wait())
        await asyncio.gather(*batch)
    return jobs


async def close_streams(jobs: list[asyncio.Task[None]]) -> None:
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


async def main(args: argparse.Namespace) -> None:
    admin = await asyncpg.connect(PG_ADMIN_URL)
    async with postgres_database() as url:
        with tempfile.TemporaryDirectory() as folder, Children(Path(folder)) as group:
            env = fluxserve_env(data_dir=folder, database_url=url, access_log="false")
            key = create_key(env)[1]
            api = await group.fluxserve("api", env)
            worker = Worker(url, args.running, args.rate)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://{HOST}:{api.port}",
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                    limits=limits,
                ) as client:
                    database = url.rsplit("/", 1)[1]
                    rows = await scenarios(args, admin, database, api.pid, client, worker)
            finally:
                await worker.close()
    await admin.close()
    report(args, rows)


async def submit(client: httpx.AsyncClient, model: str, count: int, **inputs: object) -> list[str]:
    body = {"model": model, "input": {"prompt": "a lighthouse at dawn", **inputs}}

    async def one() -> str:
        # Retried with the same Idempotency-Key: a keep-alive connection that the
        # server closed as it was reused fails the request, not the submit.
        headers = {"Idempotency-Key": secrets.token_hex(8)}
        for _ in range(2):
            with contextlib.suppress(httpx.TransportError):
                return await post(headers)
        return await post(headers)

    async def post(headers: dict[str, str]) -> str:
        answer = await client.post("/api/generate/submit", json=body, headers=headers)
        task_id: str = answer.json()["data"]["task_id"]
        return task_id

    ids = []
    for start in range(0, count, 50):
        ids += await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    return ids


async def scenarios(
    args: argparse.Namespace,
    admin: asyncpg.Connection,
    database: str,
    pid: int,
    client: httpx.AsyncClient,
    worker: Worker,
) -> list[Row]:
    running = await submit(client, "flux-2-flex", args.running, steps=4)
    queued = await submit(client, "flux-2-pro", args.idle)
    await worker.start()
    rows = []

    async def measure(name: str, streams: int) -> Row:
        await asyncio.sleep(args.settle)
        xacts_before, writes_before = await xacts(admin, database), worker.writes
        started = time.monotonic()
        await asyncio.sleep(args.window)
        elapsed = time.monotonic() - started
        total = (await xacts(admin, database) - xacts_before - 2) / elapsed  # less our 2 reads
        writes = (worker.writes - writes_before) / elapsed
        row = Row(name, streams, writes, total, rss_mb(pid))
        rows.append(row)
        print(f"  {name}: {row}", flush=True)
        return row

    seen = [0]
    await measure("idle", 0)
    idle_jobs = await open_streams(client, queued, seen)
    await measure(f"{args.idle} idle streams", args.idle)
    worker.run(True)
    await measure("+ progress", args.idle)
    watch = [running[i % len(running)] for i in range(args.watching)]
    watch_seen = [0]
    watch_jobs = await open_streams(client, watch, watch_seen)
    before = watch_seen[0]
    await measure(f"+ {args.watching} watching", args.idle + args.watching)
    print(f"  watching streams received {watch_seen[0] - before} events", flush=True)
    await close_streams(idle_jobs + watch_jobs)
    await measure("progress alone", 0)
    worker.run(False)
    return rows


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    idle, streams_idle, progress, watching, alone = rows
    print()
    print(f"{'scenario':<22}{'streams':>8}{'events/s':>10}{'xacts/s':>10}"
          f"{'x baseline':>12}{'xacts/event':>13}{'x baseline':>12}{'RSS MB':>9}")  # fmt: skip
    for row, base in (
        (idle, idle),
        (streams_idle, idle),
        (alone, alone),
        (progress, alone),
        (watching, alone),
    ):
        ratio = row.xacts_per_s / base.xacts_per_s
        per_event = "-", "-"
        if row.events_per_s and base.events_per_s:
            mine = row.xacts_per_s / row.events_per_s
            per_event = f"{mine:.2f}", f"{mine * base.events_per_s / base.xacts_per_s:.2f}"
        print(f"{row.scenario:<22}{row.streams:>8}{row.events_per_s:>10.1f}{row.xacts_per_s:>10.1f}"
              f"{ratio:>12.2f}{per_event[0]:>13}{per_event[1]:>12}{row.rss_mb:>9.1f}")  # fmt: skip
    over = streams_idle.rss_mb - idle.rss_mb
    print()
    print(
        f"memory: {args.idle} idle streams {over:.1f} MB over the idle process "
        f"({over * 1024 / args.idle:.1f} KB a stream); target under {TARGET_MB:.0f} MB: "
        f"{'met' if over < TARGET_MB else 'missed'}"
    )
    for row in (progress, watching):
        extra = row.xacts_per_s / row.events_per_s - alone.xacts_per_s / alone.events_per_s
        print(f"load: {row.scenario} ({row.streams} streams): {extra:+.2f} xacts a progress event")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--watching", type=int, default=100)
    parser.add_argument("--running", type=int, default=20)
    parser.add_argument("--rate", type=float, default=2.5, help="progress writes/s per task")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=11.0)
    asyncio.run(main(parser.parse_args()))
