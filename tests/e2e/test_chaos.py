"""Many processes on PostgreSQL, workers killed at random: nothing is lost or doubled.

Two `fluxserve api` processes and three `fluxserve worker` processes share one
PostgreSQL database and one files folder. 300 tasks go in through both APIs while
workers are SIGKILLed at random moments and restarted; then one API process is
SIGKILLed in the middle of a burst of submits.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Receiver, fresh_postgres_database, serve_asgi

pytestmark = pytest.mark.slow

TASKS = 300
WORKERS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Fleet:
    """The processes of one deployment, started and killed like an operator would."""

    def __init__(self, database_url: str, data_dir: Path, log_dir: Path) -> None:
        self.env = {
            **os.environ,
            "FLUXSERVE_DATABASE_URL": database_url,
            "FLUXSERVE_DATA_DIR": str(data_dir),
            "FLUXSERVE_ALLOW_PRIVATE_NETWORKS": "true",
            "FLUXSERVE_LEASE_SECONDS": "2",
            "FLUXSERVE_MAX_ATTEMPTS": "50",
            "FLUXSERVE_POLL_INTERVAL": "0.5",
            "FLUXSERVE_TINY_STEPS": "1",
            "FLUXSERVE_CALLBACK_RETRY_DELAYS": "[0.2, 0.5, 1, 2, 2, 2, 2, 2]",
            # Five processes share two cores: one thread each, or they fight.
            "OMP_NUM_THREADS": "1",
        }
        self.log_dir = log_dir
        self.apis: dict[int, subprocess.Popen[bytes]] = {}
        self.workers: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def _spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.started += 1
        with (self.log_dir / f"{self.started:03d}-{args[0]}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "fluxserve", *args],
                env=env or self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start_api(self) -> int:
        port = free_port()
        self.apis[port] = self._spawn("api", "--port", str(port))
        return port

    def start_worker(self) -> None:
        self.workers.append(self._spawn("worker"))

    def kill_random_worker(self, rng: random.Random) -> None:
        victim = self.workers.pop(rng.randrange(len(self.workers)))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.start_worker()

    def stop(self) -> None:
        for process in [*self.apis.values(), *self.workers]:
            if process.poll() is None:
                process.kill()
            process.wait()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with fresh_postgres_database() as url:
        (tmp_path / "logs").mkdir()
        deployment = Fleet(url, tmp_path / "data", tmp_path / "logs")
        try:
            yield deployment
        finally:
            deployment.stop()


async def wait_ready(client: httpx.AsyncClient, base_url: str, fleet: Fleet) -> None:
    for _ in range(600):
        try:
            if (await client.get(f"{base_url}/health")).status_code == 200:
                return
        except httpx.TransportError:
            await asyncio.sleep(0.1)
    raise AssertionError(fleet.logs())


def create_key(fleet: Fleet) -> str:
    created = subprocess.run(
        [sys.executable, "-m", "fluxserve", "keys", "create", "--name", "chaos"],
        env=fleet.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return created.stdout.split()[-1]


@pytest.mark.timeout(900)
async def test_killed_workers_lose_and_double_nothing(fleet: Fleet, tmp_path: Path) -> None:
    rng = random.Random(20261125)
    first, second = fleet.start_api(), fleet.start_api()
    for _ in range(WORKERS):
        fleet.start_worker()
    headers = {"Authorization": f"Bearer {create_key(fleet)}"}
    receiver = Receiver()
    conn = await asyncpg.connect(fleet.env["FLUXSERVE_DATABASE_URL"])
    async with (
        serve_asgi(receiver.app()) as hook_url,
        httpx.AsyncClient(timeout=30, headers=headers) as client,
    ):
        apis = [f"http://127.0.0.1:{port}" for port in (first, second)]
        for base in apis:
            await wait_ready(client, base, fleet)

        async def submit(index: int) -> str:
            response = await client.post(
                apis[index % 2] + "/api/generate/submit",
                json={
                    "model": "flux-2-pro",
                    "callback_url": f"{hook_url}/hook",
                    # JPEG: a quarter of the time PNG takes to encode a tiny 1K image.
                    "input": {
                        "prompt": f"chaos number {index}",
                        "size": "1:1",
                        "output_format": "jpeg",
                    },
                },
            )
            assert response.status_code == 200, response.text
            return str(response.json()["data"]["task_id"])

        ids: list[str] = []
        for start in range(0, TASKS, 25):
            ids += await asyncio.gather(*(submit(i) for i in range(start, start + 25)))

        async def statuses() -> Counter[str]:
            rows = await conn.fetch("SELECT status, count(*) FROM tasks GROUP BY status")
            return Counter({row[0]: row[1] for row in rows})

        kills = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 600
        while (counts := await statuses())["finished"] + counts["failed"] < TASKS:
            assert loop.time() < deadline, f"{counts}\n{fleet.logs()}"
            if kills < 12:
                await asyncio.sleep(rng.uniform(2, 6))
                fleet.kill_random_worker(rng)
                kills += 1
            else:
                await asyncio.sleep(1)
        await receiver.wait_for(TASKS, within=120)
        # What a user sees: every task finished, through either API.
        for index, task_id in enumerate(ids):
            response = await client.get(f"{apis[index % 2]}/api/generate/status/{task_id}")
            data = response.json()["data"]
            assert data["status"] == "finished", data

    assert counts == Counter({"finished": TASKS}), counts
    files = sorted((tmp_path / "data" / "files" / "results").glob("*/*"))
    assert [f.parent.name for f in files] == sorted(ids), "exactly one result file per task"
    delivered = Counter(body["data"]["task_id"] for body in receiver.bodies)
    assert set(delivered) == set(ids), "every callback delivered"
    try:
        running = await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'running'")
        outbox = await conn.fetch(
            "SELECT task_id, count(*) AS events, bool_and(state = 'delivered') AS delivered "
            "FROM callbacks GROUP BY task_id"
        )
    finally:
        await conn.close()
    assert running == 0
    # One terminal event per task: no task was finished twice.
    assert sorted(r["task_id"] for r in outbox) == sorted(ids)
    assert all(r["events"] == 1 and r["delivered"] for r in outbox)


async def test_a_killed_api_keeps_every_task_it_acknowledged(fleet: Fleet) -> None:
    port = fleet.start_api()
    base = f"http://127.0.0.1:{port}"
    acknowledged: list[str] = []
    halfway = asyncio.Event()
    async with httpx.AsyncClient(
        base_url=base, timeout=10, headers={"Authorization": f"Bearer {create_key(fleet)}"}
    ) as client:
        await wait_ready(client, base, fleet)

        async def submit(index: int) -> Any:
            try:
                response = await client.post(
                    "/api/generate/submit",
                    json={"model": "flux-2-pro", "input": {"prompt": f"burst number {index}"}},
                )
            except httpx.TransportError:
                return None
            if response.status_code == 200:
                acknowledged.append(response.json()["data"]["task_id"])
                if len(acknowledged) == 50:
                    halfway.set()
            return response

        burst = [asyncio.create_task(submit(i)) for i in range(400)]
        await halfway.wait()
        fleet.apis[port].send_signal(signal.SIGKILL)
        await asyncio.gather(*burst)
    assert 50 <= len(acknowledged) < 400, "the kill landed in the middle of the burst"
    conn = await asyncpg.connect(fleet.env["FLUXSERVE_DATABASE_URL"])
    try:
        stored = {r["task_id"] for r in await conn.fetch("SELECT task_id FROM tasks")}
    finally:
        await conn.close()
    assert set(acknowledged) <= stored
