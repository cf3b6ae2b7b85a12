"""/health and /ready: liveness without the database, readiness with every reason."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import asyncpg
import httpx
import pytest

from fluxserve.engines.base import Engine
from fluxserve.runtime import Runtime

from conftest import POSTGRES_ADMIN_URL, make_settings, run_service


async def until_ready(client: httpx.AsyncClient) -> httpx.Response:
    """/ready's answer once it is 200."""
    async with asyncio.timeout(60):
        while True:
            response = await client.get("/ready")
            if response.status_code == 200:
                return response
            await asyncio.sleep(0.05)


async def test_a_database_refusing_connections_makes_the_process_not_ready_but_alive(
    tmp_path: Path, postgres_url: str
) -> None:
    settings = make_settings(tmp_path / "data", database_url=postgres_url)
    name = postgres_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        async with run_service(settings, run_worker=False, in_process=True) as service:
            assert (await service.client.get("/ready")).status_code == 200
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            down = await service.client.get("/ready")
            alive = await service.client.get("/health")
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            back = await service.client.get("/ready")
    finally:
        await admin.close()
    assert down.status_code == 503
    [reason] = down.json()["reasons"]
    assert reason.startswith("database ") and "not currently accepting connections" in reason
    assert down.json()["queue"] is None
    assert alive.status_code == 200 and alive.json() == {"status": "ok", "worker": None}
    assert back.status_code == 200 and back.json()["reasons"] == []


async def test_a_schema_behind_the_code_makes_the_process_not_ready(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    async with run_service(settings, run_worker=False, in_process=True) as service:
        head = service.runtime.store.schema_head()
        with sqlite3.connect(tmp_path / "data" / "fluxserve.db") as conn:
            conn.execute("UPDATE alembic_version SET version_num = '0003'")
        response = await service.client.get("/ready")
    assert response.status_code == 503
    assert response.json()["schema"] == {"database": "0003", "code": head}
    [reason] = response.json()["reasons"]
    assert reason.startswith(f"database schema is at migration 0003, this version needs {head}")


async def test_an_api_process_is_ready_only_while_a_live_worker_serves_its_models(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    settings = make_settings(tmp_path / "data", ready_requires_models=["flux-2-pro"])
    async with run_service(settings, run_worker=False, in_process=True) as service:
        alone = await service.client.get("/ready")
        # A worker process of its own, on the same database.
        worker = Runtime(settings, models=["flux-2-pro"], engine=tiny_engine)
        await worker.start()
        try:
            served = await until_ready(service.client)
        finally:
            await worker.stop()
        gone = await service.client.get("/ready")
    assert alone.status_code == 503
    assert alone.json()["reasons"] == ["no live worker serves flux-2-pro"]
    assert [w["models"] for w in served.json()["workers"]] == [["flux-2-pro"]]
    assert gone.status_code == 503
    assert gone.json()["reasons"] == ["no live worker serves flux-2-pro"]


async def test_a_worker_loop_that_ends_outside_a_task_is_logged_and_not_ready(
    tmp_path: Path, postgres_url: str, tiny_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL)
    # A long lease: the sweeper, which would fail on the same table, waits half of
    # one between rounds, so the worker's loop is what ends.
    settings = make_settings(tmp_path / "data", database_url=postgres_url, lease_seconds=600)
    async with run_service(settings, engine=tiny_engine, in_process=True) as service:
        await until_ready(service.client)
        # Claims now fail with an error that is no outage: the loop ends.
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute("ALTER TABLE tasks RENAME TO tasks_elsewhere")
        finally:
            await conn.close()
        await service.runtime.wait_for_failure()
        health = await service.client.get("/health")
        ready = await service.client.get("/ready")
    failure = service.runtime.failure
    assert failure is not None
    assert health.status_code == 503 and health.json()["reason"] == failure
    assert ready.status_code == 503 and failure in ready.json()["reasons"]
    worker = ready.json()["worker"]
    assert worker["state"] == "defunct"
    assert worker["error"].startswith("worker loop ended: UndefinedTableError: ")
    assert 'relation "tasks" does not exist' in worker["error"]
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any('relation "tasks" does not exist' in message for message in critical), critical
