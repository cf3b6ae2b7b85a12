"""The store port: the few operations the service, worker and dispatcher need."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from fluxserve.tasks import Claim, NewTask, ResultFile, Task


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class CallbackRecord:
    """One pending callback in the outbox."""

    callback_id: int
    event_id: str
    task_id: str
    url: str
    attempts: int


@dataclass(frozen=True)
class Outcome:
    """What a worker hands back for a task it ran to the end."""

    engine: str
    seed: int
    width: int
    height: int
    files: Sequence[ResultFile]


class Store(ABC):
    """Tasks, keys and callbacks. Each method is one atomic unit of work."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and bring the schema to the newest migration."""

    @abstractmethod
    async def close(self) -> None: ...

    # API keys ---------------------------------------------------------------
    @abstractmethod
    async def create_key(self, key_id: str, name: str, key_hash: str, prefix: str) -> None: ...

    @abstractmethod
    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, revoked or not; None if there is none."""

    @abstractmethod
    async def list_keys(self) -> list[ApiKeyRecord]: ...

    @abstractmethod
    async def revoke_key(self, key_id: str) -> bool:
        """Revoke an active key; False if no active key has this id."""

    # Tasks ------------------------------------------------------------------
    @abstractmethod
    async def create_task(self, task: NewTask) -> Task:
        """Store a queued task (committed before this returns) and wake a worker."""

    @abstractmethod
    async def get_task(self, task_id: str) -> Task | None: ...

    @abstractmethod
    async def queue_position(self, task_id: str) -> int | None:
        """1 for the next queued task of its model, 2 for the one after...; None unless queued."""

    @abstractmethod
    async def claim_task(
        self, models: Sequence[str], worker_id: str, lease_seconds: float
    ) -> Claim | None:
        """Move the oldest queued task of `models` to running, leased to `worker_id`."""

    @abstractmethod
    async def wait_for_task(self, at_most: float) -> None:
        """Return when a task may have been queued, or after `at_most` seconds."""

    @abstractmethod
    async def report_progress(self, claim: Claim, progress: int, lease_seconds: float) -> bool:
        """Raise the task's progress and renew its lease; False if the lease was lost."""

    @abstractmethod
    async def finish_task(self, claim: Claim, outcome: Outcome) -> bool:
        """running -> finished, with its callback queued in the same transaction."""

    @abstractmethod
    async def fail_task(self, claim: Claim, message: str) -> bool:
        """running -> failed, with its callback queued in the same transaction."""

    @abstractmethod
    async def release_task(self, claim: Claim) -> bool:
        """running -> not_started: a stopping worker hands its task back unspent."""

    @abstractmethod
    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Hand back tasks whose lease ran out; fail those out of attempts.

        Returns (requeued, failed).
        """

    # Callback outbox --------------------------------------------------------
    @abstractmethod
    async def claim_callbacks(self, limit: int, hold_seconds: float) -> list[CallbackRecord]:
        """Pending callbacks that are due, oldest first, held from others for a while."""

    @abstractmethod
    async def next_callback_at(self) -> float | None:
        """When the earliest pending callback is due; None if none is pending."""

    @abstractmethod
    async def wait_for_callback(self, at_most: float) -> None:
        """Return when a callback may have been queued, or after `at_most` seconds."""

    @abstractmethod
    async def record_attempt(
        self, callback_id: int, *, delivered: bool, error: str | None, retry_at: float | None
    ) -> None:
        """Log an attempt: delivered, to retry at `retry_at`, or given up (both falsy)."""
