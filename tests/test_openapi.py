"""The OpenAPI document tells the truth: schemathesis drives every operation of the
real app, on a real store, with a real key, and checks each answer against it."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import schemathesis
from schemathesis.engine import events

from fluxserve.accounts import create_key
from fluxserve.api.app import create_app
from fluxserve.runtime import Runtime
from fluxserve.store import open_store

from conftest import fresh_postgres_database, make_settings

EXAMPLES = 10
# Where a request that fits the document can still be refused, with a 400 naming
# the field, for what no schema can say: an upload must hold an image (or a URL
# that serves one), a cursor must be one the server gave out, a URL must pass the
# net guard, a data: reference must be an image FLUX.2 can use.
SEMANTIC = [
    "/api/common/upload/base64",
    "/api/common/upload/stream",
    "/api/common/upload/url",
    "/api/generate/tasks",
    "/api/generate/submit",
]


def failures(schema: schemathesis.BaseSchema) -> list[str]:
    """Every failed check of a whole schemathesis run, each with its curl reproduction."""
    found: dict[str, str] = {}
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.NonFatalError | events.FatalError):
            found[repr(event)] = f"error: {getattr(event, 'info', event)}"
        recorder = getattr(event, "recorder", None)
        if recorder is None:
            continue
        for checks in recorder.checks.values():
            for check in checks:
                if check.failure_info is None:
                    continue
                failure = check.failure_info.failure
                key = f"{recorder.label} {check.name} {failure.title}"
                found.setdefault(key, f"{key}\n{failure.message}\n{check.failure_info.code_sample}")
    return list(found.values())


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_every_answer_matches_the_document(backend: str, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        url = None
        if backend == "postgresql":
            url = await stack.enter_async_context(fresh_postgres_database())
        config = make_settings(tmp_path / "data", database_url=url, fetch_timeout=1)
        store = open_store(config.resolved_database_url)
        await store.start()
        key, _ = await create_key(store, "schemathesis")
        await store.close()
        app = create_app(Runtime(config, run_worker=False))
        run_config = schemathesis.Config.from_dict(
            {
                "headers": {"Authorization": f"Bearer {key.secret}"},
                "generation": {"max-examples": EXAMPLES},
                "workers": 1,
                "operations": [
                    {
                        "include-path": path,
                        "checks": {
                            "positive_data_acceptance": {
                                "expected-statuses": ["2xx", "400", "401", "404", "409"]
                            }
                        },
                    }
                    for path in SEMANTIC
                ],
            }
        )
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=run_config)
        found = failures(schema)
        schemathesis.python.asgi.shutdown_lifespans()
    assert not found, "\n\n".join(found)
