"""GET /metrics: what each task's end, each request and each scrape shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.engines.base import Engine
from fluxserve.metrics import Metrics
from fluxserve.tasks import TaskStatus

from conftest import Service, make_settings, metric_samples, run_service, serve_asgi

PRO: dict[str, Any] = {"model": "flux-2-pro", "input": {"prompt": "a lantern in the fog"}}


@pytest.fixture
async def service_without_worker(tmp_path: Path) -> AsyncIterator[Service]:
    settings = make_settings(tmp_path / "data", max_attempts=1)
    async with run_service(settings, run_worker=False, in_process=True) as service:
        yield service


async def scrape(service: Service) -> dict[str, float]:
    response = await service.client.get("/metrics")
    assert response.status_code == 200
    return metric_samples(response.text)


async def scrape_until(
    service: Service, shown: Callable[[dict[str, float]], bool], within: float = 10
) -> dict[str, float]:
    """The first scrape that shows what `shown` looks for (the last one, after `within` s)."""
    deadline = time.monotonic() + within
    samples = await scrape(service)
    while not shown(samples) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        samples = await scrape(service)
    return samples


def ended(samples: dict[str, float], model: str, status: str) -> float:
    return samples[f'fluxserve_tasks_ended_total{{model="{model}",status="{status}"}}']


async def test_database_gauges_are_read_at_each_scrape() -> None:
    metrics = Metrics()
    backlog = [3.0]

    async def read_backlog() -> float:
        return backlog[0]

    async def read_depths() -> dict[tuple[str, ...], float]:
        return {("a",): 1.0, ("b",): backlog[0]}

    metrics.gauge("demo_backlog", "Waiting.", read_backlog)
    metrics.gauge("demo_depth", "Per queue.", read_depths, labelnames=("queue",))
    sends = metrics.counter("demo_sends_total", "Sends.", ("kind",))
    sends.labels(kind="x").inc(2)
    first, content_type = await metrics.render(None)
    backlog[0] = 7.0
    second, _ = await metrics.render(None)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert metric_samples(first.decode()) == {
        'demo_sends_total{kind="x"}': 2,
        "demo_backlog": 3,
        'demo_depth{queue="a"}': 1,
        'demo_depth{queue="b"}': 3,
    }
    assert metric_samples(second.decode())["demo_backlog"] == 7
    assert metric_samples(second.decode())['demo_depth{queue="b"}'] == 7


async def test_openmetrics_when_the_scraper_asks_for_it(service_without_worker: Service) -> None:
    response = await service_without_worker.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    assert families["fluxserve_tasks_ended"] == "counter"
    assert families["fluxserve_task_run_seconds"] == "histogram"


async def test_finished_and_failed_tasks_are_counted_and_timed(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    async def missing(_: object) -> Response:
        return Response(status_code=404)

    references = Starlette(routes=[Route("/cat.png", missing)])
    async with (
        serve_asgi(references) as references_url,
        run_service(
            make_settings(tmp_path / "data"), engine=tiny_engine, in_process=True
        ) as service,
    ):
        before = await scrape(service)
        finished = (await service.submit(PRO)).json()["data"]["task_id"]
        edit = {
            "model": "flux-2-pro-edit",
            "input": {"prompt": "the same cat", "image_urls": [f"{references_url}/cat.png"]},
        }
        failed = (await service.submit(edit)).json()["data"]["task_id"]
        assert (await service.wait(finished))["status"] == "finished"
        assert (await service.wait(failed))["status"] == "failed"
        # A task's end is counted once it has committed, which its status can show first.
        after = await scrape_until(
            service,
            lambda s: (
                ended(s, "flux-2-pro", "finished") + ended(s, "flux-2-pro-edit", "failed") >= 2
            ),
        )
    assert ended(before, "flux-2-pro", "finished") == 0, "every label set shows from the start"
    assert ended(after, "flux-2-pro", "finished") == 1
    assert ended(after, "flux-2-pro-edit", "failed") == 1
    assert ended(after, "flux-2-pro", "failed") == 0
    for model in ("flux-2-pro", "flux-2-pro-edit"):
        for histogram in ("task_queue_wait", "task_run", "task"):
            assert after[f'fluxserve_{histogram}_seconds_count{{model="{model}"}}'] == 1
    run = after['fluxserve_task_run_seconds_sum{model="flux-2-pro"}']
    total = after['fluxserve_task_seconds_sum{model="flux-2-pro"}']
    wait = after['fluxserve_task_queue_wait_seconds_sum{model="flux-2-pro"}']
    assert 0 < run <= total and 0 <= wait <= total
    assert abs(wait + run - total) < 1e-6, "queue wait and run time add up to the whole"


async def test_cancels_and_lost_workers_tasks_are_counted_where_they_end(
    service_without_worker: Service,
) -> None:
    service = service_without_worker
    store = service.runtime.store
    cancelled = (await service.submit(PRO)).json()["data"]["task_id"]
    cancel = await service.client.post(f"/api/generate/cancel/{cancelled}", headers=service.auth())
    assert cancel.status_code == 200
    flex = {"model": "flux-2-flex", "input": {"prompt": "a lost worker's task"}}
    lost = (await service.submit(flex)).json()["data"]["task_id"]
    claim = await store.claim_task(["flux-2-flex"], "a-worker-that-dies", lease_seconds=0)
    assert claim is not None and claim.task.task_id == lost
    # The sweeper gives up on it (max_attempts is 1): this call or the process's own.
    while (task := await store.get_task(lost)) is not None and not task.status.terminal:
        await store.requeue_expired(max_attempts=1)
        await asyncio.sleep(0.01)
    assert task is not None and task.status is TaskStatus.FAILED and not task.cancelled
    samples = await scrape(service)
    assert ended(samples, "flux-2-pro", "cancelled") == 1
    assert ended(samples, "flux-2-pro", "failed") == 0
    assert ended(samples, "flux-2-flex", "failed") == 1
    # The cancelled task never started: it counts in the end-to-end time alone.
    assert samples['fluxserve_task_seconds_count{model="flux-2-pro"}'] == 1
    assert samples['fluxserve_task_queue_wait_seconds_count{model="flux-2-pro"}'] == 0
    assert samples['fluxserve_task_run_seconds_count{model="flux-2-flex"}'] == 1


async def test_requests_are_timed_by_route_template_not_path(
    service_without_worker: Service,
) -> None:
    service = service_without_worker
    for _ in range(2):
        missing = await service.status("task-unified-1-missing0")
        assert missing.status_code == 404
    assert (await service.client.get("/no/such/route/task-unified-1-x")).status_code == 404
    assert (await service.client.get("/health")).status_code == 200
    samples = await scrape(service)
    status_route = 'route="/api/generate/status/{task_id}"'
    assert samples[f'fluxserve_http_request_seconds_count{{{status_route},status="404"}}'] == 2
    assert samples['fluxserve_http_request_seconds_count{route="unmatched",status="404"}'] == 1
    assert samples['fluxserve_http_request_seconds_count{route="/health",status="200"}'] == 1
    assert not [name for name in samples if "task-unified" in name or "/no/such" in name]
