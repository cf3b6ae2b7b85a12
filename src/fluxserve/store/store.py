"""The store: every port (`ports.py`) on one database (`connection.py`).

Each method is one operation of the module named for what it keeps: tasks and
the queue (`submits.py`, `queue.py`, `task_reads.py`), credits (`credits.py`),
callbacks (`callbacks.py`), files (`files.py`), keys (`keys.py`) and workers
(`workers.py`). Only two things happen here: submits that arrive together share
a commit (`group_commit.py`), and on PostgreSQL status reads that arrive
together are answered together (`coalesce.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar

from fluxserve.errors import AlreadyStored, StoreUnavailable
from fluxserve.store import callbacks, credits, files, keys, migrate, queue, task_reads, workers
from fluxserve.store.base import IdempotencyKey, SubmitLimits
from fluxserve.store.coalesce import Coalescer
from fluxserve.store.connection import Connection, Database
from fluxserve.store.group_commit import GroupCommit, Write
from fluxserve.store.submits import submit, submit_together
from fluxserve.store.wakeups import CALLBACKS, TASKS
from fluxserve.tasks import Claim, NewTask, Task

P = ParamSpec("P")
R = TypeVar("R")
Method = Callable[Concatenate["SqlStore", P], Coroutine[Any, Any, R]]


def _on_db(operation: Callable[Concatenate[Database, P], Awaitable[R]]) -> Method[P, R]:
    """A method that runs `operation` on the store's database."""

    async def method(store: SqlStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await operation(store.db, *args, **kwargs)

    return method


def _ending(
    operation: Callable[Concatenate[Database, queue.OnEnd, P], Awaitable[R]],
) -> Method[P, R]:
    """A method that runs `operation`, which may end tasks, on the store's database."""

    async def method(store: SqlStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await operation(store.db, store._ended, *args, **kwargs)

    return method


class SqlStore:
    """Satisfies `ports.Store`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._end_listeners: list[Callable[[Task], None]] = []
        postgres = db.name == "postgresql"
        # PostgreSQL writes a submit without limits in one statement (see `submits.py`),
        # which needs no transaction when it is alone.
        self._submits = GroupCommit(db, self._submit_alone if postgres else None, per_key=postgres)
        self._status_reads: Coalescer[str, Any] | None = (
            Coalescer(partial(task_reads.tasks_and_positions, db)) if postgres else None
        )

    async def start(self) -> None:
        await self.db.start()

    async def close(self) -> None:
        if self._status_reads is not None:
            await self._status_reads.close()
        await self._submits.close()
        await self.db.close()

    def watch_endings(self, listener: Callable[[Task], None]) -> None:
        self._end_listeners.append(listener)

    def _ended(self, task: Task) -> None:
        for listener in self._end_listeners:
            listener(task)

    async def schema_revision(self) -> str | None:
        row = await self.db.one(migrate.VERSION)
        return None if row is None else str(row[0])

    def schema_head(self) -> str | None:
        return migrate.head()

    async def create_task(
        self,
        task: NewTask,
        *,
        limits: SubmitLimits | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Task:
        one_statement = self.db.name == "postgresql"

        async def work(conn: Connection) -> Task:
            return await submit(conn, task, limits, idempotency, in_one_statement=one_statement)

        # Without per-key limits to check, a submit refuses before it writes and
        # locks no row but its account's: it may share a transaction with the
        # submits arriving beside it.
        together = task.account_id if limits is None else None
        try:
            return await self._submit(work, together)
        except (AlreadyStored, StoreUnavailable):
            committed = await self.get_task(task.task_id)
            if committed is not None:
                return committed  # by a try whose connection was lost as it committed
            if idempotency is None:
                raise
            # A concurrent submit with the same key committed first: answer its task.
            return await self._submit(work, together)

    async def create_tasks(
        self, new_tasks: Sequence[NewTask], *, limits: SubmitLimits | None = None
    ) -> list[Task]:
        try:
            async with self.db.transaction(wake=(TASKS,)) as conn:
                return await submit_together(conn, new_tasks, limits)
        except StoreUnavailable:
            if await self.get_task(new_tasks[0].task_id) is None:
                raise
            # Committed by a try whose connection was lost as it committed: all of them.
            return [task.queued() for task in new_tasks]

    async def _submit(
        self, work: Callable[[Connection], Awaitable[Task]], together: str | None
    ) -> Task:
        if together is None:
            async with self.db.transaction(wake=(TASKS,)) as conn:
                return await work(conn)
        return await self._submits.write(work, (TASKS,), together)

    async def _submit_alone(self, write: Write) -> Any:
        answer = await write.work(self.db)
        await self.db.notify(*write.wake)
        return answer

    async def get_task_and_position(self, task_id: str) -> tuple[Task, int | None] | None:
        if self._status_reads is None:
            return await task_reads.get_task_and_position(self.db, task_id)
        # Status reads are the hot path of a busy service: those that arrive
        # while others run are answered together.
        return task_reads.with_position(await self._status_reads.get(task_id))

    async def claim_task(
        self, models: Sequence[str], worker_id: str, lease_seconds: float
    ) -> Claim | None:
        claims = await self.claim_batch(models, worker_id, lease_seconds, limit=1, window=0)
        return claims[0] if claims else None

    async def wait_for_task(self, at_most: float) -> None:
        await self.db.wait(TASKS, at_most)

    async def wait_for_callback(self, at_most: float) -> None:
        await self.db.wait(CALLBACKS, at_most)

    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        return await self.db.task_changes(at_most)

    # Tasks and the queue
    get_task = _on_db(task_reads.get_task)
    list_tasks = _on_db(task_reads.list_tasks)
    task_states = _on_db(task_reads.task_states)
    queue_depths = _on_db(task_reads.queue_depths)
    claim_batch = _on_db(queue.claim_batch)
    report_progress = _on_db(queue.report_progress)
    record_upstream = _on_db(queue.record_upstream)
    cancel_task = _ending(queue.cancel_task)
    finish_task = _ending(queue.finish_task)
    fail_task = _ending(queue.fail_task)
    release_task = _ending(queue.release_task)
    requeue_expired = _ending(queue.requeue_expired)
    # Accounts, credits and keys
    create_account = _on_db(credits.create_account)
    get_account = _on_db(credits.get_account)
    account_by_email = _on_db(credits.account_by_email)
    grant_credits = _on_db(credits.grant_credits)
    ledger = _on_db(credits.ledger)
    create_first_key = _on_db(keys.create_first_key)
    create_key = _on_db(keys.create_key)
    key_for_hash = _on_db(keys.key_for_hash)
    list_keys = _on_db(keys.list_keys)
    revoke_key = _on_db(keys.revoke_key)
    # Callbacks and their signing secrets
    claim_callbacks = _on_db(callbacks.claim_callbacks)
    release_callbacks = _on_db(callbacks.release_callbacks)
    next_callback_at = _on_db(callbacks.next_callback_at)
    record_attempt = _on_db(callbacks.record_attempt)
    record_event = _on_db(callbacks.record_event)
    callback_events = _on_db(callbacks.callback_events)
    redeliver_callback = _on_db(callbacks.redeliver_callback)
    pending_callbacks = _on_db(callbacks.pending_callbacks)
    webhook_secret = _on_db(callbacks.webhook_secret)
    rotate_webhook_secret = _on_db(callbacks.rotate_webhook_secret)
    # Workers and files
    record_heartbeat = _on_db(workers.record_heartbeat)
    forget_worker = _on_db(workers.forget_worker)
    live_workers = _on_db(workers.live_workers)
    add_upload = _on_db(files.add_upload)
    get_upload = _on_db(files.get_upload)
    expired_uploads = _on_db(files.expired_uploads)
    forget_uploads = _on_db(files.forget_uploads)
    tasks_with_files = _on_db(files.tasks_with_files)
    mark_files_expired = _on_db(files.mark_files_expired)
