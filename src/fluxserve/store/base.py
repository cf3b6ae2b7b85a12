"""The store port: the few operations the service, worker and dispatcher need."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from fluxserve.tasks import Claim, NewTask, ResultFile, Task, TaskStatus

SqliteSynchronous = Literal["full", "normal"]
"""Whether each SQLite commit is synced to the disk before it returns (`full`), or
only at checkpoints (`normal`): see `sqlite._configure`."""


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


class Store(ABC):
    """Tasks, keys and callbacks. Each method is one atomic unit of work."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and bring the schema to the newest migration."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def watch_endings(self, listener: Callable[[Task], None]) -> None:
        """Call `listener` with every task this store ends (finished, failed,
        cancelled, given up), as it ended, once its end has committed."""

    @abstractmethod
    async def schema_revision(self) -> str | None:
        """The migration the database is at (None: none yet); reaches the database."""

    @abstractmethod
    def schema_head(self) -> str | None:
        """The newest migration this version of the code knows."""

    # Accounts and credits ---------------------------------------------------
    @abstractmethod
    async def create_account(self, account_id: str, email: str) -> Account:
        """A new account with no credits; Conflict if the email has one already."""

    @abstractmethod
    async def create_first_key(
        self, account_id: str, email: str, key_id: str, name: str, key_hash: str, prefix: str
    ) -> bool:
        """The database's first account, with one key, if it has no account yet; False
        (and nothing written) if it has one, made by another process meanwhile included."""

    @abstractmethod
    async def get_account(self, account_id: str) -> Account | None: ...

    @abstractmethod
    async def account_by_email(self, email: str) -> Account | None: ...

    @abstractmethod
    async def grant_credits(self, account_id: str, amount: int, note: str | None) -> Account:
        """Add `amount` (negative to take away) to the balance, with its ledger row."""

    @abstractmethod
    async def ledger(self, account_id: str, limit: int) -> list[LedgerEntry]:
        """The account's newest `limit` credit movements, newest first."""

    # API keys ---------------------------------------------------------------
    @abstractmethod
    async def create_key(
        self, key_id: str, name: str, key_hash: str, prefix: str, account_id: str
    ) -> None: ...

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
    async def create_task(
        self,
        task: NewTask,
        *,
        limits: SubmitLimits | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Task:
        """Store a queued task (committed before this returns) and wake a worker.

        In the same transaction: an earlier task with the same idempotency key is
        answered instead (Conflict if it asked for something else); the key's
        limits are checked (RateLimited); the task's price is held from its
        account's balance (InsufficientCredits); and the task takes its place in
        the fair queue between accounts.
        """

    @abstractmethod
    async def cancel_task(self, task_id: str) -> Task | None:
        """Cancel: a queued task fails now; a running one is marked for its worker.

        Returns the task as it is afterwards (None if unknown). A task that had
        already ended is returned unchanged.
        """

    @abstractmethod
    async def list_tasks(
        self,
        account_id: str,
        *,
        status: str | None,
        model: str | None,
        limit: int,
        before: int | None,
    ) -> TaskPage:
        """The account's tasks, newest first, starting below cursor `before`."""

    @abstractmethod
    async def get_task(self, task_id: str) -> Task | None: ...

    @abstractmethod
    async def get_task_and_position(self, task_id: str) -> tuple[Task, int | None] | None:
        """The task and, while it is queued, its `queue_position`, in one round trip.

        The position is 1 for the next task of its model to be claimed, 2 for the one
        after, in claim order; None unless the task is queued.
        """

    @abstractmethod
    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        """The ids of tasks whose status or progress changed since the last call, in
        this process or any other, once there are some (empty after `at_most` seconds).

        None when any task may have changed: where a backend cannot name them, or
        after a gap in which names may have been lost (a LISTEN reconnecting).
        One reader per process (its stream feed); the first call answers None.
        """

    @abstractmethod
    async def task_states(self, task_ids: Collection[str]) -> dict[str, tuple[TaskStatus, int]]:
        """The status and progress of each of these tasks that exists, read together."""

    @abstractmethod
    async def claim_task(
        self, models: Sequence[str], worker_id: str, lease_seconds: float
    ) -> Claim | None:
        """Move the oldest queued task of `models` to running, leased to `worker_id`."""

    @abstractmethod
    async def claim_batch(
        self,
        models: Sequence[str],
        worker_id: str,
        lease_seconds: float,
        *,
        limit: int,
        window: int,
    ) -> list[Claim]:
        """Claim the oldest queued task as `claim_task` does, and in the same
        transaction up to `limit - 1` more for one pipeline call with it.

        Those are taken from the next `window` queued tasks of its model, in queue
        order, where their `batch_shape` equals its own (never for an edit), so
        the queue's front is served first. Each claim has its own lease. Empty
        when nothing is queued.
        """

    @abstractmethod
    async def wait_for_task(self, at_most: float) -> None:
        """Return when a task may have been queued, or after `at_most` seconds."""

    @abstractmethod
    async def report_progress(
        self, claim: Claim, progress: int, lease_seconds: float
    ) -> LeaseState:
        """Raise the task's progress and renew its lease, if still held."""

    @abstractmethod
    async def finish_task(self, claim: Claim, outcome: Outcome) -> bool:
        """running -> finished, with its callback queued in the same transaction."""

    @abstractmethod
    async def fail_task(self, claim: Claim, message: str) -> bool:
        """running -> failed, with its callback queued in the same transaction."""

    @abstractmethod
    async def record_upstream(self, claim: Claim, upstream: dict[str, Any]) -> bool:
        """Keep the task's upstream task with it while the claim holds it; False if not."""

    @abstractmethod
    async def release_task(self, claim: Claim) -> bool:
        """running -> not_started: a stopping worker hands its task back unspent.

        A task whose cancel was asked for fails as cancelled instead.
        """

    @abstractmethod
    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Hand back tasks whose lease ran out; fail those out of attempts or cancelled.

        Returns (requeued, failed).
        """

    # Callback outbox --------------------------------------------------------
    @abstractmethod
    async def claim_callbacks(
        self, limit: int, hold_seconds: float, skip_origins: Collection[str] = ()
    ) -> list[CallbackRecord]:
        """Due callbacks, oldest first, held from others for `hold_seconds` while sent.

        Callbacks to `skip_origins` are left for later: those receivers are busy.
        """

    @abstractmethod
    async def release_callbacks(self, callback_ids: Sequence[int]) -> None:
        """Hand claimed callbacks back unsent, due now, their schedule untouched."""

    @abstractmethod
    async def next_callback_at(self, skip_origins: Collection[str] = ()) -> float | None:
        """When the earliest pending callback (not to `skip_origins`) is due; None if none."""

    @abstractmethod
    async def wait_for_callback(self, at_most: float) -> None:
        """Return when a callback may have been queued, or after `at_most` seconds."""

    @abstractmethod
    async def record_attempt(
        self, callback_id: int, attempt: Attempt, *, retry_at: float | None
    ) -> None:
        """Log a claimed event's attempt: delivered, to retry at `retry_at`, or given up."""

    @abstractmethod
    async def record_event(
        self, task_id: str, event_id: str, event_type: str, url: str, attempt: Attempt
    ) -> None:
        """Log a best-effort event, sent once outside the outbox, with its one attempt."""

    @abstractmethod
    async def callback_events(self, task_id: str) -> list[CallbackEvent]:
        """The task's callback events, oldest first, each with all its attempts."""

    @abstractmethod
    async def redeliver_callback(self, task: Task) -> str:
        """Make the ended task's terminal event due now, on a fresh schedule; its event id.

        A delivered or failed event is reopened and a pending one brought forward;
        one being sent is left alone, as that attempt is the redelivery. A task
        whose terminal event was filtered out gets it queued now.
        """

    @abstractmethod
    async def pending_callbacks(self) -> int:
        """How many callback events are pending or being sent."""

    # Webhook signing secrets --------------------------------------------------
    @abstractmethod
    async def webhook_secret(self, key_id: str, candidate: str) -> WebhookSecret:
        """The key's signing secret; `candidate` becomes it if the key has none yet."""

    @abstractmethod
    async def rotate_webhook_secret(
        self, key_id: str, new_secret: str, previous_expires_at: float
    ) -> WebhookSecret:
        """Make `new_secret` the key's secret; the one it replaces signs until then."""

    # The fleet ----------------------------------------------------------------
    @abstractmethod
    async def queue_depths(self) -> dict[str, int]:
        """Queued (not_started) tasks per model; models with none are left out."""

    @abstractmethod
    async def record_heartbeat(
        self, worker_id: str, models: Sequence[str], engine: str, state: str
    ) -> None:
        """Say this worker is alive now, with its models, engine and state."""

    @abstractmethod
    async def forget_worker(self, worker_id: str) -> None:
        """A worker that stopped cleanly leaves the list at once."""

    @abstractmethod
    async def live_workers(self, seen_within: float) -> list[WorkerRecord]:
        """Workers whose last heartbeat is at most `seen_within` seconds old."""

    # Uploads and retention ------------------------------------------------------
    @abstractmethod
    async def add_upload(self, upload: UploadRecord) -> None:
        """Record an uploaded file, before its bytes are stored: a file is never untracked."""

    @abstractmethod
    async def get_upload(self, file_id: str) -> UploadRecord | None: ...

    @abstractmethod
    async def expired_uploads(self, now: float, limit: int) -> list[UploadRecord]:
        """Up to `limit` uploads whose `expires_at` is past at `now`, earliest first."""

    @abstractmethod
    async def forget_uploads(self, file_ids: Sequence[str]) -> None:
        """Remove these uploads' records; ids with none are skipped."""

    @abstractmethod
    async def tasks_with_files(self, ended_before: float, limit: int) -> dict[str, list[str]]:
        """Up to `limit` finished tasks that ended before `ended_before`, earliest first,
        whose files are still kept: task id -> the storage keys of its files."""

    @abstractmethod
    async def mark_files_expired(self, task_ids: Sequence[str], at: float) -> None:
        """Record that retention removed these tasks' files at `at`; marked ones keep theirs."""
