"""API throughput, dispatch latency and idle memory of `fluxserve api`, against a bare ceiling.

Compares, in one run, on this machine:
  throughput  submits/s (POST /api/generate/submit, flux-2-pro, no callback) and
              status reads/s (GET /api/generate/status/{id} of queued tasks; a
              read counts the task's queue position, so it runs over a queue of
              --queue-depth tasks, the first ones the submits made) from
              64 concurrent keep-alive clients, for
                bare      bench/bare_app.py: the same two routes and JSON shapes on
                          FastAPI + uvicorn, no storage (the ceiling)
                sqlite-M  `fluxserve api`, SQLite store with `sqlite_synchronous` M
                          (--sqlite-synchronous: full, normal or both, side by side)
                postgres  `fluxserve api`, PostgreSQL store (a fresh database)
              each with 1 and 2 server processes on separate ports; the client
              spreads its connections round-robin over them. No worker runs, so
              every task stays queued. Each rate is divided by bare's with the same
              number of processes and shown beside the issue's target.
  dispatch    submit -> `running` on an idle `fluxserve worker` (tiny engine, 1
              step), from the server's own timestamps (tasks.started_at -
              tasks.created_at), one task at a time, each waited for.
  memory      VmRSS of an idle `fluxserve api` after one request, and whether
              libtorch is mapped into it.

The load generator is this process (bench/load.py: raw HTTP/1.1 on asyncio
keep-alive streams; httpx is many times slower here). Client, servers and
PostgreSQL share the machine's cores, so each row says where the cores went
during its window (client/servers/db/other processes) and the server + database
CPU per answer, which does not depend on what else ran.
Throughput runs --rounds times, bare beside the stores, and shows each row's best
and median; so does dispatch, interleaving its setups the same way.
Dispatch on SQLite is measured twice: `api` + `worker` processes (the worker
learns of a task by polling, `poll_interval`) and `serve` (one process, woken at
once). The bench makes its own PostgreSQL database and drops it; it connects as
$BENCH_PG_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/test).

    .venv/bin/python bench/throughput.py [--duration 5] [--warmup 1] [--clients 64]
        [--tasks 50] [--queue-depth 2000] [--accounts 1] [--rounds 2]
        [--sqlite-synchronous full [normal]]
        [--only throughput dispatch memory]

To pin the code under test while src/ changes, run a copy of it:
`git archive HEAD src | tar -x -C /tmp/snap` then `PYTHONPATH=/tmp/snap/src ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from harness import (
    FLUXSERVE,
    HOST,
    Children,
    create_key,
    fluxserve_env,
    load_average,
    postgres_database,
    print_table,
    rss_mb,
)
from load import Tally, drive, wait_quiet

SUBMIT_PATH = "/api/generate/submit"
SUBMIT_BODY = json.dumps(
    {
        "model": "flux-2-pro",
        "input": {"prompt": "A lighthouse on a cliff at dawn, oil painting", "size": "1:1"},
    }
).encode()
BARE_SECRET = "bare-key"  # the bare app checks only that a key is sent
TARGETS = {"submit": 0.30, "status": 0.50}
DISPATCH_TARGET_MS = 20.0
RSS_TARGET_MB = 120.0
TASK_TIMEOUT = 120.0
SECTIONS = ("throughput", "dispatch", "memory")
# The status phase's queue: the first tasks the submit phase made for the key
# that reads them, in queue order.
KEEP_QUEUED = (
    "DELETE FROM tasks WHERE seq NOT IN (SELECT seq FROM tasks "
    "WHERE status = 'not_started' AND owner = $2 ORDER BY vtime, seq LIMIT $1)"
)


@dataclass
class Store:
    """A store under test: its settings, its keys (id, secret), its tables read directly."""

    name: str
    settings: dict[str, str]
    database: str | None = None  # PostgreSQL's: its backends' CPU is counted
    keys: list[tuple[str, str]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return fluxserve_env(tiny_steps="1", **self.settings)

    async def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        url = self.settings.get("database_url")
        if url is None:
            path = Path(self.settings["data_dir"]) / "fluxserve.db"
            with closing(sqlite3.connect(path, timeout=30)) as conn, conn:
                return conn.execute(re.sub(r"\$(\d)", r"?\1", sql), params).fetchall()
        conn = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await conn.fetch(sql, *params)]
        finally:
            await conn.close()

    async def clear_tasks(self) -> None:
        await self.query("DELETE FROM tasks" if self.database is None else "TRUNCATE tasks")

    async def keep_queued(self, depth: int) -> list[str]:
        """Delete all but the first `depth` queued tasks of the first key; the ids kept."""
        await self.query(KEEP_QUEUED, depth, self.keys[0][0])
        return [row[0] for row in await self.query("SELECT task_id FROM tasks")]


# Throughput --------------------------------------------------------------------


@dataclass
class Row:
    op: str
    server: str
    procs: int
    rounds: list[Tally] = field(default_factory=list)
    queued: int = 0

    @property
    def best(self) -> Tally:
        return max(self.rounds, key=lambda tally: tally.rate)


def made_up_ids(count: int) -> list[str]:
    """Task ids of the shape fluxserve makes, for the bare app (it reads none)."""
    return [f"task-unified-{int(time.time())}-{secrets.token_hex(4)}" for _ in range(count)]


async def measure_config(
    store: Store | None, procs: int, args: argparse.Namespace, logs: Path
) -> dict[str, tuple[Tally, int]]:
    """One server kind with `procs` processes: submits with every key, then status
    reads with the first key over the first `args.queue_depth` tasks it submitted."""
    if store is not None:
        await store.clear_tasks()  # every config reads status over a queue of its own making
    await wait_quiet()
    with Children(logs) as group:
        servers = [
            await (group.bare() if store is None else group.fluxserve("api", store.env()))
            for _ in range(procs)
        ]
        ports, pids = [child.port for child in servers], [child.pid for child in servers]
        database = store.database if store else None
        bearers = [secret for _, secret in store.keys] if store else [BARE_SECRET]
        submits = await drive(
            ports, bearers, lambda: SUBMIT_PATH, args, server_pids=pids, database=database,
            body=SUBMIT_BODY,
        )  # fmt: skip
        # A task's queue position is counted on each read, so the reads' cost grows
        # with the queue: every run reads over a queue of the same depth.
        ids = await store.keep_queued(args.queue_depth) if store else made_up_ids(args.queue_depth)
        ids = ids or made_up_ids(1)  # no task stored: every read a 404, counted as an error
        reads = await drive(
            ports, bearers[:1], lambda: f"/api/generate/status/{random.choice(ids)}", args,
            server_pids=pids, database=database,
        )  # fmt: skip
    return {"submit": (submits, 0), "status": (reads, len(ids) if store else 0)}


async def throughput(stores: Sequence[Store], args: argparse.Namespace, logs: Path) -> list[Row]:
    """Every config `args.rounds` times, bare beside the stores."""
    rows: dict[tuple[str, str, int], Row] = {}
    for _ in range(args.rounds):
        for procs in (1, 2):
            for store in (None, *stores):
                server = store.name if store else "bare"
                for op, (tally, queued) in (await measure_config(store, procs, args, logs)).items():
                    row = rows.setdefault((op, server, procs), Row(op, server, procs))
                    row.rounds.append(tally)
                    row.queued = queued
    return sorted(rows.values(), key=lambda r: (r.op != "submit", r.procs, r.server != "bare"))


def print_throughput(rows: Sequence[Row]) -> None:
    bare = {(row.op, row.procs): row.best for row in rows if row.server == "bare"}
    lines = []
    for row in rows:
        best, ratio, target, met, cost, queued = row.best, "-", "-", "-", "-", "-"
        if row.server != "bare":
            ceiling = bare[(row.op, row.procs)]
            share = best.rate / ceiling.rate if ceiling.rate else 0.0
            ratio, target = f"{share:.0%}", f">={TARGETS[row.op]:.0%}"
            met, queued = ("yes" if share >= TARGETS[row.op] else "NO"), str(row.queued)
            if best.cpu_ms() and ceiling.cpu_ms():
                cost = f"{ceiling.cpu_ms() / best.cpu_ms():.0%}"
        rates = [tally.rate for tally in row.rounds]
        lines.append(
            [
                row.op, row.server, row.procs, f"{best.rate:.0f}", ratio, target, met,
                f"{statistics.median(rates):.0f}", ",".join(f"{rate:.0f}" for rate in rates),
                f"{best.cpu_ms('servers'):.2f}+{best.cpu_ms('db'):.2f}", cost, best.cores_text(),
                queued, best.error_text(),
            ]
        )  # fmt: skip
    print()
    print_table(
        ["op", "server", "procs", "rate/s", "vs bare", "target", "met", "median", "rounds",
         "ms cpu/req", "cost vs bare", "cores c/s/db/oth", "queued", "errors"],
        lines,
    )  # fmt: skip
    print(
        "rate/s: best of the rounds; median: the rounds' median; ms cpu/req: server + database\n"
        "CPU per 2xx answer; cost vs bare: bare's CPU per answer / this one's, the rate ratio to\n"
        "expect when the cores are the limit (it does not depend on what else ran meanwhile)."
    )


# Dispatch latency ----------------------------------------------------------------


async def run_one_task(client: httpx.AsyncClient) -> str:
    """Submit one task and wait until it is finished; its id."""
    response = await client.post(SUBMIT_PATH, content=SUBMIT_BODY)
    response.raise_for_status()
    task_id: str = response.json()["data"]["task_id"]
    deadline = time.monotonic() + TASK_TIMEOUT
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        status = await client.get(f"/api/generate/status/{task_id}")
        state = status.json()["data"]["status"]
        if state == "finished":
            return task_id
        if state == "failed":
            raise RuntimeError(f"task {task_id} failed: {status.text}")
    raise RuntimeError(f"task {task_id} not finished in {TASK_TIMEOUT:.0f} s")


async def dispatch_delays(
    store: Store, args: argparse.Namespace, logs: Path, *, embedded: bool
) -> list[float]:
    """Submit -> running, server timestamps, over `args.tasks` tasks each run on an idle worker."""
    await store.clear_tasks()
    with Children(logs) as group:
        if embedded:
            api = await group.fluxserve("serve", store.env(), worker_ready=True)
        else:
            api = await group.fluxserve("api", store.env())
            worker = group.start("worker", [*FLUXSERVE, "worker"], store.env())
            await worker.logged(" ready for ")
        headers = {
            "Authorization": f"Bearer {store.keys[0][1]}",
            "Content-Type": "application/json",
        }
        url = f"http://{HOST}:{api.port}"
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            await run_one_task(client)  # warms the engine and the connections up
            ids = []
            for _ in range(args.tasks):
                await asyncio.sleep(random.uniform(0.05, 0.25))  # the worker idles meanwhile
                ids.append(await run_one_task(client))
    rows = await store.query("SELECT task_id, started_at - created_at FROM tasks")
    delays = dict(rows)
    return [float(delays[task_id]) for task_id in ids]


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def dispatch_section(
    sqlites: Sequence[Store], postgres: Store, args: argparse.Namespace, logs: Path
) -> None:
    """Each setup `args.rounds` times, the setups taking turns."""
    setups = [
        (f"{sqlite.name}, {layout}", sqlite, embedded)
        for sqlite in sqlites
        for layout, embedded in (
            ("api + worker processes", False),
            ("serve (embedded worker)", True),
        )
    ]
    setups.append(("postgres, api + worker processes", postgres, False))
    results: dict[str, list[list[float]]] = {}
    for _ in range(args.rounds):
        for name, store, embedded in setups:
            try:
                delays = await dispatch_delays(store, args, logs, embedded=embedded)
            except RuntimeError as exc:
                print(f"dispatch, {name}: failed: {exc}")
            else:
                results.setdefault(name, []).append(delays)
    print()
    print(
        f"dispatch: submit -> running on an idle worker, {args.tasks} tasks a round, "
        "server timestamps; median and p99 of all rounds' tasks"
    )
    lines = []
    for name, rounds in results.items():
        delays = [delay for one in rounds for delay in one]
        median = statistics.median(delays) * 1000
        each = ",".join(f"{statistics.median(one) * 1000:.1f}" for one in rounds)
        met = "yes" if median < DISPATCH_TARGET_MS else "NO"
        target = f"<{DISPATCH_TARGET_MS:g}"
        lines.append([name, f"{median:.1f}", f"{p99(delays) * 1000:.1f}", target, met, each])
    print_table(["setup", "median ms", "p99 ms", "target", "met", "round medians ms"], lines)


# Memory ----------------------------------------------------------------------------


def mapped_libraries(pid: int) -> tuple[bool, str]:
    """Whether libtorch is mapped into the process, and which heavy libraries are."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    heavy = [name for name in ("numpy", "PIL", "torch", "diffusers") if f"/{name}" in maps]
    return "libtorch" in maps, ", ".join(heavy)


async def idle_memory(store: Store | None, logs: Path) -> list[str]:
    """Start, answer one request (a submit; bare: a status read), idle 2 s, then look:
    RSS MB, target, met, libtorch mapped, heavy libraries mapped."""
    with Children(logs) as group:
        child = await (group.bare() if store is None else group.fluxserve("api", store.env()))
        secret = store.keys[0][1] if store else BARE_SECRET
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{child.port}") as client:
            if store is None:
                response = await client.get("/api/generate/status/x", headers=headers)
            else:
                response = await client.post(SUBMIT_PATH, content=SUBMIT_BODY, headers=headers)
            response.raise_for_status()
        await asyncio.sleep(2)
        rss, (libtorch, heavy) = rss_mb(child.pid), mapped_libraries(child.pid)
    met = "yes" if rss < RSS_TARGET_MB and not libtorch else "NO"
    target = f"<{RSS_TARGET_MB:g}"
    return [
        f"{rss:.1f}",
        target if store else "-",
        met if store else "-",
        "MAPPED" if libtorch else "no",
        heavy or "-",
    ]


async def memory_section(sqlite: Store, postgres: Store, logs: Path) -> None:
    print()
    print("idle memory: VmRSS after one request and 2 s idle")
    print_table(
        ["process", "RSS MB", "target", "met", "libtorch", "heavy libs mapped"],
        [
            ["fluxserve api (sqlite)", *await idle_memory(sqlite, logs)],
            ["fluxserve api (postgres)", *await idle_memory(postgres, logs)],
            ["bare app (reference)", *await idle_memory(None, logs)],
        ],
    )


# Main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    print(
        f"fluxserve throughput bench, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, no GPU in use; "
        f"load average at start {load_average()}\n"
        f"{args.clients} concurrent clients (raw HTTP/1.1 keep-alive), "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured, 2xx answers counted; "
        f"submits from {args.accounts} account(s), status reads from the first.\n"
        "The load generator, the servers and PostgreSQL share the same cores: "
        "cpu = cores used by client/servers/db/other processes during the window."
    )
    async with postgres_database() as url:
        with tempfile.TemporaryDirectory(prefix="fluxserve-throughput-") as tmp:
            root = Path(tmp)
            logs = root / "logs"
            logs.mkdir()
            sqlites = [
                Store(
                    f"sqlite-{mode}",
                    {"data_dir": str(root / f"sqlite-{mode}"), "sqlite_synchronous": mode},
                )
                for mode in args.sqlite_synchronous
            ]
            pg_settings = {"data_dir": str(root / "pg"), "database_url": url}
            postgres = Store("postgres", pg_settings, database=url.rsplit("/", 1)[1])
            for store in (*sqlites, postgres):
                store.keys = [create_key(store.env()) for _ in range(args.accounts)]
            if "throughput" in args.only:
                print_throughput(await throughput((*sqlites, postgres), args, logs))
            if "dispatch" in args.only:
                await dispatch_section(sqlites, postgres, args, logs)
            if "memory" in args.only:
                await memory_section(sqlites[0], postgres, logs)
    print()
    print(f"load average at end {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
    parser.add_argument("--tasks", type=int, default=50, help="tasks for dispatch latency")
    parser.add_argument(
        "--accounts",
        type=int,
        default=1,
        help="submits spread their clients over this many keys, each its own account",
    )
    parser.add_argument(
        "--queue-depth",
        type=int,
        default=2000,
        help="status reads run over the first this many queued tasks (the rest are deleted)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="throughput and dispatch rounds, interleaved"
    )
    parser.add_argument(
        "--sqlite-synchronous",
        nargs="+",
        choices=("full", "normal"),
        default=["full"],
        help="the SQLite store's sqlite_synchronous; with both, each is measured beside the other",
    )
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
