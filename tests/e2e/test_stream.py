"""GET /api/generate/stream/{task_id}: live progress as server-sent events, on a real
server; and on a `fluxserve api` process that follows a `fluxserve worker` process,
where the changes reach the stream by NOTIFY (PostgreSQL) or the commit counter (SQLite)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse

from fluxserve.engines.base import Engine
from fluxserve.settings import Settings

from conftest import Paused, Service, fresh_postgres_database, make_settings, run_service, until

PROMPT = {"prompt": "a lighthouse at dawn"}


@pytest.fixture(params=["sqlite", "postgresql"])
async def settings_on_each_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Settings]:
    async with AsyncExitStack() as stack:
        overrides = {}
        if request.param == "postgresql":
            url = await stack.enter_async_context(fresh_postgres_database())
            overrides["database_url"] = url
        yield make_settings(tmp_path / "data", **overrides)


def stream_url(task_id: str) -> str:
    return f"/api/generate/stream/{task_id}"


async def submit(service: Service, model: str = "flux-2-pro", **inputs: Any) -> str:
    response = await service.submit({"model": model, "input": {**PROMPT, **inputs}})
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"]["task_id"]
    return task_id


async def events_of(source: EventSource) -> AsyncIterator[ServerSentEvent]:
    """The stream's events. httpx-sse reports a heartbeat (a comment line) that follows
    an event with an id as an empty `message` event, which the server never sends."""
    async for event in source.aiter_sse():
        if event.event != "message" or event.data:
            yield event


def progress_of(event: ServerSentEvent) -> int:
    value: int = json.loads(event.data)["data"]["progress"]
    return value


async def test_events_follow_a_real_task_in_order_and_end_with_the_status_body(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    # A worker in another process, on either store, is the last test here.
    engine = Paused(tiny_engine)
    async with run_service(make_settings(tmp_path / "data"), engine=engine) as service:
        task_id = await submit(service, "flux-2-flex", steps=3)
        events: list[ServerSentEvent] = []
        async with aconnect_sse(
            service.client, "GET", stream_url(task_id), headers=service.auth()
        ) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            async for event in events_of(source):
                events.append(event)
                if event.event == "progress" and progress_of(event) > 0:
                    engine.go.set()  # the first step's progress arrived: run the rest
        final = await service.status(task_id)

    names = [event.event for event in events]
    assert names[0] == "status" and names[-1] == "finished", names
    assert set(names[1:-1]) == {"progress"}, names
    for event in events:
        body = json.loads(event.data)
        assert body["code"] == 200 and body["data"]["task_id"] == task_id
        assert event.id == f"{body['data']['status']}.{body['data']['progress']}"
    progress = [progress_of(event) for event in events]
    assert progress == sorted(progress) and progress[-1] == 100
    ids = [event.id for event in events]
    assert len(set(ids)) == len(ids), ids
    # The last event's data is what GET status answers, byte for byte.
    assert events[-1].data.encode() == final.content
    assert json.loads(final.content)["data"]["status"] == "finished"


async def test_an_ended_task_gets_its_terminal_event_alone(tmp_path: Path) -> None:
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        task_id = await submit(service)
        await service.client.post(f"/api/generate/cancel/{task_id}", headers=service.auth())
        async with aconnect_sse(
            service.client, "GET", stream_url(task_id), headers=service.auth()
        ) as source:
            events = [event async for event in events_of(source)]
        final = await service.status(task_id)
    # The stream ended by itself after its one event.
    assert [event.event for event in events] == ["failed"]
    assert events[0].id == "failed.0"
    assert events[0].data.encode() == final.content
    assert json.loads(final.content)["data"]["cancelled"] is True


async def test_a_stream_refuses_as_status_does(tmp_path: Path) -> None:
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        task_id = await submit(service)
        other = await service.new_key("other")
        cases = {
            401: {},
            404: service.auth(),
            403: service.auth(other),
        }
        for status, headers in cases.items():
            target = "task-unified-1-missing0" if status == 404 else task_id
            response = await service.client.get(stream_url(target), headers=headers)
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/json"
            assert response.json()["code"] == status
            assert response.json()["error"]["type"] in (
                "authentication_error",
                "not_found_error",
                "permission_error",
            )
        bad_key = await service.client.get(
            stream_url(task_id), headers={"Authorization": "Bearer fsk_wrong"}
        )
        assert bad_key.status_code == 401
        assert service.runtime.feed.streams == 0


async def next_event(events: AsyncIterator[ServerSentEvent]) -> ServerSentEvent:
    return await anext(events)


async def test_last_event_id_resumes_without_repeating(settings_on_each_store: Settings) -> None:
    async with run_service(settings_on_each_store, run_worker=False) as service:
        task_id = await submit(service)
        store = service.runtime.store
        async with aconnect_sse(
            service.client, "GET", stream_url(task_id), headers=service.auth()
        ) as source:
            first = await next_event(events_of(source))
        assert (first.event, first.id) == ("status", "not_started.0")

        # The same state: nothing is sent again, only what changes next.
        headers = {**service.auth(), "Last-Event-ID": first.id}
        async with aconnect_sse(
            service.client, "GET", stream_url(task_id), headers=headers
        ) as source:
            events = events_of(source)
            claim = await store.claim_task(["flux-2-pro"], "test-worker", 30)
            assert claim is not None
            resumed = await next_event(events)
            assert (resumed.event, resumed.id) == ("progress", "running.0")
            await store.report_progress(claim, 40, 30)
            moved = await next_event(events)
            assert (moved.event, moved.id) == ("progress", "running.40")

        # Ended meanwhile: the terminal event at once, and the end.
        await store.fail_task(claim, "out of luck")
        headers = {**service.auth(), "Last-Event-ID": "running.40"}
        async with aconnect_sse(
            service.client, "GET", stream_url(task_id), headers=headers
        ) as source:
            events_after = [event async for event in events_of(source)]
        assert [(e.event, e.id) for e in events_after] == [("failed", "failed.40")]
        assert json.loads(events_after[0].data)["data"]["error_message"] == "out of luck"

        # Having seen the end: 204, which tells an EventSource to stop reconnecting.
        headers = {**service.auth(), "Last-Event-ID": "failed.40"}
        seen_all = await service.client.get(stream_url(task_id), headers=headers)
        assert seen_all.status_code == 204 and seen_all.content == b""
        assert service.runtime.feed.streams == 0


async def test_heartbeats_keep_an_idle_stream_alive(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", stream_heartbeat=0.1)
    async with run_service(settings, run_worker=False) as service:
        task_id = await submit(service)
        lines = []
        async with service.client.stream(
            "GET", stream_url(task_id), headers=service.auth()
        ) as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith(":"):
                    break
    assert lines[0] == "id: not_started.0" and lines[1] == "event: status"
    assert lines[-1].startswith(": ping")


async def test_a_client_that_goes_away_releases_its_subscription(tmp_path: Path) -> None:
    async with run_service(make_settings(tmp_path / "data"), run_worker=False) as service:
        task_id = await submit(service)
        feed = service.runtime.feed
        async with (
            httpx.AsyncClient(base_url=service.url, timeout=30) as client,
            aconnect_sse(client, "GET", stream_url(task_id), headers=service.auth()) as source,
        ):
            await next_event(events_of(source))
            assert feed.streams == 1
        # The connection is closed: the server sees it and lets the task go.
        await until(lambda: feed.streams == 0)


async def test_many_streams_on_one_task_cost_one_read_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_service(make_settings(tmp_path / "data"), run_worker=False) as service:
        task_id = await submit(service)
        store = service.runtime.store
        reads = 0
        read = store.get_task_and_position

        async def counted(task: str) -> Any:
            nonlocal reads
            reads += 1
            return await read(task)

        monkeypatch.setattr(store, "get_task_and_position", counted)
        async with AsyncExitStack() as stack:
            sources = [
                await stack.enter_async_context(
                    aconnect_sse(service.client, "GET", stream_url(task_id), headers=service.auth())
                )
                for _ in range(20)
            ]
            streams = [events_of(source) for source in sources]
            for events in streams:
                assert (await next_event(events)).event == "status"
            assert reads == 20  # each stream's own first read, which checks its key
            claim = await store.claim_task(["flux-2-pro"], "test-worker", 30)
            assert claim is not None
            for step in (0, 10, 20, 30):
                if step:
                    await store.report_progress(claim, step, 30)
                seen = [await next_event(events) for events in streams]
                assert {event.id for event in seen} == {f"running.{step}"}, seen
        # The claim and three steps: each read once for all 20 streams (a change
        # arriving while its read runs may cost one more).
        assert 20 + 4 <= reads <= 20 + 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def process(*args: str, env: dict[str, str], log: Path) -> AsyncIterator[None]:
    """`fluxserve ARGS` as a child process, killed at the end."""
    with log.open("ab") as out:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fluxserve", *args, env=env, stdout=out, stderr=out
        )
    try:
        yield
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


async def until_healthy(base: str) -> None:
    async with asyncio.timeout(90), httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(base + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


# --- separate processes --------------------------------------------------------------


@pytest.mark.slow
async def test_a_stream_on_an_api_process_follows_a_worker_process(
    settings_on_each_store: Settings, tmp_path: Path
) -> None:
    # On SQLite the api process sees the worker's commits by the commit counter.
    port = free_port()
    env = {
        **os.environ,
        "FLUXSERVE_DATA_DIR": str(tmp_path / "data"),
        "FLUXSERVE_DATABASE_URL": settings_on_each_store.resolved_database_url,
        "FLUXSERVE_PORT": str(port),
        "FLUXSERVE_ENGINE": "tiny",
        "FLUXSERVE_POLL_INTERVAL": "0.2",
    }
    created = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fluxserve", "keys", "create", "--name", "me",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    key = (await created.communicate())[0].decode().split()[-1]
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "processes.log"
    auth = {"Authorization": f"Bearer {key}"}
    async with (
        process("api", env=env, log=log),
        httpx.AsyncClient(base_url=base, headers=auth, timeout=60) as client,
    ):
        await until_healthy(base)
        submitted = await client.post(
            "/api/generate/submit",
            json={"model": "flux-2-flex", "input": {"prompt": "a fox", "steps": 2}},
        )
        task_id = submitted.json()["data"]["task_id"]
        events = []
        async with aconnect_sse(client, "GET", f"/api/generate/stream/{task_id}") as source:
            stream = events_of(source)
            events.append(await anext(stream))  # queued: no worker runs yet
            async with process("worker", env=env, log=log):
                events += [event async for event in stream]
                final = await client.get(f"/api/generate/status/{task_id}")

    names = [(event.event, event.id) for event in events]
    assert names[0] == ("status", "not_started.0"), log.read_text()
    assert names[-1] == ("finished", "finished.100"), names
    assert ("progress", "running.0") in names and len(names) >= 4, names
    assert events[-1].data.encode() == final.content
    assert json.loads(final.content)["data"]["engine"] == "tiny"
