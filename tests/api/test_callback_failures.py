"""Callback attempts that fail in ways outside the usual errors still end as failed
attempts on the schedule: no event is left `sending`, redelivery works, and the
pending gauge drains. With the system's real resolver and a real receiver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conftest import Service, make_settings, run_service, serve_asgi, settled_log, submit_ended


async def pending_gauge(service: Service) -> float:
    """fluxserve_webhook_pending: events in the outbox not yet delivered or given up."""
    metrics = (await service.client.get("/metrics")).text
    [line] = [line for line in metrics.splitlines() if line.startswith("fluxserve_webhook_pending")]
    return float(line.split()[-1])


def outcomes(event: dict[str, Any]) -> list[tuple[int | None, str | None]]:
    return [(attempt["status_code"], attempt["error"]) for attempt in event["attempts"]]


async def test_a_host_the_resolver_refuses_fails_on_the_schedule(tmp_path: Path) -> None:
    """`a..b` has an empty label: the resolver's IDNA codec raises UnicodeError, not
    a resolution error. Each try is a failed attempt; then the event is given up."""
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        task_id = await submit_ended(service, "http://a..b/cb")
        log = await settled_log(service, task_id)
        [event] = log["events"]
        assert event["state"] == "failed"
        assert len(event["attempts"]) == 4  # the first and the schedule's three retries
        for status_code, error in outcomes(event):
            assert status_code is None
            assert error is not None and "could not resolve host 'a..b'" in error
        assert await pending_gauge(service) == 0

        redelivered = await service.client.post(
            f"/api/generate/callbacks/{task_id}/redeliver", headers=service.auth()
        )
        assert redelivered.status_code == 200, redelivered.text
        again = await settled_log(
            service, task_id, until=lambda log: len(log["events"][0]["attempts"]) == 8
        )
        assert again["events"][0]["state"] == "failed"
        assert await pending_gauge(service) == 0


async def test_a_retry_after_of_non_ascii_digits_is_ignored(tmp_path: Path) -> None:
    """`Retry-After: ²` passes str.isdigit but not float(): the 503 is retried on the
    schedule as if the header were absent, and the next try is delivered."""
    answers: list[int] = []

    async def hook(request: Request) -> Response:
        await request.body()
        if not answers:
            answers.append(503)
            return Response(status_code=503, headers={"Retry-After": "²"})
        answers.append(200)
        return JSONResponse({"ok": True})

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with (
        serve_asgi(receiver) as origin,
        run_service(make_settings(tmp_path / "data"), run_worker=False, in_process=True) as service,
    ):
        task_id = await submit_ended(service, f"{origin}/hook")
        log = await settled_log(service, task_id)
        gauge = await pending_gauge(service)
    [event] = log["events"]
    assert event["state"] == "delivered"
    assert outcomes(event) == [(503, "HTTP 503"), (200, None)]
    assert answers == [503, 200]
    assert gauge == 0
