"""The ceiling for bench/throughput.py: fluxserve's two hot routes with no storage.

Same framework (FastAPI), same server (uvicorn, its defaults), same JSON shapes as
`POST /api/generate/submit` and `GET /api/generate/status/{id}` of a queued task;
no key lookup, no validation beyond parsing the JSON body, no database.

    .venv/bin/python -m uvicorn bare_app:app --app-dir bench --port 8001
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI(title="fluxserve bare ceiling")


def _unauthorized() -> JSONResponse:
    error = {"message": "Missing API key", "type": "authentication_error"}
    return JSONResponse({"code": 401, "error": error}, status_code=401)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


@app.post("/api/generate/submit", response_model=None)
async def submit(body: dict[str, Any], request: Request) -> dict[str, Any] | JSONResponse:
    """A submit's answer for a task that is never stored."""
    if not request.headers.get("authorization"):
        return _unauthorized()
    task_id = f"task-unified-{int(time.time())}-{secrets.token_hex(4)}"
    return {
        "code": 200,
        "data": {"task_id": task_id, "status": "not_started", "created_time": _now()},
    }


@app.get("/api/generate/status/{task_id}", response_model=None)
async def status(task_id: str, request: Request) -> dict[str, Any] | JSONResponse:
    """A queued task's status answer, made up."""
    if not request.headers.get("authorization"):
        return _unauthorized()
    data = {
        "task_id": task_id,
        "status": "not_started",
        "files": [],
        "created_time": _now(),
        "progress": 0,
        "error_message": None,
        "credits_amount": 0,
        "model": "flux-2-pro",
        "engine": None,
        "seed": 1234,
        "queue_position": 1,
    }
    return {"code": 200, "data": data}


@app.get("/health")
async def health() -> dict[str, Any]:
    """Readiness, as fluxserve answers it without a worker."""
    return {"status": "ok", "worker": None}
