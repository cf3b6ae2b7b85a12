"""What every kind of worker shares: its identity and state, the heartbeat the fleet
sees, the claim's progress reporter, and letting go of a task it will not run.

`worker.Worker` runs tasks on a local engine, one engine call at a time;
`upstream_worker.UpstreamWorker` forwards them to Black Forest Labs' API, many at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from enum import StrEnum
from typing import Generic, NotRequired, Protocol, TypedDict, TypeVar, Unpack

from fluxserve.errors import (
    EngineError,
    FetchError,
    ReferenceImageError,
    StoreUnavailable,
    UnsafeURLError,
)
from fluxserve.net_policy import NetPolicy
from fluxserve.progress_reporter import ProgressReporter
from fluxserve.settings import Settings
from fluxserve.storage import Storage
from fluxserve.store import Store
from fluxserve.tasks import MODELS, Claim
from fluxserve.webhooks.progress import ProgressEvents

# Every worker's lifecycle lines (ready, defunct, heartbeats) under the one name
# operators filter on, whichever kind of worker writes them.
logger = logging.getLogger("fluxserve.worker")

# Denoising (or the upstream task) fills progress up to here; storing the file takes it to 100.
DENOISE_SHARE = 95
# What fails a task with its own message: the task's owner can act on it.
USER_ERRORS = (ReferenceImageError, FetchError, UnsafeURLError, EngineError)
# What ends a task's run without ending the task: the process is being stopped.
STOP_SIGNALS = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class WorkerState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DEFUNCT = "defunct"
    STOPPED = "stopped"


class Named(Protocol):
    """What the fleet and /health show of a worker's engine."""

    name: str


EngineT = TypeVar("EngineT", bound=Named)


class WorkerParts(TypedDict):
    """What a worker is made of, besides its engine."""

    store: Store
    storage: Storage
    settings: Settings
    policy: NetPolicy
    models: NotRequired[Sequence[str]]  # every model when left out
    events: NotRequired[ProgressEvents | None]


class WorkerBase(Generic[EngineT]):
    """Claims tasks for `models` from `store`; subclasses say how they run them.

    States: NEW -> STARTING (`_load`) -> READY -> STOPPED, or DEFUNCT when the
    load fails or the loop ends on an error outside any task.
    """

    def __init__(self, *, engine: EngineT, **parts: Unpack[WorkerParts]) -> None:
        self.engine = engine
        self.store = parts["store"]
        self.storage = parts["storage"]
        self.settings = parts["settings"]
        self.policy = parts["policy"]
        self.models = tuple(parts.get("models", MODELS))
        self.events = parts.get("events")
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.state = WorkerState.NEW
        self.error: str | None = None
        # Task ids to stop at their next step.
        self._cancelled: set[str] = set()
        self._heartbeat_lock = asyncio.Lock()

    async def _load(self) -> None:
        """Make the engine ready to run tasks."""

    async def _claim_and_run_forever(self) -> None:
        raise NotImplementedError

    def cancel(self, task_id: str) -> bool:
        """Stop `task_id` at its next step; whether this worker holds it."""
        raise NotImplementedError

    def stop_engine(self) -> None:
        """Make the engine give up at its next step; its tasks go back to the queue."""

    def close(self) -> None:
        """Free what the worker holds outside the event loop."""

    async def run(self) -> None:
        """Load the engine, then claim and run tasks until cancelled.

        Any other way out is an error outside every task: the worker turns
        DEFUNCT, says why in a CRITICAL log, and the error goes on to the caller.
        """
        self.state = WorkerState.STARTING
        heartbeat = asyncio.create_task(self._heartbeat_forever())
        try:
            await self._load()
            self.state = WorkerState.READY
            logger.info("worker %s ready for %s", self.worker_id, ", ".join(self.models))
            await self._heartbeat()
            await self._claim_and_run_forever()
        except STOP_SIGNALS:
            raise
        except BaseException as exc:
            if self.state is WorkerState.STARTING:
                await self._defunct(f"engine failed to load: {described(exc)}")
            else:
                await self._defunct(f"worker loop ended: {described(exc)}")
            raise
        finally:
            if self.state is not WorkerState.DEFUNCT:
                self.state = WorkerState.STOPPED
            heartbeat.cancel()
            # Awaited: a heartbeat cut off mid-write must give its connection back first.
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            with contextlib.suppress(StoreUnavailable):
                await self.store.forget_worker(self.worker_id)

    async def _defunct(self, reason: str) -> None:
        """This worker runs no more tasks: say why, where /ready and the fleet see it."""
        self.state, self.error = WorkerState.DEFUNCT, reason
        # The traceback follows in the runtime's line about the loop that ended.
        logger.critical("worker %s is defunct: %s", self.worker_id, reason)
        with contextlib.suppress(Exception):  # best effort: the database may be the cause
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        try:
            # One at a time: the store's update-then-insert of a new worker's row
            # is safe only when its own writes do not overlap.
            async with self._heartbeat_lock:
                await self.store.record_heartbeat(
                    self.worker_id, self.models, self.engine.name, self.state.value
                )
        except StoreUnavailable as exc:
            logger.warning("worker %s: heartbeat not saved: %s", self.worker_id, exc)

    async def _heartbeat_forever(self) -> None:
        """Tell the fleet this worker is alive; /health counts those seen within a lease."""
        while True:
            await self._heartbeat()
            await asyncio.sleep(self.settings.lease_seconds / 3)

    def _reporter(self, claim: Claim) -> ProgressReporter:
        """Start the claim's progress writes, which renew its lease; tell its callback."""
        events = self.events.watch(claim.task) if self.events is not None else None
        if events is not None:
            events.running()
        reporter = ProgressReporter(
            self.store, claim, self.settings.lease_seconds, events, on_cancel=self.cancel
        )
        reporter.start()
        return reporter

    async def _let_go(self, claim: Claim, reporter: ProgressReporter, failure: str | None) -> None:
        """Fail a task the engine never finished with `failure`, or (None) hand it back."""
        if failure is None:
            await self.store.release_task(claim)
        else:
            await self.store.fail_task(claim, failure)
        reporter.stop()
        self._cancelled.discard(claim.task.task_id)


def described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def internal_error(exc: BaseException) -> str:
    return f"Internal error: {described(exc)}"
