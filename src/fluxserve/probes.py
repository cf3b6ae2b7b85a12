"""Liveness and readiness: whether a process should be restarted, and whether it should
be sent work.

Liveness reads only this process's memory, so it answers while the database is
down and costs nothing. Readiness asks the database, and says every reason it
finds for not taking traffic.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fluxserve.errors import StoreUnavailable
from fluxserve.runtime import Runtime

if TYPE_CHECKING:
    from fluxserve.worker_base import WorkerBase

# The worker's states as strings (WorkerState is a StrEnum): an API process never
# imports the worker's module.
READY, DEFUNCT = "ready", "defunct"

DATABASE_TIMEOUT = 2.0
"""Seconds readiness waits for the database before it counts it as unreachable."""


@dataclass(frozen=True)
class Probe:
    """A probe's answer: whether it passes, and the JSON body that says why."""

    ok: bool
    body: dict[str, Any]

    @property
    def status_code(self) -> int:
        return 200 if self.ok else 503


def liveness(runtime: Runtime) -> Probe:
    """Whether this process lives: it fails only once the process must be restarted (a
    background loop ended, or its worker is defunct)."""
    worker = runtime.worker
    reason = runtime.failure
    if reason is None and worker is not None and worker.state == DEFUNCT:
        reason = worker.error
    body: dict[str, Any] = {"status": "ok" if reason is None else "failing"}
    if reason is not None:
        body["reason"] = reason
    body["worker"] = _worker_view(worker)
    return Probe(reason is None, body)


async def readiness(runtime: Runtime) -> Probe:
    """Whether this process should be sent work; the reasons why not, and the details."""
    reasons = []
    if runtime.failure is not None:
        reasons.append(runtime.failure)
    worker = runtime.worker
    if worker is not None and worker.state != READY:
        why = f": {worker.error}" if worker.error else ""
        reasons.append(f"this process's worker is {worker.state.value}{why}")
    body: dict[str, Any] = {
        "worker": _worker_view(worker),
        "schema": None,
        "queue": None,
        "workers": None,
    }
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT):
            reasons += await _database(runtime, body)
    except StoreUnavailable as exc:
        reasons.append(str(exc))
    except TimeoutError:
        reasons.append(f"database unavailable: no answer within {DATABASE_TIMEOUT:g} s")
    except Exception as exc:  # a database that answers with errors is not ready either
        reasons.append(f"database check failed: {type(exc).__name__}: {exc}")
    return Probe(
        not reasons, {"status": "not_ready" if reasons else "ready", "reasons": reasons, **body}
    )


async def _database(runtime: Runtime, body: dict[str, Any]) -> list[str]:
    """Fill `body` from the database; the reasons it gives for not being ready."""
    store, settings = runtime.store, runtime.settings
    reasons = []
    revision, head = await store.schema_revision(), store.schema_head()
    body["schema"] = {"database": revision, "code": head}
    if revision != head:
        reasons.append(
            f"database schema is at migration {revision}, this version needs {head}: "
            "start this version once against it to migrate, or run the version it was made for"
        )
    body["queue"] = await store.queue_depths()
    live = await store.live_workers(settings.lease_seconds)
    body["workers"] = [
        {"worker_id": w.worker_id, "state": w.state, "engine": w.engine, "models": list(w.models)}
        for w in live
    ]
    served = {model for w in live if w.state == READY for model in w.models}
    for model in settings.ready_requires_models:
        if model not in served:
            reasons.append(f"no live worker serves {model}")
    return reasons


def _worker_view(worker: WorkerBase[Any] | None) -> dict[str, Any] | None:
    if worker is None:
        return None
    return {"state": worker.state.value, "engine": worker.engine.name, "error": worker.error}
