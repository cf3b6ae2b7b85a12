"""The OpenAPI document tells the truth: schemathesis drives every operation of the
real app, on a real store, with a real key, and checks each answer against it."""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import schemathesis
from PIL import Image
from schemathesis.engine import events

from fluxserve.accounts import create_key
from fluxserve.api.app import create_app
from fluxserve.bfl_models import BFL_PATHS
from fluxserve.runtime import Runtime
from fluxserve.store import open_store

from conftest import fresh_postgres_database, make_settings, run_service, submit_ended

EXAMPLES = 10
# One seed: the run is the same each time, so a pass does not depend on whether
# ten random requests happen to include one that answers 200 (a new finding comes
# with a change to the app or its document, not with a new draw).
SEED = 20261128
# Every operation that needs neither a stored file nor a real image.
ANSWERED = {
    "POST /api/generate/submit",
    "GET /api/generate/status/{task_id}",
    "POST /api/generate/cancel/{task_id}",
    "GET /api/generate/tasks",
    "GET /api/generate/callbacks/{task_id}",
    "GET /api/user/balance",
    "GET /api/webhooks/secret",
    "POST /api/webhooks/secret/rotate",
    "GET /health",
    "GET /metrics",
    "GET /v1/get_result",
}
# Black Forest Labs' submits: schemathesis sends its own `x-key` to most of them,
# so only some answer 200 within the examples; at least one must.
BFL_SUBMITS = {f"POST /v1/{path}" for path in BFL_PATHS}
# Where a request that fits the document can still be refused, with a 400 naming
# the field, for what no schema can say: an upload must hold an image (or a URL
# that serves one), a cursor must be one the server gave out, a URL must pass the
# net guard, a data: reference must be an image FLUX.2 can use.
SEMANTIC = {"expected-statuses": ["2xx", "400", "401", "404", "409"]}
WAIT_RAN_OUT = {"expected-statuses": ["2xx", "3xx", "4xx", "504"]}
# Black Forest Labs' wire answers such rules 422, as BFL does, for what no schema
# says either: width x height past 4 MP, more than 4 images for klein.
BFL_SEMANTIC = {"expected-statuses": [*SEMANTIC["expected-statuses"], "422"]}
OPERATIONS = (
    [
        {"include-path": path, "checks": {"positive_data_acceptance": SEMANTIC}}
        for path in (
            "/api/common/upload/base64",
            "/api/common/upload/url",
            "/api/generate/tasks",
            "/api/generate/submit",
        )
    ]
    + [
        {"include-path": f"/v1/{path}", "checks": {"positive_data_acceptance": BFL_SEMANTIC}}
        for path in BFL_PATHS
    ]
    + [
        {
            # No worker runs here: a request that fits the document waits out its
            # short openai_wait and is answered 504, naming its tasks.
            "include-path": "/v1/images/generations",
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "504"]},
                "not_a_server_error": WAIT_RAN_OUT,
            },
        },
        {
            # Multipart text, as for the stream upload below.
            "include-path": "/v1/images/edits",
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "504"]},
                "not_a_server_error": WAIT_RAN_OUT,
                "negative_data_rejection": {"enabled": False},
            },
        },
        {
            "include-path": "/api/common/upload/stream",
            "checks": {
                "positive_data_acceptance": SEMANTIC,
                # A multipart field is text: one schemathesis meant as a number (to
                # break `type: string`) arrives as the text of that number, which may
                # well be a fine folder name. The JSON uploads check the same rules.
                "negative_data_rejection": {"enabled": False},
            },
        },
    ]
)


@dataclass
class Run:
    """What a schemathesis run found: each failed check with its curl reproduction,
    and the statuses each operation answered."""

    failures: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))


def run(schema: schemathesis.BaseSchema) -> Run:
    """Every phase of schemathesis (examples, coverage, fuzzing, stateful) with every check."""
    found = Run()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.FatalError):
            found.failures["fatal"] = f"fatal: {event.exception!r}"
        if isinstance(event, events.NonFatalError):
            found.failures.setdefault(f"{event.label} {event.info}", f"error: {event.info}")
        recorder = getattr(event, "recorder", None)
        if recorder is None:
            continue
        for interaction in recorder.interactions.values():
            if interaction.response is not None:
                found.statuses[recorder.label].add(interaction.response.status_code)
        for checks in recorder.checks.values():
            for check in checks:
                if check.failure_info is None:
                    continue
                failure = check.failure_info.failure
                key = f"{recorder.label} {check.name} {failure.title}"
                found.failures.setdefault(
                    key, f"{key}\n{failure.message}\n{check.failure_info.code_sample}"
                )
    return found


# Warnings hypothesis gives about how schemathesis drives it, not about the app.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_every_answer_matches_the_document(backend: str, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        url = None
        if backend == "postgresql":
            url = await stack.enter_async_context(fresh_postgres_database())
        config = make_settings(
            tmp_path / "data", database_url=url, fetch_timeout=1, openai_wait=0.05
        )
        store = open_store(config.resolved_database_url)
        await store.start()
        key, _ = await create_key(store, "schemathesis")
        await store.close()
        app = create_app(Runtime(config, run_worker=False))
        run_config = schemathesis.Config.from_dict(
            {
                "seed": SEED,
                "headers": {"Authorization": f"Bearer {key.secret}"},
                "generation": {"max-examples": EXAMPLES},
                "workers": 1,
                "operations": OPERATIONS,
            }
        )
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=run_config)
        try:
            found = run(schema)
        finally:
            schemathesis.python.asgi.shutdown_lifespans()
    assert not found.failures, "\n\n".join(found.failures.values())
    # The key worked and real tasks were made: each of these answered 200 at least once.
    answered = {label for label, statuses in found.statuses.items() if 200 in statuses}
    assert answered >= ANSWERED, sorted(ANSWERED - answered)
    assert answered & BFL_SUBMITS, "no submit of Black Forest Labs' wire answered 200"


async def test_answers_the_run_cannot_reach_match_the_document(tmp_path: Path) -> None:
    """A finished task, its files and its callback log: the schemathesis run's tasks
    never run, so these answers are made here and checked against the document."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 80), (200, 30, 90)).save(buffer, format="PNG")
    png = buffer.getvalue()
    async with run_service(
        make_settings(tmp_path / "data"), run_worker=False, in_process=True
    ) as service:
        client, auth = service.client, service.auth()
        schema = schemathesis.openapi.from_dict((await client.get("/openapi.json")).json())
        task_id = await submit_ended(service, "http://127.0.0.1:9/hook")
        await service.runtime.storage.put(f"results/{task_id}/image.png", png, "image/png")
        status = await client.get(f"/api/generate/status/{task_id}", headers=auth)
        file_url = status.json()["data"]["files"][0]["file_url"]
        upload = await client.post(
            "/api/common/upload/base64",
            json={"base64_data": base64.b64encode(png).decode()},
            headers=auth,
        )
        answers = [
            ("GET", "/api/generate/status/{task_id}", status),
            ("GET", "/api/generate/tasks", await client.get("/api/generate/tasks", headers=auth)),
            (
                "GET",
                "/api/generate/callbacks/{task_id}",
                await client.get(f"/api/generate/callbacks/{task_id}", headers=auth),
            ),
            (
                "POST",
                "/api/generate/callbacks/{task_id}/redeliver",
                await client.post(f"/api/generate/callbacks/{task_id}/redeliver", headers=auth),
            ),
            (
                "POST",
                "/api/generate/cancel/{task_id}",
                await client.post(f"/api/generate/cancel/{task_id}", headers=auth),
            ),
            ("POST", "/api/common/upload/base64", upload),
            ("GET", "/files/{key}", await client.get(file_url)),
            ("GET", "/files/{key}", await client.get(file_url, headers={"Range": "bytes=0-9"})),
            ("GET", "/files/{key}", await client.get(file_url, headers={"Range": "bytes=999-"})),
            ("GET", "/files/{key}", await client.get(upload.json()["data"]["file_url"])),
            ("GET", "/metrics", await client.get("/metrics")),
            (
                "GET",
                "/v1/get_result",
                await client.get(f"/v1/get_result?id={task_id}", headers=auth),
            ),
            ("GET", "/v1/get_result", await client.get("/v1/get_result?id=none", headers=auth)),
            (
                "POST",
                "/v1/flux-2-pro",
                await client.post(
                    "/v1/flux-2-pro", json={"prompt": "a quiet harbour", "width": 100}, headers=auth
                ),
            ),
        ]
        for method, path, response in answers:
            schema[path][method].validate_response(response)
    assert [response.status_code for _, _, response in answers] == [
        *(200, 200, 200, 200, 409, 200),
        *(200, 206, 416, 200, 200),
        *(200, 404, 422),
    ]
