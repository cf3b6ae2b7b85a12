"""Callback delivery against real receivers on 127.0.0.1, with schedules shortened by settings.

Each test ends by reading the task's delivery log through
GET /api/generate/callbacks/{task_id}: every event, every attempt. Where the
test is about what happens after a task ends, the worker's part is played
through the store (`submit_ended`), which is where the outbox begins; the
tests of progress events and of dead receivers run the tiny engine.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fluxserve.engines.base import Engine

from conftest import (
    Receiver,
    Service,
    callback_log,
    make_settings,
    metric_samples,
    run_service,
    serve_asgi,
    settled_log,
    submit_ended,
)
from hooked_engine import Hooked

BODY: dict[str, Any] = {"model": "flux-2-pro", "input": {"prompt": "a quiet harbour"}}
CONNECTION_CLOSED = "RemoteProtocolError: Server disconnected without sending a response."


async def submit(service: Service, url: str, **extra: Any) -> str:
    response = await service.submit({**BODY, "callback_url": url, **extra})
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"]["task_id"]
    return task_id


def outcomes(event: dict[str, Any]) -> list[tuple[int | None, str | None]]:
    return [(a["status_code"], a["error"]) for a in event["attempts"]]


@asynccontextmanager
async def raw_receiver(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A bare TCP server on 127.0.0.1 that misbehaves as `handle` says; yields a hook URL."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await handle(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def closed_port() -> tuple[socket.socket, int]:
    """A bound socket that does not listen: connecting to its port is refused."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


async def test_a_failing_receiver_gets_retries_until_it_answers(tmp_path: Path) -> None:
    receiver = Receiver(fail=2, status_code=503)
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(make_settings(tmp_path / "data"), run_worker=False, in_process=True) as service,
    ):
        task_id = await submit_ended(service, f"{hook}/hook")
        log = await settled_log(service, task_id)
        final = await service.status(task_id)
    [event] = log["events"]
    assert event["event_type"] == "finished" and event["state"] == "delivered"
    assert outcomes(event) == [(503, "HTTP 503"), (503, "HTTP 503"), (200, None)]
    assert receiver.attempts == 3
    assert receiver.raw == [final.content]  # the status answer, byte for byte
    assert receiver.headers[0]["webhook-id"] == event["event_id"]
    assert receiver.headers[0]["webhook-event"] == "finished"


async def test_a_hanging_receiver_times_out_each_attempt_then_is_given_up(tmp_path: Path) -> None:
    requests = 0

    async def hang(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        nonlocal requests
        await reader.readuntil(b"\r\n\r\n")
        requests += 1
        await reader.read()  # until fluxserve gives up and closes

    settings = make_settings(
        tmp_path / "data", callback_timeout=0.3, callback_retry_delays=[0.05, 0.05]
    )
    async with (
        raw_receiver(hang) as hook,
        run_service(settings, run_worker=False, in_process=True) as service,
    ):
        task_id = await submit_ended(service, hook)
        log = await settled_log(service, task_id)
    [event] = log["events"]
    assert event["state"] == "failed"
    assert outcomes(event) == [(None, "timed out after 0.3s")] * 3
    assert requests == 3


async def test_a_gone_receiver_is_not_retried(tmp_path: Path) -> None:
    receiver = Receiver(fail=100, status_code=410)
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(make_settings(tmp_path / "data"), run_worker=False, in_process=True) as service,
    ):
        task_id = await submit_ended(service, f"{hook}/hook")
        log = await settled_log(service, task_id)
    [event] = log["events"]
    assert event["state"] == "failed" and event["next_attempt_time"] is None
    assert outcomes(event) == [(410, "HTTP 410")]
    assert receiver.attempts == 1


async def test_a_receiver_that_closes_the_connection_is_retried(tmp_path: Path) -> None:
    requests = 0

    async def close_at_once(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        nonlocal requests
        await reader.readuntil(b"\r\n\r\n")
        requests += 1

    settings = make_settings(tmp_path / "data", callback_retry_delays=[0.05, 0.05])
    async with (
        raw_receiver(close_at_once) as hook,
        run_service(settings, run_worker=False, in_process=True) as service,
    ):
        task_id = await submit_ended(service, hook)
        log = await settled_log(service, task_id)
    [event] = log["events"]
    assert event["state"] == "failed"
    assert outcomes(event) == [(None, CONNECTION_CLOSED)] * 3
    assert requests == 3


async def test_a_receiver_down_across_a_restart_gets_the_event_after_it(tmp_path: Path) -> None:
    # Two quick failures, then a retry due 3 s later: fluxserve stops in between,
    # and the new process on the same data folder makes that retry.
    settings = make_settings(
        tmp_path / "data", callback_timeout=1.0, callback_retry_delays=[0.05, 3.0]
    )
    down, port = closed_port()
    receiver = Receiver()
    with down:
        async with run_service(settings, run_worker=False, in_process=True) as first:
            key = first.key
            task_id = await submit_ended(first, f"http://127.0.0.1:{port}/hook")
            await settled_log(
                first,
                task_id,
                until=lambda log: any(len(e["attempts"]) >= 2 for e in log["events"]),
            )
    async with (
        serve_asgi(receiver.app(), port=port),
        run_service(settings, run_worker=False, in_process=True) as second,
    ):
        log = await settled_log(second, task_id, key=key)
        final = (await second.status(task_id, key=key)).json()
    [event] = log["events"]
    assert event["state"] == "delivered"
    [(_, first_error), (_, second_error), last] = outcomes(event)
    assert first_error and second_error and first_error.startswith("ConnectError")
    assert first_error == second_error
    assert last == (200, None)
    assert receiver.bodies == [final]
    assert receiver.headers[0]["webhook-id"] == event["event_id"]


async def test_retry_after_is_honoured(tmp_path: Path) -> None:
    arrivals: list[float] = []

    async def busy_once(_: Request) -> Response:
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return Response(status_code=429, headers={"Retry-After": "1"})
        return JSONResponse({})

    settings = make_settings(tmp_path / "data", callback_retry_delays=[0.05, 5.0])
    receiver = Starlette(routes=[Route("/hook", busy_once, methods=["POST"])])
    async with (
        serve_asgi(receiver) as hook,
        run_service(settings, run_worker=False, in_process=True) as service,
    ):
        task_id = await submit_ended(service, f"{hook}/hook")
        log = await settled_log(service, task_id)
    [event] = log["events"]
    assert outcomes(event) == [(429, "HTTP 429"), (200, None)]
    # A lower bound only: the retry cannot come before the receiver's time.
    assert arrivals[1] - arrivals[0] >= 0.95


async def test_a_callback_host_that_resolves_to_a_private_address_is_refused(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    settings = make_settings(
        tmp_path / "data", allow_private_networks=False, allow_http_callbacks=True
    )
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(settings, run_worker=False, in_process=True) as service,
    ):
        # "localhost" passes the syntactic check at submit; its address does not.
        port = hook.rsplit(":", 1)[1]
        task_id = await submit_ended(service, f"http://localhost:{port}/hook")
        log = await settled_log(service, task_id)
    [event] = log["events"]
    assert event["state"] == "failed"
    [(status_code, error)] = outcomes(event)
    assert status_code is None and error is not None
    assert error.startswith("refused: host 'localhost' resolves to ")
    assert error.endswith("a loopback address, and private networks are not allowed")
    assert receiver.attempts == 0


@pytest.mark.parametrize(
    ("overrides", "url", "accepted"),
    [
        ({}, "https://hooks.example.com/in", True),
        ({}, "http://hooks.example.com/in", False),
        ({"allow_http_callbacks": True}, "http://hooks.example.com/in", True),
    ],
)
async def test_callback_urls_are_https_unless_http_is_allowed(
    tmp_path: Path, overrides: dict[str, Any], url: str, accepted: bool
) -> None:
    settings = make_settings(tmp_path / "data", allow_private_networks=False, **overrides)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        response = await service.submit({**BODY, "callback_url": url})
    if accepted:
        assert response.status_code == 200
    else:
        assert response.status_code == 400
        assert response.json()["error"]["message"] == (
            f"callback_url is not allowed: URL scheme 'http' is not allowed (allowed: https): {url}"
        )


async def test_dead_receivers_hold_up_neither_tasks_nor_status_nor_a_healthy_receiver(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    async def hang(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await reader.read()

    # The worker serves flux-2-pro only; the flex tasks whose receivers are dead
    # or hang are ended through the store, all at once, to make a retry storm.
    settings = make_settings(
        tmp_path / "data", callback_timeout=1.0, callback_retry_delays=[0.05] * 50
    )
    healthy = Receiver()
    down, port = closed_port()
    with down:
        async with (
            raw_receiver(hang) as hanging,
            serve_asgi(healthy.app()) as good,
            run_service(
                settings, engine=tiny_engine, models=["flux-2-pro"], in_process=True
            ) as service,
        ):
            storm = [
                await submit_ended(service, url, model="flux-2-flex")
                for url in [f"http://127.0.0.1:{port}/hook"] * 12 + [hanging] * 8
            ]
            fine = await submit(service, f"{good}/hook")
            assert (await service.wait(fine))["status"] == "finished"
            await healthy.wait_for(1)
            [delivered] = (await settled_log(service, fine))["events"]
            answers = [(await service.status(task_id)).status_code for task_id in storm]
            retrying = [await callback_log(service, task_id) for task_id in storm]
    assert [body["data"]["task_id"] for body in healthy.bodies] == [fine]
    assert outcomes(delivered) == [(200, None)]
    assert answers == [200] * len(storm)
    # Meanwhile the dead receivers were tried and tried again; the hanging
    # one holds at most callback_concurrency_per_receiver slots at a time.
    assert all(log["events"][0]["state"] != "delivered" for log in retrying)
    assert all(len(log["events"][0]["attempts"]) > 1 for log in retrying[:12])


async def test_a_slow_receiver_holds_no_more_than_its_share_of_slots(tmp_path: Path) -> None:
    open_now = most_open = 0

    async def hang(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        nonlocal open_now, most_open
        open_now += 1
        most_open = max(most_open, open_now)
        try:
            await reader.read()
        finally:
            open_now -= 1

    settings = make_settings(
        tmp_path / "data",
        callback_timeout=0.5,
        callback_retry_delays=[0.05],
        callback_concurrency=4,
        callback_concurrency_per_receiver=2,
    )
    healthy = Receiver()
    async with (
        raw_receiver(hang) as hanging,
        serve_asgi(healthy.app()) as good,
        run_service(settings, run_worker=False, in_process=True) as service,
    ):
        slow = [await submit_ended(service, hanging) for _ in range(6)]
        fine = await submit_ended(service, f"{good}/hook")
        [delivered] = (await settled_log(service, fine))["events"]
        logs = [await settled_log(service, task_id) for task_id in slow]
    assert outcomes(delivered) == [(200, None)]
    assert most_open == 2
    assert all(outcomes(log["events"][0]) == [(None, "timed out after 0.5s")] * 2 for log in logs)


def slow_tiny(inner: Engine, step_seconds: float) -> Hooked:
    """The tiny engine with each denoising step slowed, so a task runs for seconds."""
    return Hooked(inner, lambda *_: time.sleep(step_seconds))


async def test_progress_events_are_sent_when_asked_for(tmp_path: Path, tiny_engine: Engine) -> None:
    receiver = Receiver()
    settings = make_settings(tmp_path / "data")
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(settings, engine=slow_tiny(tiny_engine, 0.4), in_process=True) as service,
    ):
        task_id = await submit(
            service, f"{hook}/hook", callback_events=["running", "progress", "finished"]
        )
        await service.wait(task_id)
        # Settled, and every POST the receiver saw is in the log (a best-effort
        # event is logged once its one attempt is over).
        log = await settled_log(
            service,
            task_id,
            until=lambda log: (
                len(log["events"]) == receiver.attempts
                and all(e["state"] == "delivered" for e in log["events"])
            ),
        )
        final = (await service.status(task_id)).json()
    kinds = [headers["webhook-event"] for headers in receiver.headers]
    assert kinds[0] == "running" and kinds.count("running") == 1
    assert kinds.count("finished") == 1 and "progress" in kinds and "failed" not in kinds
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for kind, body in zip(kinds, receiver.bodies, strict=True):
        by_kind.setdefault(kind, []).append(body["data"])
    [running] = by_kind["running"]
    assert running["status"] == "running" and running["progress"] == 0
    progress = [data["progress"] for data in by_kind["progress"]]
    assert all(data["status"] == "running" for data in by_kind["progress"])
    assert progress == sorted(set(progress)) and progress[0] > 0 and progress[-1] < 100
    assert by_kind["finished"] == [final["data"]]
    # Every event, best effort or not, is in the log with its one attempt.
    assert sorted(e["event_type"] for e in log["events"]) == sorted(kinds)
    assert all(outcomes(e) == [(200, None)] for e in log["events"])
    ids = [headers["webhook-id"] for headers in receiver.headers]
    assert len(set(ids)) == len(ids)


async def test_redelivery_sends_the_same_event_again(tmp_path: Path) -> None:
    receiver = Receiver(fail=1, status_code=410)
    async with (
        serve_asgi(receiver.app()) as hook,
        run_service(make_settings(tmp_path / "data"), run_worker=False, in_process=True) as service,
    ):
        task_id = await submit_ended(service, f"{hook}/hook")
        [gone] = (await settled_log(service, task_id))["events"]
        assert gone["state"] == "failed"
        for deliveries in (1, 2):
            response = await service.client.post(
                f"/api/generate/callbacks/{task_id}/redeliver", headers=service.auth()
            )
            assert response.status_code == 200, response.text
            again = response.json()["data"]
            assert again["event_id"] == gone["event_id"]
            assert again["state"] in ("pending", "sending", "delivered")
            await receiver.wait_for(deliveries)
            log = await settled_log(service, task_id)
    [event] = log["events"]
    assert event["state"] == "delivered"
    assert outcomes(event) == [(410, "HTTP 410"), (200, None), (200, None)]
    assert [h["webhook-id"] for h in receiver.headers] == [event["event_id"]] * 2


async def test_the_callback_routes_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        queued = await submit(service, "http://127.0.0.1:9/hook")
        plain = (await service.submit(BODY)).json()["data"]["task_id"]
        other = await service.new_key()

        async def call(method: str, path: str, key: str | None = None) -> tuple[int, str]:
            response = await service.client.request(method, path, headers=service.auth(key))
            body = response.json()
            return response.status_code, body.get("error", {}).get("message", "")

        redeliver = "/api/generate/callbacks/{}/redeliver"
        assert await call("POST", redeliver.format(queued)) == (
            409,
            f"Task {queued} is not_started; "
            "only a finished or failed task's callback can be redelivered",
        )
        assert await call("POST", redeliver.format(plain)) == (
            409,
            f"Task {plain} has no callback_url to deliver to",
        )
        for method, path in (
            ("GET", f"/api/generate/callbacks/{queued}"),
            ("POST", redeliver.format(queued)),
        ):
            assert await call(method, path, key=other) == (403, "Task belongs to another user")
            missing = path.replace(queued, "task-unified-1-missing0")
            assert (await call(method, missing))[0] == 404
        log = await callback_log(service, queued)
    assert log == {
        "task_id": queued,
        "callback_url": "http://127.0.0.1:9/hook",
        "callback_events": ["finished", "failed"],
        "events": [],
    }


async def test_delivery_metrics(tmp_path: Path) -> None:
    flaky, gone = Receiver(fail=1, status_code=503), Receiver(fail=100, status_code=410)
    async with (
        serve_asgi(flaky.app()) as flaky_url,
        serve_asgi(gone.app()) as gone_url,
        run_service(make_settings(tmp_path / "data"), run_worker=False, in_process=True) as service,
    ):
        for url in (f"{flaky_url}/hook", f"{gone_url}/hook"):
            await settled_log(service, await submit_ended(service, url))
        response = await service.client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = set(response.text.splitlines())
    for line in (
        "# TYPE fluxserve_webhook_attempts_total counter",
        "# TYPE fluxserve_webhook_pending gauge",
        "# TYPE fluxserve_webhook_attempt_seconds histogram",
    ):
        assert line in lines, response.text
    samples = metric_samples(response.text)
    assert {
        name: samples[name]
        for name in (
            'fluxserve_webhook_attempts_total{event="finished"}',
            'fluxserve_webhook_delivered_total{event="finished"}',
            'fluxserve_webhook_failed_total{event="finished"}',
            'fluxserve_webhook_dropped_total{event="progress"}',
            "fluxserve_webhook_pending",
            # Each attempt by what came of it: flaky's 503 then 2xx, gone's final 410.
            'fluxserve_webhook_attempt_seconds_count{event="finished",outcome="2xx"}',
            'fluxserve_webhook_attempt_seconds_count{event="finished",outcome="4xx"}',
            'fluxserve_webhook_attempt_seconds_count{event="finished",outcome="5xx"}',
        )
    } == {
        'fluxserve_webhook_attempts_total{event="finished"}': 3,
        'fluxserve_webhook_delivered_total{event="finished"}': 1,
        'fluxserve_webhook_failed_total{event="finished"}': 1,
        'fluxserve_webhook_dropped_total{event="progress"}': 0,
        "fluxserve_webhook_pending": 0,
        'fluxserve_webhook_attempt_seconds_count{event="finished",outcome="2xx"}': 1,
        'fluxserve_webhook_attempt_seconds_count{event="finished",outcome="4xx"}': 1,
        'fluxserve_webhook_attempt_seconds_count{event="finished",outcome="5xx"}': 1,
    }
