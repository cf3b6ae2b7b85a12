"""The load generator of bench/throughput.py and bench/observe.py, and where the cores go.

`drive` opens --clients keep-alive HTTP/1.1 connections from this process, spread
round-robin over the servers' ports and the keys; each sends its next request as
soon as it has read the last answer. Requests are written and answers read as
raw bytes on asyncio streams: httpx costs several times the client CPU here, and
the client shares the machine's cores with the servers. Answers completed inside
the measured window (after --warmup, for --duration seconds) are counted.
Meanwhile it samples the CPU of this process (the client), of the servers, of
PostgreSQL's backends on the bench's database and of the whole machine, so each
tally says where the cores went and the server + database CPU per answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import HOST

CLK_TCK = os.sysconf("SC_CLK_TCK")
QUIET_CORES = 0.3


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine, all cores, so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def backend_pids(database: str | None) -> list[int]:
    """PostgreSQL backends connected to `database` (their title names it)."""
    if database is None:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"postgres:") and database.encode() in title:
            found.append(int(entry.name))
    return found


@dataclass
class Sample:
    wall: float
    client: float
    servers: dict[int, float]
    db: dict[int, float]
    machine: float

    @classmethod
    def take(cls, server_pids: Sequence[int], database: str | None) -> Sample:
        servers = {pid: proc_cpu(pid) for pid in server_pids}
        db = {pid: proc_cpu(pid) for pid in backend_pids(database)}
        return cls(time.monotonic(), time.process_time(), servers, db, machine_busy())


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU between two samples; a process born in between counts whole, one gone counts 0."""
    return sum(max(0.0, used - before.get(pid, 0.0)) for pid, used in after.items())


@dataclass
class Tally:
    """2xx answers completed inside the window, what was not 2xx, and where the cores went."""

    seconds: float
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cores: dict[str, float] = field(default_factory=dict)  # client, servers, db, other

    @property
    def rate(self) -> float:
        return self.ok / self.seconds

    def cpu_ms(self, who: str = "servers db") -> float:
        """CPU per 2xx answer in ms of `who` (servers, db or both): the cost, whatever else ran."""
        used = sum(self.cores.get(name, 0.0) for name in who.split())
        return used * self.seconds * 1000 / self.ok if self.ok else 0.0

    def cores_text(self) -> str:
        return "/".join(f"{self.cores[name]:.2f}" for name in ("client", "servers", "db", "other"))

    def error_text(self) -> str:
        return ", ".join(f"{kind} x{n}" for kind, n in self.errors.most_common()) or "-"

    def measure_cores(self, before: Sample, after: Sample) -> None:
        wall = after.wall - before.wall
        client = after.client - before.client
        servers, db = spent(before.servers, after.servers), spent(before.db, after.db)
        other = max(0.0, after.machine - before.machine - client - servers - db)
        used = {"client": client, "servers": servers, "db": db, "other": other}
        self.cores = {name: seconds / wall for name, seconds in used.items()}


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("answer without Content-Length")


async def drive(
    ports: Sequence[int],
    keys: Sequence[str],
    path: Callable[[], str],
    args: argparse.Namespace,
    *,
    server_pids: Sequence[int],
    database: str | None = None,
    body: bytes = b"",
) -> Tally:
    """`args.clients` connections sending GET `path()` (POST with `body`, if given) for
    warm-up + duration; the window's tally."""
    start = time.monotonic() + args.warmup
    end = start + args.duration
    tally = Tally(args.duration)
    method = "POST" if body else "GET"
    extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""

    async def connection(port: int, key: str) -> None:
        headers = f" HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {key}\r\n{extra}\r\n"
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.monotonic() < end:
                writer.write(f"{method} {path()}{headers}".encode() + body)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(content_length(head))
                if start <= time.monotonic() < end:
                    if head[9:10] == b"2":
                        tally.ok += 1
                    else:
                        tally.errors[f"HTTP {head[9:12].decode()}"] += 1
        finally:
            writer.close()

    async def guarded(port: int, key: str) -> None:
        """One connection; after a transport error, counted, a new one."""
        while time.monotonic() < end:
            try:
                return await connection(port, key)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if start <= time.monotonic() < end:
                    tally.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)

    jobs = [
        asyncio.create_task(guarded(ports[i % len(ports)], keys[i % len(keys)]))
        for i in range(args.clients)
    ]
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    before = Sample.take(server_pids, database)
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    after = Sample.take(server_pids, database)
    await asyncio.wait_for(asyncio.gather(*jobs), timeout=60)
    tally.measure_cores(before, after)
    return tally


async def wait_quiet(limit: float = 20.0) -> None:
    """Wait (up to `limit` s) until the machine is nearly idle."""
    deadline = time.monotonic() + limit
    while True:
        before, started = machine_busy(), time.monotonic()
        await asyncio.sleep(1.0)
        busy = (machine_busy() - before) / (time.monotonic() - started)
        if busy < QUIET_CORES:
            return
        if time.monotonic() > deadline:
            print(f"  (machine still busy: {busy:.2f} cores used by others; measuring anyway)")
            return
