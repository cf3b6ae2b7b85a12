"""The store's ports, by who uses them: each caller may be typed against the one it needs.

`Store` is all of them at once; `open_store` makes one (see `store.py`). Each
method is one atomic unit of work.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from fluxserve.store.base import (
    Account,
    ApiKeyRecord,
    Attempt,
    CallbackEvent,
    CallbackRecord,
    IdempotencyKey,
    LeaseState,
    LedgerEntry,
    Outcome,
    SubmitLimits,
    TaskPage,
    UploadRecord,
    WebhookSecret,
    WorkerRecord,
)
from fluxserve.tasks import Claim, NewTask, Task, TaskStatus


class Queue(Protocol):
    """The queue a worker sees: claim, report, end or hand back its tasks; its heartbeats."""

    async def claim_task(
        self, models: Sequence[str], worker_id: str, lease_seconds: float
    ) -> Claim | None:
        """Move the oldest queued task of `models` to running, leased to `worker_id`."""

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

    async def wait_for_task(self, at_most: float) -> None:
        """Return when a task may have been queued, or after `at_most` seconds."""

    async def report_progress(
        self, claim: Claim, progress: int, lease_seconds: float
    ) -> LeaseState:
        """Raise the task's progress and renew its lease, if still held."""

    async def record_upstream(self, claim: Claim, upstream: dict[str, Any]) -> bool:
        """Keep the task's upstream task with it while the claim holds it; False if not."""

    async def finish_task(self, claim: Claim, outcome: Outcome) -> bool:
        """running -> finished, with its callback queued in the same transaction."""

    async def fail_task(self, claim: Claim, message: str) -> bool:
        """running -> failed, with its callback queued in the same transaction."""

    async def release_task(self, claim: Claim) -> bool:
        """running -> not_started: a stopping worker hands its task back unspent.

        A task whose cancel was asked for fails as cancelled instead.
        """

    async def record_heartbeat(
        self, worker_id: str, models: Sequence[str], engine: str, state: str
    ) -> None:
        """Say this worker is alive now, with its models, engine and state."""

    async def forget_worker(self, worker_id: str) -> None:
        """A worker that stopped cleanly leaves the list at once."""


class Outbox(Protocol):
    """The callback outbox the dispatcher sees, and the signing secrets it signs with."""

    async def get_task(self, task_id: str) -> Task | None: ...

    async def claim_callbacks(
        self, limit: int, hold_seconds: float, skip_origins: Collection[str] = ()
    ) -> list[CallbackRecord]:
        """Due callbacks, oldest first, held from others for `hold_seconds` while sent.

        Callbacks to `skip_origins` are left for later: those receivers are busy.
        """

    async def release_callbacks(self, callback_ids: Sequence[int]) -> None:
        """Hand claimed callbacks back unsent, due now, their schedule untouched."""

    async def next_callback_at(self, skip_origins: Collection[str] = ()) -> float | None:
        """When the earliest pending callback (not to `skip_origins`) is due; None if none."""

    async def wait_for_callback(self, at_most: float) -> None:
        """Return when a callback may have been queued, or after `at_most` seconds."""

    async def record_attempt(
        self, callback_id: int, attempt: Attempt, *, retry_at: float | None
    ) -> None:
        """Log a claimed event's attempt: delivered, to retry at `retry_at`, or given up."""

    async def record_event(
        self, task_id: str, event_id: str, event_type: str, url: str, attempt: Attempt
    ) -> None:
        """Log a best-effort event, sent once outside the outbox, with its one attempt."""

    async def pending_callbacks(self) -> int:
        """How many callback events are pending or being sent."""

    async def webhook_secret(self, key_id: str, candidate: str) -> WebhookSecret:
        """The key's signing secret; `candidate` becomes it if the key has none yet."""

    async def rotate_webhook_secret(
        self, key_id: str, new_secret: str, previous_expires_at: float
    ) -> WebhookSecret:
        """Make `new_secret` the key's secret; the one it replaces signs until then."""


class Tasks(Protocol):
    """Tasks as the API sees them: submit, cancel, read, watch; their callback logs."""

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

    async def create_tasks(
        self, new_tasks: Sequence[NewTask], *, limits: SubmitLimits | None = None
    ) -> list[Task]:
        """Store several queued tasks of one key together: all of them, or none.

        As `create_task`, but the key's limits are checked for all the tasks at
        once and the account's credits for their prices together, before any is
        written; a refusal (RateLimited, InsufficientCredits) leaves nothing.
        """

    async def cancel_task(self, task_id: str) -> Task | None:
        """Cancel: a queued task fails now; a running one is marked for its worker.

        Returns the task as it is afterwards (None if unknown). A task that had
        already ended is returned unchanged.
        """

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

    async def get_task(self, task_id: str) -> Task | None: ...

    async def get_task_and_position(self, task_id: str) -> tuple[Task, int | None] | None:
        """The task and, while it is queued, its `queue_position`, in one round trip.

        The position is 1 for the next task of its model to be claimed, 2 for the one
        after, in claim order; None unless the task is queued.
        """

    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        """The ids of tasks whose status or progress changed since the last call, in
        this process or any other, once there are some (empty after `at_most` seconds).

        None when any task may have changed: where a backend cannot name them, or
        after a gap in which names may have been lost (a LISTEN reconnecting).
        One reader per process (its stream feed); the first call answers None.
        """

    async def task_states(self, task_ids: Collection[str]) -> dict[str, tuple[TaskStatus, int]]:
        """The status and progress of each of these tasks that exists, read together."""

    async def callback_events(self, task_id: str) -> list[CallbackEvent]:
        """The task's callback events, oldest first, each with all its attempts."""

    async def redeliver_callback(self, task: Task) -> str:
        """Make the ended task's terminal event due now, on a fresh schedule; its event id.

        A delivered or failed event is reopened and a pending one brought forward;
        one being sent is left alone, as that attempt is the redelivery. A task
        whose terminal event was filtered out gets it queued now.
        """


class Accounts(Protocol):
    """Accounts, credits and API keys, for the API and the CLI."""

    async def create_account(self, account_id: str, email: str) -> Account:
        """A new account with no credits; Conflict if the email has one already."""

    async def create_first_key(
        self, account_id: str, email: str, key_id: str, name: str, key_hash: str, prefix: str
    ) -> bool:
        """The database's first account, with one key, if it has no account yet; False
        (and nothing written) if it has one, made by another process meanwhile included."""

    async def get_account(self, account_id: str) -> Account | None: ...

    async def account_by_email(self, email: str) -> Account | None: ...

    async def grant_credits(self, account_id: str, amount: int, note: str | None) -> Account:
        """Add `amount` (negative to take away) to the balance, with its ledger row."""

    async def ledger(self, account_id: str, limit: int) -> list[LedgerEntry]:
        """The account's newest `limit` credit movements, newest first."""

    async def create_key(
        self, key_id: str, name: str, key_hash: str, prefix: str, account_id: str
    ) -> None: ...

    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, revoked or not; None if there is none."""

    async def list_keys(self) -> list[ApiKeyRecord]: ...

    async def revoke_key(self, key_id: str) -> ApiKeyRecord | None:
        """Revoke the key, or leave it as it is if it is revoked already: either way the
        key, with when it was revoked, so a repeat answers as the first call did; None
        if no key has this id."""


class Files(Protocol):
    """Uploaded files, and the retention of uploaded and result files."""

    async def add_upload(self, upload: UploadRecord) -> None:
        """Record an uploaded file, before its bytes are stored: a file is never untracked."""

    async def get_upload(self, file_id: str) -> UploadRecord | None: ...

    async def expired_uploads(self, now: float, limit: int) -> list[UploadRecord]:
        """Up to `limit` uploads whose `expires_at` is past at `now`, earliest first."""

    async def forget_uploads(self, file_ids: Sequence[str]) -> None:
        """Remove these uploads' records; ids with none are skipped."""

    async def tasks_with_files(self, ended_before: float, limit: int) -> dict[str, list[str]]:
        """Up to `limit` finished tasks that ended before `ended_before`, earliest first,
        whose files are still kept: task id -> the storage keys of its files."""

    async def mark_files_expired(self, task_ids: Sequence[str], at: float) -> None:
        """Record that retention removed these tasks' files at `at`; marked ones keep theirs."""


class Operations(Protocol):
    """What runs the service: its start and stop, its schema, the fleet and the sweep."""

    async def start(self) -> None:
        """Connect and bring the schema to the newest migration; StoreOpenFailed, naming
        the database and what is wrong, if it cannot."""

    async def close(self) -> None: ...

    def watch_endings(self, listener: Callable[[Task], None]) -> None:
        """Call `listener` with every task this store ends (finished, failed,
        cancelled, given up), as it ended, once its end has committed."""

    async def schema_revision(self) -> str | None:
        """The migration the database is at (None: none yet); reaches the database."""

    def schema_head(self) -> str | None:
        """The newest migration this version of the code knows."""

    async def queue_depths(self) -> dict[str, int]:
        """Queued (not_started) tasks per model; models with none are left out."""

    async def live_workers(self, seen_within: float) -> list[WorkerRecord]:
        """Workers whose last heartbeat is at most `seen_within` seconds old."""

    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Hand back tasks whose lease ran out; fail those out of attempts or cancelled.

        Returns (requeued, failed).
        """


class Store(Queue, Outbox, Tasks, Accounts, Files, Operations, Protocol):
    """Tasks, keys, credits, callbacks and files: every port at once."""
