"""The records the store hands out and takes in (its ports are in `ports.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from fluxserve.tasks import ResultFile, Task

SqliteSynchronous = Literal["full", "normal"]
"""Whether each SQLite commit is synced to the disk before it returns (`full`), or
only at checkpoints (`normal`): see `sqlite._configure`."""

POSTGRES_STATEMENT_TIMEOUT = 30.0
"""Seconds a PostgreSQL statement may take by default: see `postgres._bounded`."""


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None
    account_id: str | None = None


@dataclass(frozen=True)
class Account:
    """Who owns keys, tasks and credits."""

    account_id: str
    email: str
    created_at: float
    balance: int  # granted minus charged
    held: int  # promised to queued and running tasks

    @property
    def available(self) -> int:
        """What a new task may spend."""
        return self.balance - self.held


@dataclass(frozen=True)
class LedgerEntry:
    """One credit movement: a grant, or a task's hold, charge or release."""

    entry_id: int
    task_id: str | None
    kind: str
    amount: int
    note: str | None
    created_at: float


@dataclass(frozen=True)
class SubmitLimits:
    """Per-key limits checked in the submit's own transaction; None = no limit."""

    per_minute: int | None = None
    concurrent: int | None = None


@dataclass(frozen=True)
class IdempotencyKey:
    """A submit's `Idempotency-Key` header and a hash of what it asked for."""

    key: str
    request_hash: str
    ttl: float


@dataclass(frozen=True)
class TaskPage:
    """A page of an account's tasks, newest first, and where the next one starts."""

    tasks: list[Task]
    next_cursor: int | None


@dataclass(frozen=True)
class UploadRecord:
    """An uploaded file: where it is stored, what it is, and when it goes."""

    file_id: str
    account_id: str
    key: str
    file_name: str
    original_name: str | None
    file_size: int
    mime_type: str
    upload_path: str | None
    created_at: float
    expires_at: float


class LeaseState(StrEnum):
    """What a worker learns when it renews a running task's lease."""

    HELD = "held"
    LOST = "lost"  # another worker has it, or it ended: stop and discard
    CANCEL_REQUESTED = "cancel_requested"  # still held; stop at the next step


class CallbackState(StrEnum):
    """Where a callback event stands. Only terminal events are ever pending."""

    PENDING = "pending"  # waiting for its next attempt
    SENDING = "sending"  # an attempt in flight, held by one dispatcher
    DELIVERED = "delivered"
    FAILED = "failed"  # given up: a final answer, or the schedule spent


@dataclass(frozen=True)
class CallbackRecord:
    """One due callback in the outbox, claimed for an attempt."""

    callback_id: int
    event_id: str
    task_id: str
    url: str
    attempts: int
    event_type: str
    origin: str  # scheme://host:port of `url`


@dataclass(frozen=True)
class Attempt:
    """One POST of a callback event: when, how long, and what came back."""

    attempted_at: float
    duration: float
    status_code: int | None
    error: str | None  # None when the receiver answered 2xx

    @property
    def delivered(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class CallbackEvent:
    """A callback event of a task, with every attempt at it, oldest first."""

    event_id: str
    event_type: str
    url: str
    state: CallbackState
    created_at: float
    next_attempt_at: float | None  # None unless pending or sending
    delivered_at: float | None  # the latest delivery
    attempts: tuple[Attempt, ...]


@dataclass(frozen=True)
class WebhookSecret:
    """An API key's signing secret, and the one it replaced while that still signs."""

    key_id: str
    secret: str
    created_at: float
    previous_secret: str | None
    previous_expires_at: float | None

    def previous_signs(self, now: float) -> bool:
        """Whether the previous secret is still in its grace period."""
        return self.previous_expires_at is not None and now < self.previous_expires_at


@dataclass(frozen=True)
class Outcome:
    """What a worker hands back for a task it ran to the end."""

    engine: str
    seed: int
    width: int
    height: int
    files: Sequence[ResultFile]


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as its last heartbeat described it."""

    worker_id: str
    models: tuple[str, ...]
    engine: str
    state: str
    started_at: float
    last_seen: float
