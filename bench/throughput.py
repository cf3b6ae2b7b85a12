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

The load generator is this process (asyncio; raw HTTP/1.1 on keep-alive streams,
or httpx with --client httpx: measured at the start, httpx is many times slower
here). Client, servers and PostgreSQL share the machine's cores, so each row says
where the cores went during its window (client/servers/db/other processes) and
the server + database CPU per answer, which does not depend on what else ran.
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
import secrets
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import asyncpg
import httpx

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
SUBMIT_BODY = json.dumps(
    {
        "model": "flux-2-pro",
        "input": {"prompt": "A lighthouse on a cliff at dawn, oil painting", "size": "1:1"},
    }
).encode()
TARGETS = {"submit": 0.30, "status": 0.50}
DISPATCH_TARGET_MS = 20.0
RSS_TARGET_MB = 120.0
READY_TIMEOUT = 60.0
TASK_TIMEOUT = 120.0
QUIET_CORES = 0.3
CLK_TCK = os.sysconf("SC_CLK_TCK")

ClientKind = Literal["raw", "httpx"]
SECTIONS = ("throughput", "dispatch", "memory")


# Processes ---------------------------------------------------------------------


class Children:
    """Child processes, each logging to its own file; all terminated on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> Child:
        log = self.log_dir / f"{name}-{secrets.token_hex(3)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append(proc)
        return Child(name, proc, log)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def children(log_dir: Path) -> Iterator[Children]:
    group = Children(log_dir)
    try:
        yield group
    finally:
        group.stop_all()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def wait_healthy(child: Child, *, worker_ready: bool = False) -> None:
    """Until GET /health answers 200 (and, if asked, its worker is ready)."""
    deadline = time.monotonic() + READY_TIMEOUT
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{child.port}", timeout=5) as client:
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            try:
                response = await client.get("/health")
                if response.status_code == 200 and (
                    not worker_ready or (response.json()["worker"] or {}).get("state") == "ready"
                ):
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} not healthy in {READY_TIMEOUT:.0f} s:\n{child.tail()}")


async def wait_log(child: Child, needle: str) -> None:
    """Until `needle` appears in the child's log."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if needle in child.log.read_text(errors="replace"):
            return
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name}: no {needle!r} in {READY_TIMEOUT:.0f} s")


# Stores ------------------------------------------------------------------------


class BenchStore(Protocol):
    """A store under test: its settings, and direct access for setup and reading back."""

    name: str

    def env(self) -> dict[str, str]: ...

    async def clear_tasks(self) -> None: ...

    async def keep_queued(self, depth: int, owner: str) -> list[str]:
        """Delete all but the first `depth` queued tasks of `owner`; the ids of those kept."""
        ...

    async def dispatch_delays(self, task_ids: Sequence[str]) -> list[float]: ...


# The status phase's queue: the first tasks the submit phase made for the key
# that reads them, in queue order.
KEEP_QUEUED = (
    "DELETE FROM tasks WHERE seq NOT IN (SELECT seq FROM tasks "
    "WHERE status = 'not_started' AND owner = $2 ORDER BY vtime, seq LIMIT $1)"
)


@dataclass(frozen=True)
class BenchKey:
    key_id: str
    secret: str


BARE_KEY = BenchKey("bare", "bare-key")  # the bare app checks only that a key is sent


class SqliteBench:
    def __init__(self, data_dir: Path, synchronous: str) -> None:
        self.data_dir = data_dir
        self.synchronous = synchronous
        self.name = f"sqlite-{synchronous}"

    def env(self) -> dict[str, str]:
        return {
            "FLUXSERVE_DATA_DIR": str(self.data_dir),
            "FLUXSERVE_SQLITE_SYNCHRONOUS": self.synchronous,
        }

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.data_dir / "fluxserve.db", timeout=30)

    async def clear_tasks(self) -> None:
        with closing(self._connect()) as conn, conn:
            conn.execute("DELETE FROM tasks")

    async def keep_queued(self, depth: int, owner: str) -> list[str]:
        with closing(self._connect()) as conn, conn:
            conn.execute(KEEP_QUEUED.replace("$1", "?1").replace("$2", "?2"), (depth, owner))
            return [row[0] for row in conn.execute("SELECT task_id FROM tasks")]

    async def dispatch_delays(self, task_ids: Sequence[str]) -> list[float]:
        marks = ",".join("?" * len(task_ids))
        query = f"SELECT started_at - created_at FROM tasks WHERE task_id IN ({marks})"
        with closing(self._connect()) as conn:
            return [float(row[0]) for row in conn.execute(query, list(task_ids))]


class PostgresBench:
    name = "postgres"

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self.database = url.rsplit("/", 1)[1]

    def env(self) -> dict[str, str]:
        return {"FLUXSERVE_DATA_DIR": str(self.data_dir), "FLUXSERVE_DATABASE_URL": self.url}

    async def clear_tasks(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("TRUNCATE tasks")
        finally:
            await conn.close()

    async def keep_queued(self, depth: int, owner: str) -> list[str]:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(KEEP_QUEUED, depth, owner)
            return [row["task_id"] for row in await conn.fetch("SELECT task_id FROM tasks")]
        finally:
            await conn.close()

    async def dispatch_delays(self, task_ids: Sequence[str]) -> list[float]:
        conn = await asyncpg.connect(self.url)
        try:
            rows = await conn.fetch(
                "SELECT started_at - created_at AS delay FROM tasks WHERE task_id = ANY($1)",
                list(task_ids),
            )
        finally:
            await conn.close()
        return [float(row["delay"]) for row in rows]


async def create_database() -> str:
    name = f"fluxserve_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


def base_env(store: BenchStore | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
    env.update(
        FLUXSERVE_ALLOW_PRIVATE_NETWORKS="true",
        FLUXSERVE_ENGINE="tiny",
        FLUXSERVE_TINY_STEPS="1",
    )
    if store is not None:
        env.update(store.env())
    return env


def create_key(store: BenchStore) -> BenchKey:
    """A key with an account of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "fluxserve", "keys", "create", "--name", "bench"],
        env=base_env(store),
        capture_output=True,
        timeout=120,
        check=True,
    )
    words = done.stdout.decode().split()  # created key <key_id> (bench) ... <secret>
    return BenchKey(words[2], words[-1])


async def start_api(group: Children, store: BenchStore) -> Child:
    port = free_port()
    env = {**base_env(store), "FLUXSERVE_PORT": str(port)}
    child = group.start(f"api-{store.name}", [sys.executable, "-m", "fluxserve", "api"], env)
    child.port = port
    await wait_healthy(child)
    return child


async def start_bare(group: Children) -> Child:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "bare_app:app", "--app-dir", str(BENCH_DIR)]
    argv += ["--host", HOST, "--port", str(port)]
    child = group.start("bare", argv, base_env(None))
    child.port = port
    await wait_healthy(child)
    return child


# CPU accounting ----------------------------------------------------------------


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
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


def backend_pids(database: str | None) -> list[int]:
    """PostgreSQL backends connected to `database` (their title names it)."""
    if database is None:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"postgres:") and database.encode() in title:
                found.append(int(entry.name))
    return found


@dataclass
class CpuSample:
    wall: float
    client: float
    servers: dict[int, float]
    db: dict[int, float]
    machine: float

    @classmethod
    def take(cls, server_pids: Sequence[int], database: str | None) -> CpuSample:
        return cls(
            wall=time.monotonic(),
            client=time.process_time(),
            servers={pid: proc_cpu(pid) for pid in server_pids},
            db={pid: proc_cpu(pid) for pid in backend_pids(database)},
            machine=machine_busy(),
        )


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU between two samples; a process born in between counts whole, one gone counts 0."""
    return sum(max(0.0, used - before.get(pid, 0.0)) for pid, used in after.items())


@dataclass
class CpuShare:
    """Where the cores went in a window, in cores (2.0 = both cores busy)."""

    client: float
    servers: float
    db: float
    other: float

    @classmethod
    def between(cls, a: CpuSample, b: CpuSample) -> CpuShare:
        wall = b.wall - a.wall
        client, servers, db = b.client - a.client, _spent(a.servers, b.servers), _spent(a.db, b.db)
        other = max(0.0, (b.machine - a.machine) - client - servers - db)
        return cls(client / wall, servers / wall, db / wall, other / wall)

    def __str__(self) -> str:
        return f"{self.client:.2f}/{self.servers:.2f}/{self.db:.2f}/{self.other:.2f}"


# Load generator ----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: bytes = b""


@dataclass
class Tally:
    """2xx answers completed inside the measured window, and everything that was not."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    bodies: list[bytes] = field(default_factory=list)
    cpu: CpuShare | None = None
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def record(self, status: int, body: bytes, keep_body: bool) -> None:
        if 200 <= status < 300:
            self.ok += 1
            if keep_body:
                self.bodies.append(body)
        else:
            self.errors[f"HTTP {status}"] += 1

    def cpu_ms(self) -> float:
        """Server and database CPU per answer, in ms: the cost, whatever else ran."""
        if self.cpu is None or not self.ok:
            return 0.0
        return (self.cpu.servers + self.cpu.db) * self.seconds * 1000 / self.ok

    def server_ms(self) -> str:
        if self.cpu is None or not self.ok:
            return "-"
        per = self.seconds * 1000 / self.ok
        return f"{self.cpu.servers * per:.2f}+{self.cpu.db * per:.2f}"

    def error_text(self) -> str:
        return ", ".join(f"{kind} x{n}" for kind, n in self.errors.most_common()) or "-"


def encode(call: Call, port: int, key: str) -> bytes:
    head = f"{call.method} {call.path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
    head += f"Authorization: Bearer {key}\r\n"
    if call.body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(call.body)}\r\n"
    return (head + "\r\n").encode() + call.body


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("answer without Content-Length")


class Window:
    """The measured window: [start, end) on the monotonic clock."""

    def __init__(self, warmup: float, duration: float) -> None:
        self.start = time.monotonic() + warmup
        self.end = self.start + duration

    def open(self) -> bool:
        return time.monotonic() < self.end

    def counts(self, at: float) -> bool:
        return self.start <= at < self.end


async def raw_connection(
    port: int, key: str, make_call: Callable[[], Call], window: Window, tally: Tally, keep: bool
) -> None:
    """One keep-alive connection sending requests back to back until the window closes."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while window.open():
            writer.write(encode(make_call(), port, key))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(content_length(head))
            done = time.monotonic()
            if window.counts(done):
                tally.record(int(head[9:12]), body, keep)
    finally:
        writer.close()


async def httpx_connection(
    client: httpx.AsyncClient,
    port: int,
    key: str,
    make_call: Callable[[], Call],
    window: Window,
    tally: Tally,
    keep: bool,
) -> None:
    """One httpx requester: the pool gives it a keep-alive connection to `port`."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    while window.open():
        call = make_call()
        url = f"http://{HOST}:{port}{call.path}"
        response = await client.request(call.method, url, content=call.body, headers=headers)
        done = time.monotonic()
        if window.counts(done):
            tally.record(response.status_code, response.content, keep)


async def guarded(job: Any, window: Window, tally: Tally) -> None:
    """Run one requester; a transport error is counted, and the requester starts over."""
    while window.open():
        try:
            await job()
            return
        except (OSError, asyncio.IncompleteReadError, ValueError, httpx.HTTPError) as exc:
            if window.counts(time.monotonic()):
                tally.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.01)


async def drive(
    ports: Sequence[int],
    keys: Sequence[str],
    make_call: Callable[[], Call],
    args: argparse.Namespace,
    *,
    server_pids: Sequence[int],
    database: str | None = None,
    keep_bodies: bool = False,
    client_kind: ClientKind | None = None,
) -> Tally:
    """`args.clients` requesters, spread round-robin over `ports` and `keys`, for warm-up
    + duration."""
    kind = client_kind or args.client
    tally = Tally()
    window = Window(args.warmup, args.duration)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        jobs = []
        for index in range(args.clients):
            port, key = ports[index % len(ports)], keys[index % len(keys)]
            if kind == "raw":
                job = _bind(raw_connection, port, key, make_call, window, tally, keep_bodies)
            else:
                job = _bind(
                    httpx_connection, client, port, key, make_call, window, tally, keep_bodies
                )
            jobs.append(asyncio.create_task(guarded(job, window, tally)))
        await asyncio.sleep(max(0.0, window.start - time.monotonic()))
        before = CpuSample.take(server_pids, database)
        await asyncio.sleep(max(0.0, window.end - time.monotonic()))
        after = CpuSample.take(server_pids, database)
        await asyncio.wait_for(asyncio.gather(*jobs), timeout=60)
    tally.cpu = CpuShare.between(before, after)
    tally.seconds = args.duration
    return tally


def _bind(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: function(*args)


# Throughput --------------------------------------------------------------------


@dataclass
class Row:
    op: str
    server: str
    procs: int
    tally: Tally
    queued: int = 0
    rounds: list[float] = field(default_factory=list)


def submit_call() -> Call:
    return Call("POST", "/api/generate/submit", SUBMIT_BODY)


def status_calls(task_ids: Sequence[str]) -> Callable[[], Call]:
    ids = list(task_ids) or ["task-unified-0-00000000"]
    return lambda: Call("GET", f"/api/generate/status/{random.choice(ids)}")


def task_ids(bodies: Sequence[bytes]) -> list[str]:
    return [json.loads(body)["data"]["task_id"] for body in bodies]


async def measure_pair(
    name: str,
    servers: Sequence[Child],
    keys: Sequence[BenchKey],
    args: argparse.Namespace,
    store: BenchStore | None = None,
) -> list[Row]:
    """Submits with every key, then status reads with the first key of the first
    `args.queue_depth` tasks it submitted."""
    ports = [child.port for child in servers]
    pids = [child.pid for child in servers]
    database = store.database if isinstance(store, PostgresBench) else None
    bearers = [key.secret for key in keys]
    submits = await drive(
        ports, bearers, submit_call, args, server_pids=pids, database=database, keep_bodies=True
    )
    if store is None:
        ids = task_ids(submits.bodies)[: args.queue_depth]
    else:
        # A task's queue position is counted on each read, so the reads' cost
        # grows with the queue: every run reads over a queue of the same depth.
        ids = await store.keep_queued(args.queue_depth, keys[0].key_id)
    reads = await drive(
        ports, bearers[:1], status_calls(ids), args, server_pids=pids, database=database
    )
    return [
        Row("submit", name, len(servers), submits),
        Row("status", name, len(servers), reads, queued=len(ids)),
    ]


async def measure_config(
    store: BenchStore | None,
    procs: int,
    keys: Sequence[BenchKey],
    args: argparse.Namespace,
    log_dir: Path,
) -> list[Row]:
    """One server kind with `procs` processes: its submit and status rows."""
    if store is not None:
        await store.clear_tasks()  # every config reads status over a queue of its own making
    await wait_quiet()
    with children(log_dir) as group:
        if store is None:
            servers = [await start_bare(group) for _ in range(procs)]
            return await measure_pair("bare", servers, keys, args)
        servers = [await start_api(group, store) for _ in range(procs)]
        return await measure_pair(store.name, servers, keys, args, store)


async def throughput(
    stores: Sequence[BenchStore],
    keys: dict[str, list[BenchKey]],
    args: argparse.Namespace,
    log_dir: Path,
) -> list[Row]:
    """Every config `args.rounds` times, bare beside the stores; each row's best round."""
    best: dict[tuple[str, str, int], Row] = {}
    for _ in range(args.rounds):
        for procs in (1, 2):
            for store in (None, *stores):
                store_keys = keys[store.name] if store is not None else [BARE_KEY]
                for row in await measure_config(store, procs, store_keys, args, log_dir):
                    ident = (row.op, row.server, row.procs)
                    seen = best.get(ident)
                    row.rounds = [*(seen.rounds if seen else []), row.tally.rate]
                    if seen is None or row.tally.rate > seen.tally.rate:
                        best[ident] = row
                    else:
                        seen.rounds = row.rounds
    return sorted(best.values(), key=lambda r: (r.op != "submit", r.procs, r.server != "bare"))


async def wait_quiet(limit: float = 20.0) -> float:
    """Wait (up to `limit` s) until the machine is nearly idle; the busy cores seen last."""
    deadline = time.monotonic() + limit
    while True:
        before, started = machine_busy(), time.monotonic()
        await asyncio.sleep(1.0)
        busy = (machine_busy() - before) / (time.monotonic() - started)
        if busy < QUIET_CORES or time.monotonic() > deadline:
            if busy >= QUIET_CORES:
                print(f"  (machine still busy: {busy:.2f} cores used by others; measuring anyway)")
            return busy


async def client_check(args: argparse.Namespace, log_dir: Path) -> dict[str, float]:
    """Status reads/s on one bare process with each client: is the client the limit?"""
    rates: dict[str, float] = {}
    with children(log_dir) as group:
        server = await start_bare(group)
        kinds: tuple[ClientKind, ...] = ("httpx", "raw")
        for kind in kinds:
            tally = await drive(
                [server.port],
                [BARE_KEY.secret],
                status_calls([]),
                args,
                server_pids=[server.pid],
                client_kind=kind,
            )
            rates[kind] = tally.rate
    return rates


# Dispatch latency ----------------------------------------------------------------


async def run_one_task(client: httpx.AsyncClient, key: str) -> str:
    """Submit one task and wait until it is finished; its id."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    response = await client.post("/api/generate/submit", content=SUBMIT_BODY, headers=headers)
    response.raise_for_status()
    task_id: str = response.json()["data"]["task_id"]
    deadline = time.monotonic() + TASK_TIMEOUT
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        status = await client.get(f"/api/generate/status/{task_id}", headers=headers)
        state = status.json()["data"]["status"]
        if state == "finished":
            return task_id
        if state == "failed":
            raise RuntimeError(f"task {task_id} failed: {status.text}")
    raise RuntimeError(f"task {task_id} not finished in {TASK_TIMEOUT:.0f} s")


async def dispatch_delays(
    store: BenchStore, key: str, args: argparse.Namespace, log_dir: Path, *, embedded: bool
) -> list[float]:
    """Submit -> running, server timestamps, over `args.tasks` tasks each run on an idle worker."""
    await store.clear_tasks()
    with children(log_dir) as group:
        cli = [sys.executable, "-m", "fluxserve"]
        port = free_port()
        env = {**base_env(store), "FLUXSERVE_PORT": str(port)}
        if embedded:
            api = group.start(f"serve-{store.name}", [*cli, "serve"], env)
        else:
            api = group.start(f"api-{store.name}", [*cli, "api"], env)
            worker = group.start(f"worker-{store.name}", [*cli, "worker"], env)
        api.port = port
        await wait_healthy(api, worker_ready=embedded)
        if not embedded:
            await wait_log(worker, " ready for ")
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=30) as client:
            await run_one_task(client, key)  # warms the engine and the connections up
            ids = []
            for _ in range(args.tasks):
                await asyncio.sleep(random.uniform(0.05, 0.25))  # the worker idles meanwhile
                ids.append(await run_one_task(client, key))
    return await store.dispatch_delays(ids)


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


# Memory ----------------------------------------------------------------------------


@dataclass
class Memory:
    rss_mb: float
    libtorch: bool
    heavy: list[str]


def memory_of(pid: int) -> Memory:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    maps = Path(f"/proc/{pid}/maps").read_text()
    heavy = [name for name in ("numpy", "PIL", "torch", "diffusers") if f"/{name}" in maps]
    return Memory(rss_kb / 1024, "libtorch" in maps, heavy)


async def idle_memory(store: BenchStore | None, key: str, log_dir: Path) -> Memory:
    """Start, answer one request (a submit; bare: a status read), idle 2 s, then look."""
    with children(log_dir) as group:
        child = await (start_bare(group) if store is None else start_api(group, store))
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{child.port}") as client:
            if store is None:
                response = await client.get("/api/generate/status/x", headers=headers)
            else:
                response = await client.post(
                    "/api/generate/submit", content=SUBMIT_BODY, headers=headers
                )
            response.raise_for_status()
        await asyncio.sleep(2)
        return memory_of(child.pid)


def load_average() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


# Report ----------------------------------------------------------------------------


def print_header(args: argparse.Namespace) -> None:
    load = load_average()
    print(
        f"fluxserve throughput bench, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, no GPU in use; "
        f"load average at start {' '.join(load)}"
    )
    print(
        f"{args.clients} concurrent clients ({args.client} HTTP/1.1 keep-alive), "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured, 2xx answers counted; "
        f"submits from {args.accounts} account(s), status reads from the first."
    )
    print(
        "The load generator, the servers and PostgreSQL share the same cores: "
        "cpu = cores used by client/servers/db/other processes during the window."
    )


def print_throughput(rows: Sequence[Row]) -> None:
    bare = {(row.op, row.procs): row.tally for row in rows if row.server == "bare"}
    print()
    print(
        f"{'op':<7}{'server':<14}{'procs':>5}{'rate/s':>8}{'vs bare':>8}{'target':>7}{'met':>4}"
        f"{'median':>7}  {'rounds':<24}{'ms cpu/req':>11}{'cost vs bare':>13}"
        f"  {'cores c/s/db/oth':<20}"
        f"{'queued':>6}  errors"
    )
    for row in rows:
        ratio, target, met, cost = "-", "-", "-", "-"
        if row.server != "bare":
            ceiling = bare[(row.op, row.procs)]
            share = row.tally.rate / ceiling.rate if ceiling.rate else 0.0
            ratio, target = f"{share:.0%}", f">={TARGETS[row.op]:.0%}"
            met = "yes" if share >= TARGETS[row.op] else "NO"
            if row.tally.cpu_ms() and ceiling.cpu_ms():
                cost = f"{ceiling.cpu_ms() / row.tally.cpu_ms():.0%}"
        rounds = ",".join(f"{rate:.0f}" for rate in row.rounds)
        median = statistics.median(row.rounds)
        queued = str(row.queued) if row.server != "bare" else "-"
        print(
            f"{row.op:<7}{row.server:<14}{row.procs:>5}{row.tally.rate:>8.0f}{ratio:>8}"
            f"{target:>7}{met:>4}{median:>7.0f}  {rounds:<24}"
            f"{row.tally.server_ms():>11}{cost:>13}  "
            f"{row.tally.cpu!s:<20}{queued:>6}  {row.tally.error_text()}"
        )
    print(
        "rate/s: best of the rounds; median: the rounds' median; ms cpu/req: server + database\n"
        "CPU per 2xx answer; cost vs bare: bare's CPU per answer / this one's, the rate ratio to\n"
        "expect when the cores are the limit (it does not depend on what else ran meanwhile)."
    )


def print_dispatch(results: dict[str, list[list[float]]], tasks: int) -> None:
    print()
    print(
        f"dispatch: submit -> running on an idle worker, {tasks} tasks a round, "
        "server timestamps; median and p99 of all rounds' tasks"
    )
    print(f"{'setup':<44}{'median ms':>10}{'p99 ms':>9}{'target':>9}{'met':>5}  round medians ms")
    for name, rounds in results.items():
        delays = [delay for one in rounds for delay in one]
        median = statistics.median(delays) * 1000
        met = "yes" if median < DISPATCH_TARGET_MS else "NO"
        each = ",".join(f"{statistics.median(one) * 1000:.1f}" for one in rounds)
        print(
            f"{name:<44}{median:>10.1f}{p99(delays) * 1000:>9.1f}"
            f"{f'<{DISPATCH_TARGET_MS:g}':>9}{met:>5}  {each}"
        )


def print_memory(results: dict[str, Memory]) -> None:
    print()
    print("idle memory: VmRSS after one request and 2 s idle")
    print(f"{'process':<26}{'RSS MB':>8}{'target':>8}{'met':>5}  {'libtorch':<9}heavy libs mapped")
    for name, memory in results.items():
        is_api = not name.startswith("bare")
        target = f"<{RSS_TARGET_MB:g}" if is_api else "-"
        met = (
            ("yes" if memory.rss_mb < RSS_TARGET_MB and not memory.libtorch else "NO")
            if is_api
            else "-"
        )
        torch_mapped = "MAPPED" if memory.libtorch else "no"
        print(
            f"{name:<26}{memory.rss_mb:>8.1f}{target:>8}{met:>5}  {torch_mapped:<9}"
            f"{', '.join(memory.heavy) or '-'}"
        )


# Sections ----------------------------------------------------------------------


async def throughput_section(
    stores: Sequence[BenchStore],
    keys: dict[str, list[BenchKey]],
    args: argparse.Namespace,
    logs: Path,
) -> None:
    rates = await client_check(args, logs)
    print(
        f"client check, bare status reads/s with 1 process: httpx {rates['httpx']:.0f}, "
        f"raw {rates['raw']:.0f}"
    )
    print_throughput(await throughput(stores, keys, args, logs))


async def dispatch_section(
    sqlites: Sequence[BenchStore],
    postgres: BenchStore,
    keys: dict[str, list[BenchKey]],
    args: argparse.Namespace,
    logs: Path,
) -> None:
    """Each setup `args.rounds` times, the setups taking turns."""
    setups = [
        *(
            (f"{sqlite.name}, {layout}", sqlite, embedded)
            for sqlite in sqlites
            for layout, embedded in (
                ("api + worker processes", False),
                ("serve (embedded worker)", True),
            )
        ),
        ("postgres, api + worker processes", postgres, False),
    ]
    results: dict[str, list[list[float]]] = {}
    for _ in range(args.rounds):
        for name, store, embedded in setups:
            try:
                delays = await dispatch_delays(
                    store, keys[store.name][0].secret, args, logs, embedded=embedded
                )
            except RuntimeError as exc:
                print(f"dispatch, {name}: failed: {exc}")
            else:
                results.setdefault(name, []).append(delays)
    print_dispatch(results, args.tasks)


async def memory_section(
    sqlite: BenchStore, postgres: BenchStore, keys: dict[str, list[BenchKey]], logs: Path
) -> None:
    print_memory(
        {
            "fluxserve api (sqlite)": await idle_memory(sqlite, keys[sqlite.name][0].secret, logs),
            "fluxserve api (postgres)": await idle_memory(
                postgres, keys["postgres"][0].secret, logs
            ),
            "bare app (reference)": await idle_memory(None, BARE_KEY.secret, logs),
        }
    )


# Main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    print_header(args)
    database = await create_database()
    with tempfile.TemporaryDirectory(prefix="fluxserve-throughput-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        sqlites = [SqliteBench(root / f"sqlite-{mode}", mode) for mode in args.sqlite_synchronous]
        postgres = PostgresBench(f"postgresql://postgres@{HOST}:5432/{database}", root / "pg")
        try:
            keys = {
                store.name: [create_key(store) for _ in range(args.accounts)]
                for store in (*sqlites, postgres)
            }
            if "throughput" in args.only:
                await throughput_section((*sqlites, postgres), keys, args, logs)
            if "dispatch" in args.only:
                await dispatch_section(sqlites, postgres, keys, args, logs)
            if "memory" in args.only:
                await memory_section(sqlites[0], postgres, keys, logs)
        finally:
            await drop_database(database)
    print()
    print(f"load average at end {' '.join(load_average())}")


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
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
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
