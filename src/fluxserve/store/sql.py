"""The store on SQLAlchemy Core (async), shared by the SQLite and PostgreSQL backends.

This module holds API keys, the task queue and the fleet; accounts
(`sql_accounts.py`), the callback outbox (`sql_callbacks.py`), task changes
(`sql_changes.py`) and files (`sql_files.py`) are mixed in, each on the
connection handling of `sql_base.py`, and a submit's checks are in `admission.py`.
The dialects differ only in how an engine is made, how writers take turns, how
a write wakes the waiting workers and dispatchers, and how hot reads reach the
driver: see `sqlite.py` and `postgres.py`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fluxserve.errors import AlreadyStored
from fluxserve.store.admission import submit
from fluxserve.store.base import (
    IdempotencyKey,
    LeaseState,
    Outcome,
    Store,
    SubmitLimits,
    TaskPage,
)
from fluxserve.store.direct import Program
from fluxserve.store.rows import TASK_BY_ID, task_from_row
from fluxserve.store.schema import (
    tasks,
)
from fluxserve.store.sql_accounts import (
    AccountQueries,
    settle_task_credits,
)
from fluxserve.store.sql_callbacks import CallbackQueries
from fluxserve.store.sql_changes import ChangeQueries
from fluxserve.store.sql_files import FileQueries
from fluxserve.store.sql_fleet import FleetQueries
from fluxserve.store.wakeups import CALLBACKS, TASKS, wait
from fluxserve.tasks import (
    CANCELLED_MESSAGE,
    Claim,
    NewTask,
    Task,
    TaskInput,
    TaskStatus,
)

LOST_WORKER_MESSAGE = "The worker running this task was lost {attempts} times; giving up"


def _queue_position(mine: Any) -> Any:
    """How many queued tasks of `mine`'s model are claimed no later than it: (vtime, seq) order.

    Two counts over plain ranges of the (status, model, vtime, seq) index: the
    tasks of earlier vtimes, and those of `mine`'s vtime up to its seq. SQLite
    walks such a range about a third faster than one bounded by a row value.
    """
    same_queue = sa.and_(
        tasks.c.status == TaskStatus.NOT_STARTED.value, tasks.c.model == mine.c.model
    )
    earlier = sa.select(sa.func.count()).where(same_queue, tasks.c.vtime < mine.c.vtime)
    tied = sa.select(sa.func.count()).where(
        same_queue, tasks.c.vtime == mine.c.vtime, tasks.c.seq <= mine.c.seq
    )
    return earlier.scalar_subquery() + tied.scalar_subquery()


# The task by its id and, only while it is queued, range counts on the
# (status, model, vtime, seq) index correlated to that one row: no self-join,
# whose plan degrades badly on a table the planner has no statistics for.
_mine = tasks.alias("mine")
TASK_AND_POSITION = sa.select(
    _mine,
    sa.case((_mine.c.status == TaskStatus.NOT_STARTED.value, _queue_position(_mine))).label(
        "queue_position"
    ),
).where(_mine.c.task_id == sa.bindparam("task_id"))


def _held_by(claim: Claim) -> sa.ColumnElement[bool]:
    """The row is still this claim's: running, and leased with the claim's token."""
    return sa.and_(
        tasks.c.task_id == claim.task.task_id,
        tasks.c.status == TaskStatus.RUNNING.value,
        tasks.c.lease_token == claim.lease_token,
    )


@dataclass(frozen=True)
class _Lease:
    """The lease a claim gives the tasks it takes: one worker, one token, one expiry."""

    worker_id: str
    token: str
    expires_at: float

    def claim(self, which: sa.ColumnElement[bool]) -> sa.Update:
        """Queued tasks matching `which` -> running under this lease; returns their rows."""
        now = time.time()
        return (
            tasks.update()
            .where(which, tasks.c.status == TaskStatus.NOT_STARTED.value)
            .values(
                status=TaskStatus.RUNNING.value,
                progress=0,
                worker_id=self.worker_id,
                lease_token=self.token,
                lease_expires_at=self.expires_at,
                attempts=tasks.c.attempts + 1,
                started_at=sa.func.coalesce(tasks.c.started_at, now),
            )
            .returning(*tasks.c)
        )


async def _claim_companions(
    conn: AsyncConnection, head: Any, lease: _Lease, limit: int, window: int
) -> list[Any]:
    """Up to `limit` of the next `window` queued tasks of `head`'s model that share its
    batch shape, claimed under `lease`."""
    shape = TaskInput.from_json(head.input).batch_shape
    if shape is None or window < 1:
        return []
    nearest = await conn.execute(
        sa.select(tasks.c.seq, tasks.c.input)
        .where(tasks.c.status == TaskStatus.NOT_STARTED.value, tasks.c.model == head.model)
        .order_by(tasks.c.vtime, tasks.c.seq)
        .limit(window)
        .with_for_update(skip_locked=True)
    )
    alike = [row.seq for row in nearest if TaskInput.from_json(row.input).batch_shape == shape]
    if not alike:
        return []
    return list((await conn.execute(lease.claim(tasks.c.seq.in_(alike[:limit])))).all())


class SqlStore(AccountQueries, CallbackQueries, ChangeQueries, FileQueries, FleetQueries, Store):
    """Everything but the dialect's engine, write turns and wake-ups."""

    # Tasks ------------------------------------------------------------------
    async def create_task(
        self,
        task: NewTask,
        *,
        limits: SubmitLimits | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Task:
        def program() -> Program[Task]:
            return submit(task, limits, idempotency, in_one_statement=self.WRITES_IN_WITH)

        # Without per-key limits to check, a submit refuses before it writes and
        # locks no row but its account's: it may share a transaction with the
        # submits arriving beside it (see `group_commit.py`).
        together = task.account_id if limits is None else None
        try:
            return await self._transact(program, wake=(TASKS,), together=together)
        except AlreadyStored:
            committed = await self.get_task(task.task_id)
            if committed is not None:
                return committed  # by a try whose connection was lost as it committed
            if idempotency is None:
                raise
            # A concurrent submit with the same key committed first: answer its task.
            return await self._transact(program, wake=(TASKS,), together=together)

    async def get_task(self, task_id: str) -> Task | None:
        row = await self._fetch_one(TASK_BY_ID, task_id=task_id)
        return None if row is None else task_from_row(row)

    async def get_task_and_position(self, task_id: str) -> tuple[Task, int | None] | None:
        row = await self._fetch_one(TASK_AND_POSITION, task_id=task_id)
        return None if row is None else (task_from_row(row), row.queue_position or None)

    async def claim_task(
        self, models: Sequence[str], worker_id: str, lease_seconds: float
    ) -> Claim | None:
        claims = await self.claim_batch(models, worker_id, lease_seconds, limit=1, window=0)
        return claims[0] if claims else None

    async def claim_batch(
        self,
        models: Sequence[str],
        worker_id: str,
        lease_seconds: float,
        *,
        limit: int,
        window: int,
    ) -> list[Claim]:
        # One token for the batch: a lease is still per row, checked with the task id.
        lease = _Lease(worker_id, secrets.token_hex(8), time.time() + lease_seconds)
        oldest = (
            sa.select(tasks.c.seq)
            .where(tasks.c.status == TaskStatus.NOT_STARTED.value, tasks.c.model.in_(models))
            .order_by(tasks.c.vtime, tasks.c.seq)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        changes: list[str] = []
        async with self._write(changes=changes) as conn:
            head = (await conn.execute(lease.claim(tasks.c.seq == oldest))).first()
            if head is None:
                return []
            rows = [head]
            if limit > 1:
                rows += await _claim_companions(conn, head, lease, limit - 1, window)
            changes.extend(row.task_id for row in rows)
        # In queue order: a task skipped while another claim had it locked for a
        # look may come back as a companion of a later head.
        rows.sort(key=lambda row: (row.vtime, row.seq))
        return [Claim(task_from_row(row), worker_id, lease.token) for row in rows]

    async def wait_for_task(self, at_most: float) -> None:
        await wait(self._events[TASKS], at_most)

    async def report_progress(
        self, claim: Claim, progress: int, lease_seconds: float
    ) -> LeaseState:
        changes: list[str] = []
        async with self._write(changes=changes) as conn:
            row = (
                await conn.execute(
                    tasks.update()
                    .where(_held_by(claim))
                    .values(
                        progress=sa.case(
                            (tasks.c.progress < progress, progress), else_=tasks.c.progress
                        ),
                        lease_expires_at=time.time() + lease_seconds,
                    )
                    .returning(tasks.c.cancelled_at)
                )
            ).first()
            if row is not None:
                changes.append(claim.task.task_id)
        if row is None:
            return LeaseState.LOST
        return LeaseState.HELD if row.cancelled_at is None else LeaseState.CANCEL_REQUESTED

    async def finish_task(self, claim: Claim, outcome: Outcome) -> bool:
        return await self._end(
            claim,
            status=TaskStatus.FINISHED,
            progress=100,
            engine=outcome.engine,
            seed=outcome.seed,
            width=outcome.width,
            height=outcome.height,
            files=[f.to_json() for f in outcome.files],
        )

    async def fail_task(self, claim: Claim, message: str) -> bool:
        return await self._end(claim, status=TaskStatus.FAILED, error_message=message)

    async def _end(self, claim: Claim, *, status: TaskStatus, **values: Any) -> bool:
        now = time.time()
        changes: list[str] = []
        async with self._ending(wake=(CALLBACKS,), changes=changes) as (conn, ended):
            row = (
                await conn.execute(
                    tasks.update()
                    .where(_held_by(claim))
                    .values(status=status.value, finished_at=now, lease_expires_at=None, **values)
                    .returning(tasks.c.cancelled_at)
                )
            ).first()
            if row is None:
                return False
            task = replace(
                claim.task, status=status, finished_at=now, cancelled_at=row.cancelled_at
            )
            changes.append(task.task_id)
            await self._on_end(conn, task, status, now, ended)
        return True

    async def _on_end(
        self, conn: AsyncConnection, task: Task, status: TaskStatus, now: float, ended: list[Task]
    ) -> None:
        """What every ending writes with its status: the callback, the credits; and
        the task goes on `ended`, for the listeners."""
        if task.wants(status.value):
            await self._queue_callback(conn, task, status.value, now)
        finished = status is TaskStatus.FINISHED
        await settle_task_credits(conn, task.account_id, task.task_id, task.price, finished)
        ended.append(task)

    async def cancel_task(self, task_id: str) -> Task | None:
        now = time.time()
        changes: list[str] = []
        async with self._ending(wake=(CALLBACKS,), changes=changes) as (conn, ended):
            queued = (
                await conn.execute(
                    tasks.update()
                    .where(
                        tasks.c.task_id == task_id,
                        tasks.c.status == TaskStatus.NOT_STARTED.value,
                    )
                    .values(
                        status=TaskStatus.FAILED.value,
                        error_message=CANCELLED_MESSAGE,
                        cancelled_at=now,
                        finished_at=now,
                    )
                    .returning(*tasks.c)
                )
            ).first()
            if queued is not None:
                task = task_from_row(queued)
                await self._on_end(conn, task, TaskStatus.FAILED, now, ended)
                changes.append(task_id)
                return task
            # Running: its worker sees the mark when it next reports progress.
            await conn.execute(
                tasks.update()
                .where(
                    tasks.c.task_id == task_id,
                    tasks.c.status == TaskStatus.RUNNING.value,
                    tasks.c.cancelled_at.is_(None),
                )
                .values(cancelled_at=now)
            )
            row = (await conn.execute(TASK_BY_ID, {"task_id": task_id})).first()
        return None if row is None else task_from_row(row)

    async def list_tasks(
        self,
        account_id: str,
        *,
        status: str | None,
        model: str | None,
        limit: int,
        before: int | None,
    ) -> TaskPage:
        statement = tasks.select().where(tasks.c.account_id == account_id)
        if status is not None:
            statement = statement.where(tasks.c.status == status)
        if model is not None:
            statement = statement.where(tasks.c.model == model)
        # A cursor past every seq the column can hold leaves no task out; compared
        # as it is, PostgreSQL would refuse it as out of range for the column.
        if before is not None and before <= self.MAX_SEQ:
            statement = statement.where(tasks.c.seq < before)
        statement = statement.order_by(tasks.c.seq.desc()).limit(limit + 1)
        async with self._read() as conn:
            rows = (await conn.execute(statement)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return TaskPage([task_from_row(r) for r in rows], rows[-1].seq if more else None)

    async def release_task(self, claim: Claim) -> bool:
        now = time.time()
        changes = [claim.task.task_id]
        async with self._ending(wake=(TASKS, CALLBACKS), changes=changes) as (conn, ended):
            cancelled = (
                await conn.execute(
                    tasks.update()
                    .where(_held_by(claim), tasks.c.cancelled_at.is_not(None))
                    .values(_failed(CANCELLED_MESSAGE, now))
                    .returning(*tasks.c)
                )
            ).first()
            if cancelled is not None:
                await self._on_end(conn, task_from_row(cancelled), TaskStatus.FAILED, now, ended)
                return True
            result = await conn.execute(
                tasks.update()
                .where(_held_by(claim))
                .values(
                    status=TaskStatus.NOT_STARTED.value,
                    progress=0,
                    attempts=tasks.c.attempts - 1,
                    worker_id=None,
                    lease_token=None,
                    lease_expires_at=None,
                )
            )
        return result.rowcount == 1

    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        now = time.time()
        expired = sa.and_(
            tasks.c.status == TaskStatus.RUNNING.value, tasks.c.lease_expires_at < now
        )
        changes: list[str] = []
        async with self._ending(wake=(TASKS, CALLBACKS), changes=changes) as (conn, ended):
            if not await self._take_sweep_turn(conn):
                return 0, 0
            # A cancelled task whose worker was lost ends now, as cancelled.
            message = sa.case(
                (tasks.c.cancelled_at.is_not(None), CANCELLED_MESSAGE),
                else_=LOST_WORKER_MESSAGE.format(attempts=max_attempts),
            )
            gone = (
                await conn.execute(
                    tasks.update()
                    .where(
                        expired,
                        sa.or_(tasks.c.attempts >= max_attempts, tasks.c.cancelled_at.is_not(None)),
                    )
                    .values(_failed(message, now))
                    .returning(*tasks.c)
                )
            ).all()
            for row in gone:
                await self._on_end(conn, task_from_row(row), TaskStatus.FAILED, now, ended)
            requeued = (
                await conn.execute(
                    tasks.update()
                    .where(expired)
                    .values(
                        status=TaskStatus.NOT_STARTED.value,
                        progress=0,
                        worker_id=None,
                        lease_token=None,
                        lease_expires_at=None,
                    )
                    .returning(tasks.c.task_id)
                )
            ).all()
            changes.extend(row.task_id for row in [*gone, *requeued])
        return len(requeued), len(gone)


def _failed(message: str | sa.ColumnElement[str], now: float) -> dict[str, Any]:
    """The values of a running task's move to failed outside its worker's hands."""
    return {
        "status": TaskStatus.FAILED.value,
        "finished_at": now,
        "lease_expires_at": None,
        "error_message": message,
    }
