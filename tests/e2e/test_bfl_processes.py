"""engine = "bfl" in real processes without torch: killed mid-task and restarted, the
upstream task is created once, its image stored once, its credits charged once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from conftest import serve_asgi, until
from fake_bfl import COST, KEY, FakeBfl
from test_processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NO_TORCH = str(Path(__file__).with_name("no_torch.py"))


async def fluxserve(env: dict[str, str], *args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, NO_TORCH, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=out)


@asynccontextmanager
async def running(
    env: dict[str, str], log: Path, *args: str
) -> AsyncIterator[subprocess.Popen[bytes]]:
    child = start(env, log, *args)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        await asyncio.to_thread(child.wait, 60)


def loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def upstream_of(data_dir: Path, task_id: str) -> Any:
    with sqlite3.connect(data_dir / "fluxserve.db") as conn:
        row = conn.execute("select upstream from tasks where task_id = ?", (task_id,)).fetchone()
    return None if row is None or row[0] is None else json.loads(row[0])


class Api:
    def __init__(self, port: str, key: str) -> None:
        auth = {"Authorization": f"Bearer {key}"}
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth)

    async def worker_state(self) -> str | None:
        try:
            worker = (await self.client.get("/health")).json()["worker"]
        except httpx.TransportError:
            return None
        return str(worker["state"])

    async def submit(self, prompt: str) -> str:
        body = {"model": "flux-2-pro", "input": {"prompt": prompt, "size": "1:1"}}
        response = await self.client.post("/api/generate/submit", json=body)
        return str(response.json()["data"]["task_id"])

    async def ended(self, task_id: str) -> dict[str, Any]:
        async with asyncio.timeout(90):
            while True:
                with contextlib.suppress(httpx.TransportError):  # the API process starting
                    response = await self.client.get(f"/api/generate/status/{task_id}")
                    data: dict[str, Any] = response.json()["data"]
                    if data["status"] in ("finished", "failed"):
                        return data
                await asyncio.sleep(0.1)


def bfl_env(data_dir: Path, upstream: str) -> dict[str, str]:
    return {
        **os.environ,
        "FLUXSERVE_DATA_DIR": str(data_dir),
        "FLUXSERVE_PORT": str(free_port()),
        "FLUXSERVE_POLL_INTERVAL": "0.2",
        "FLUXSERVE_LEASE_SECONDS": "2",
        "FLUXSERVE_ENGINE": "bfl",
        "FLUXSERVE_BFL_API_KEY": KEY,
        "FLUXSERVE_BFL_BASE_URL": upstream,
        "FLUXSERVE_BFL_POLL_INTERVAL": "0.1",
        "FLUXSERVE_PRICES": '{"flux-2-pro": {"1K": 5}}',
    }


async def test_a_killed_worker_follows_the_same_upstream_task_once_restarted(
    tmp_path: Path,
) -> None:
    fake = FakeBfl()
    data_dir, log = tmp_path / "data", tmp_path / "fluxserve.log"
    async with serve_asgi(fake.app()) as upstream:
        env = bfl_env(data_dir, upstream)
        email = "ann@example.com"
        await fluxserve(env, "accounts", "create", "--email", email)
        made = await fluxserve(env, "keys", "create", "--name", "ann", "--account", email)
        await fluxserve(env, "credits", "add", email, "100")
        api = Api(env["FLUXSERVE_PORT"], made.split()[-1])
        async with running(env, log, NO_TORCH, "serve") as serve:
            while await api.worker_state() != "ready":
                assert serve.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
            libraries = loaded_libraries(serve.pid)
            task_id = await api.submit("hold the fox")
            await until(lambda: upstream_of(data_dir, task_id) is not None, within=90)
            await until(lambda: fake.tasks["up-0"].polls >= 2, within=90)
            serve.kill()
        polls_before = fake.tasks["up-0"].polls
        # Restarted as two processes: the API, and a worker of its own.
        async with (
            running(env, log, "-m", "fluxserve", "api"),
            running(env, log, NO_TORCH, "worker"),
        ):
            await until(lambda: fake.tasks["up-0"].polls > polls_before, within=90)
            fake.release()
            data = await api.ended(task_id)
            stored = (
                (await api.client.get(data["files"][0]["file_url"])).content
                if data["files"]
                else b""
            )
        await api.client.aclose()
        ledger = await fluxserve(env, "credits", "show", email)
    assert "libtorch" not in libraries
    assert data["status"] == "finished", (data, log.read_text())
    assert stored == fake.sample and len(data["files"]) == 1
    assert list(fake.tasks) == ["up-0"] and fake.charged == COST, "one upstream task, paid once"
    assert upstream_of(data_dir, task_id)["id"] == "up-0"
    charges = [line.split("\t")[1:3] for line in ledger.splitlines() if "\tcharge\t" in line]
    assert charges == [["charge", "-5"]]
    assert "balance 95" in ledger


async def doctor(env: dict[str, str]) -> str:
    result = await asyncio.to_thread(CliRunner().invoke, _app(), ["doctor"], env=env)
    assert result.exit_code == 0, result.output
    return str(result.output)


def _app() -> Any:
    from fluxserve.cli import app

    return app


async def test_doctor_says_which_models_go_upstream_and_whether_the_key_works(
    tmp_path: Path,
) -> None:
    fake = FakeBfl()
    env = {
        "FLUXSERVE_ENGINE": "bfl",
        "FLUXSERVE_DATA_DIR": str(tmp_path),
        "FLUXSERVE_BFL_API_KEY": KEY,
    }
    async with serve_asgi(fake.app()) as upstream:
        works = await doctor(
            {**env, "FLUXSERVE_BFL_API_KEY": KEY, "FLUXSERVE_BFL_BASE_URL": upstream}
        )
        wrong = await doctor(
            {**env, "FLUXSERVE_BFL_API_KEY": "nope", "FLUXSERVE_BFL_BASE_URL": upstream}
        )
    offline = await doctor(
        {
            **env,
            "FLUXSERVE_BFL_API_KEY": KEY,
            "FLUXSERVE_BFL_BASE_URL": f"http://127.0.0.1:{free_port()}",
        }
    )
    assert "upstream at Black Forest Labs' API: flux-2-pro, flux-2-pro-edit, flux-2-flex" in works
    assert f"flux-2-pro: bfl - engine = 'bfl': upstream at {upstream}/v1/flux-2-pro" in works
    assert "key: works (1000 credits left" in works
    assert "key: does not work: Upstream refused fluxserve's BFL API key (403)" in wrong
    assert "key: not checked:" in offline and "offline?" in offline
