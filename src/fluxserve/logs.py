"""The process's log lines: readable text by default, or with `log_format = "json"`
one JSON object a line, uvicorn's own lines (access log included) as well.

A line written while a task is being handled (its submit, a request about it,
its run on a worker, its callbacks) carries the task's id: `bind_task` and
`about_tasks` set it for the current context, which asyncio hands on to the
tasks it starts there, so no call needs to pass it along.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections.abc import Iterator
from contextvars import Context, ContextVar, copy_context
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The fields of uvicorn's access log line, in the order of its arguments.
ACCESS_FIELDS = ("client", "method", "path", "http_version", "status_code")

_tasks: ContextVar[tuple[str, ...]] = ContextVar("fluxserve_tasks", default=())


def bind_task(*task_ids: str) -> None:
    """Lines written from here on in this context (a request, an asyncio task)
    are about `task_ids`."""
    _tasks.set(task_ids)


@contextlib.contextmanager
def about_tasks(*task_ids: str) -> Iterator[None]:
    """Lines written within are about `task_ids` (a worker's batch may hold several)."""
    token = _tasks.set(task_ids)
    try:
        yield
    finally:
        _tasks.reset(token)


def context_about(*task_ids: str) -> Context:
    """A copy of the current context in which lines are about `task_ids`: for
    an asyncio task started for them."""
    context = copy_context()
    context.run(_tasks.set, task_ids)
    return context


def current_tasks() -> tuple[str, ...]:
    return _tasks.get()


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, message; `task_id` (or
    `task_ids`) when it is about tasks, the access log's parts, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_ids = current_tasks()
        if len(task_ids) == 1:
            entry["task_id"] = task_ids[0]
        elif task_ids:
            entry["task_ids"] = list(task_ids)
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            entry.update(zip(ACCESS_FIELDS, record.args, strict=False))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(log_format: str) -> None:
    """Send every log line of the process to stderr in `log_format`."""
    if log_format == "text":
        logging.basicConfig(level=logging.INFO, format=TEXT_FORMAT)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        # What Python itself would print outside the log: warnings, and the
        # traceback of an exception nothing caught.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    logging.getLogger("fluxserve").critical("uncaught exception", exc_info=(kind, error, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("fluxserve").critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=args.exc_value,
    )
