"""What the benches share: child processes with their logs, free ports, fluxserve's
environment and keys, a PostgreSQL database of their own, a process's memory."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import asyncpg
import httpx
import uvicorn
from starlette.types import ASGIApp

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
FLUXSERVE = [sys.executable, "-m", "fluxserve"]
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
READY_TIMEOUT = 180.0  # a loaded machine can take minutes to start a worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def fluxserve_env(**settings: str) -> dict[str, str]:
    """This process's environment without its FLUXSERVE_ settings, plus `settings`
    (named without the prefix), with the tiny engine and private networks allowed."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}
    settings = {"allow_private_networks": "true", "engine": "tiny", **settings}
    env.update({f"FLUXSERVE_{name.upper()}": value for name, value in settings.items()})
    return env


def create_key(env: dict[str, str]) -> tuple[str, str]:
    """A key with an account of its own, through the CLI: (key id, secret)."""
    done = subprocess.run(
        [*FLUXSERVE, "keys", "create", "--name", "bench"],
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    words = done.stdout.decode().split()  # created key <key_id> (bench) ... <secret>
    return words[2], words[-1]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def until(self, ready: Callable[[], Awaitable[bool]]) -> None:
        """Poll `ready()` every 0.1 s until it is true; fail if the child exits first."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            if await ready():
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in {READY_TIMEOUT:.0f} s:\n{self.tail()}")

    async def healthy(self, *, worker_ready: bool = False) -> None:
        """Until GET /health answers 200 (and, if asked, its worker is ready)."""
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{self.port}", timeout=5) as client:

            async def answers() -> bool:
                try:
                    response = await client.get("/health")
                except httpx.TransportError:
                    return False
                if response.status_code != 200:
                    return False
                return not worker_ready or (response.json()["worker"] or {}).get("state") == "ready"

            await self.until(answers)

    async def logged(self, needle: str) -> None:
        """Until `needle` appears in the child's log."""

        async def found() -> bool:
            return needle in self.log.read_text(errors="replace")

        await self.until(found)


class Children:
    """Child processes, each logging to its own file in `log_dir`; all ended on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
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

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], port: int = 0) -> Child:
        log = self.log_dir / f"{name}-{secrets.token_hex(3)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append(proc)
        return Child(name, proc, log, port)

    async def fluxserve(
        self, command: str, env: dict[str, str], *, worker_ready: bool = False
    ) -> Child:
        """`fluxserve <command>` on a free port, once it answers /health."""
        port = free_port()
        child = self.start(
            command, [*FLUXSERVE, command], {**env, "FLUXSERVE_PORT": str(port)}, port
        )
        await child.healthy(worker_ready=worker_ready)
        return child

    async def bare(self) -> Child:
        """bench/bare_app.py on uvicorn on a free port, once it answers /health."""
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "bare_app:app", "--app-dir", str(BENCH_DIR)]
        child = self.start(
            "bare", [*argv, "--host", HOST, "--port", str(port)], fluxserve_env(), port
        )
        await child.healthy()
        return child


@asynccontextmanager
async def in_process(app: ASGIApp) -> AsyncIterator[int]:
    """`app` served by uvicorn in this process on a free port, until the block ends; the port."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if serving.done():
                    serving.result()  # raises why it could not start
                await asyncio.sleep(0.01)
            yield int(sock.getsockname()[1])
        finally:
            server.should_exit = True
            await serving


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """The URL of a new PostgreSQL database, dropped afterwards."""
    name = f"fluxserve_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(
        int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns as wide as their widest cell; the first left-aligned, the rest right."""
    cells = [[str(cell) for cell in row] for row in (header, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        first, *rest = zip(row, widths, strict=True)
        print("  ".join([first[0].ljust(first[1]), *(cell.rjust(w) for cell, w in rest)]))
