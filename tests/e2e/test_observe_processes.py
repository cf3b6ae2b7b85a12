"""The real `fluxserve` processes as an operator observes them: JSON log lines,
and the metrics of several processes added up."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import metric_samples
from test_processes import Api, env, fluxserve, free_port, server

pytestmark = pytest.mark.slow
__all__ = ["env"]  # the fixture, used by name


def json_lines(log: Path) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be one JSON object."""
    entries = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= set(entry)
        entries.append(entry)
    return entries


def wait_for_line(log: Path, *words: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not any(all(w in line for w in words) for line in log.read_text().splitlines()):
        assert time.monotonic() < deadline, f"no line with {words}:\n{log.read_text()}"
        time.sleep(0.1)


def test_json_logs_put_each_line_in_json_with_its_task(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "FLUXSERVE_LOG_FORMAT": "json", "FLUXSERVE_ALLOW_PRIVATE_NETWORKS": "true"}
    secret = fluxserve("keys", "create", "--name", "me", env=env).stdout.split()[-1]
    api = Api(env, secret)
    log = tmp_path / "serve.log"
    nobody = f"http://127.0.0.1:{free_port()}/hook"  # refuses: each attempt logs a warning
    with server(env, log) as process:
        response = httpx.post(
            api.base + "/api/generate/submit",
            json={"model": "flux-2-pro", "callback_url": nobody, "input": {"prompt": "a quay"}},
            headers=api.headers,
        )
        finished = response.json()["data"]["task_id"]
        cancelled = api.submit()
        assert httpx.post(f"{api.base}/api/generate/cancel/{cancelled}", headers=api.headers)
        assert api.wait(finished, ("finished",))["status"] == "finished"
        assert httpx.get(api.base + "/no/such/route").status_code == 404
        wait_for_line(log, "callback", "failed", finished)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    entries = json_lines(log)
    messages = [entry["message"] for entry in entries]
    assert "Application startup complete." in messages and "Shutting down" in messages
    assert any(m.startswith("WARNING: engine") for m in messages), "tiny's warning too"
    about = [entry for entry in entries if entry.get("task_id") == finished]
    access = [entry for entry in about if entry["logger"] == "uvicorn.access"]
    assert {(a["method"], a["path"].split("?")[0], a["status_code"]) for a in access} == {
        ("POST", "/api/generate/submit", 200),
        ("GET", f"/api/generate/status/{finished}", 200),
    }
    assert [e for e in about if e["logger"].startswith("fluxserve.webhooks")], "its callbacks"
    cancels = [e for e in entries if e.get("path") == f"/api/generate/cancel/{cancelled}"]
    assert [e["task_id"] for e in cancels] == [cancelled]
    for entry in entries:
        for task_id in (finished, cancelled):
            if task_id in entry["message"]:
                assert entry.get("task_id") == task_id or task_id in entry.get("task_ids", ())
    unmatched = [e for e in entries if e.get("path") == "/no/such/route"]
    assert [e["status_code"] for e in unmatched] == [404] and "task_id" not in unmatched[0]


def test_text_logs_stay_readable_by_default(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "api.log"
    with server(env, log, command="api"):
        assert httpx.get(f"http://127.0.0.1:{env['FLUXSERVE_PORT']}/health").status_code == 200
    written = log.read_text()
    assert '"GET /health HTTP/1.1" 200' in written
    assert not any(line.startswith("{") for line in written.splitlines())


def test_api_processes_add_up_their_metrics_in_multiprocess_mode(
    env: dict[str, str], tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    first = {**env, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    second = {**first, "FLUXSERVE_PORT": str(free_port())}
    secret = fluxserve("keys", "create", "--name", "me", env=first).stdout.split()[-1]
    samples = []
    with (
        server(first, tmp_path / "first.log", command="api"),
        server(second, tmp_path / "second.log", command="api"),
    ):
        for process_env in (first, second):
            api = Api(process_env, secret)
            task_id = api.submit()
            cancel = httpx.post(f"{api.base}/api/generate/cancel/{task_id}", headers=api.headers)
            assert cancel.status_code == 200
        for process_env in (first, second):
            metrics = httpx.get(f"http://127.0.0.1:{process_env['FLUXSERVE_PORT']}/metrics")
            samples.append(metric_samples(metrics.text))
    submits = 'fluxserve_http_request_seconds_count{route="/api/generate/submit",status="200"}'
    cancelled = 'fluxserve_tasks_ended_total{model="flux-2-pro",status="cancelled"}'
    for scraped in samples:
        assert (scraped[submits], scraped[cancelled]) == (2, 2)
        assert scraped["fluxserve_workers_alive"] == 0  # the database's, read by either


def test_a_worker_serves_its_metrics_on_metrics_port(env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = {**env, "FLUXSERVE_TINY_STEPS": "1"}  # the worker's one task, quickly
    secret = fluxserve("keys", "create", "--name", "me", env=env).stdout.split()[-1]
    api = Api(env, secret)
    with (
        server(env, tmp_path / "api.log", command="api"),
        (tmp_path / "worker.log").open("ab") as out,
        subprocess.Popen(
            [sys.executable, "-m", "fluxserve", "worker"],
            env={**env, "FLUXSERVE_METRICS_PORT": str(port)},
            stdout=out,
            stderr=out,
        ) as worker,
    ):
        try:
            task_id = api.submit()
            assert api.wait(task_id, ("finished", "failed"))["status"] == "finished"
            metrics = metric_samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        finally:
            worker.send_signal(signal.SIGTERM)
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()
    assert metrics['fluxserve_tasks_ended_total{model="flux-2-pro",status="finished"}'] == 1
    assert metrics['fluxserve_task_run_seconds_count{model="flux-2-pro"}'] == 1
