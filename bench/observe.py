"""What the metrics and the logs cost a status read, against the same API without
them and against the bare ceiling, in one run.

Status reads/s (GET /api/generate/status/{id} of queued tasks, SQLite, one
process, --clients keep-alive clients, the raw client of bench/load.py) for
  bare        bench/bare_app.py: the route's JSON shape, no storage (the ceiling)
  baseline    `fluxserve api` from --baseline, a copy of src/ from before (made by
              `git archive <rev> src | tar -x -C /tmp/base`)
  current     `fluxserve api` from this tree: the request histogram, the task's
              id bound for the logs, text access log
  json        the same with log_format = "json"
each --rounds times, interleaved, over the same queue of --queue-depth tasks.
Shows the best rate of each, its ratio to bare, and the server CPU per answer
(the median of the rounds), which does not depend on what else ran; its ratio
to the baseline's is what the change costs.

    .venv/bin/python bench/observe.py --baseline /tmp/base/src [--rounds 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness import BENCH_DIR, Child, Children, create_key, load_average
from load import Tally, drive, wait_quiet
from throughput import BARE_SECRET, SUBMIT_BODY, SUBMIT_PATH, Store

SRC = BENCH_DIR.parent / "src"
VARIANTS = ("bare", "baseline", "current", "json")


@dataclass
class Result:
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def add(self, tally: Tally) -> None:
        self.rates.append(tally.rate)
        self.cpu_ms.append(tally.cpu_ms())


async def start(group: Children, variant: str, store: Store, baseline: Path) -> Child:
    if variant == "bare":
        return await group.bare()
    env = {**store.env(), "PYTHONPATH": str(baseline if variant == "baseline" else SRC)}
    if variant == "json":
        env["FLUXSERVE_LOG_FORMAT"] = "json"
    return await group.fluxserve("api", env)


async def run(args: argparse.Namespace, baseline: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fluxserve-observe-") as tmp:
        log_dir = Path(tmp)
        store = Store("sqlite", {"data_dir": str(log_dir / "data")})
        os.environ["PYTHONPATH"] = str(SRC)  # the key and the schema: this tree's
        store.keys = [create_key(store.env())]
        secret = store.keys[0][1]
        with Children(log_dir) as group:
            server = await start(group, "current", store, baseline)
            submits = await drive(
                [server.port], [secret], lambda: SUBMIT_PATH, args, server_pids=[server.pid],
                body=SUBMIT_BODY,
            )  # fmt: skip
        assert submits.ok >= args.queue_depth, "too few submits for the queue"
        ids = await store.keep_queued(args.queue_depth)
        results = {variant: Result() for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                await wait_quiet()
                with Children(log_dir) as group:
                    server = await start(group, variant, store, baseline)
                    tally = await drive(
                        [server.port],
                        [BARE_SECRET if variant == "bare" else secret],
                        lambda: f"/api/generate/status/{random.choice(ids)}",
                        args,
                        server_pids=[server.pid],
                    )
                    results[variant].add(tally)
    print_table(args, results, len(ids))


def print_table(args: argparse.Namespace, results: dict[str, Result], queued: int) -> None:
    print(
        f"status reads, SQLite, 1 process, {args.clients} clients, {queued} queued tasks, "
        f"{args.rounds} rounds of {args.duration:g} s; load average {load_average()}"
    )
    print(
        f"{'server':9} {'rate/s':>7} {'vs bare':>8} {'rounds':<24} {'ms cpu/req':>10} "
        f"{'vs baseline':>11}"
    )
    bare = max(results["bare"].rates)
    base_cpu = statistics.median(results["baseline"].cpu_ms)
    for variant, result in results.items():
        rate, cpu = max(result.rates), statistics.median(result.cpu_ms)
        rounds = ",".join(f"{r:.0f}" for r in result.rates)
        versus = "-" if variant == "bare" else f"{cpu / base_cpu:.1%}"
        print(f"{variant:9} {rate:7.0f} {rate / bare:8.0%} {rounds:<24} {cpu:10.3f} {versus:>11}")
    print("ms cpu/req: the server's CPU per answer, median of the rounds; vs baseline: that")
    print("CPU against the baseline's (above 100%: the change costs that much more per read).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="src/ from before, e.g. /tmp/base/src")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
    parser.add_argument("--queue-depth", type=int, default=200, help="queued tasks read")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; best rate is shown")
    args = parser.parse_args()
    asyncio.run(run(args, Path(args.baseline).resolve()))


if __name__ == "__main__":
    main()
