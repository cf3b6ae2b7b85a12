"""The queue's moves: claims under a lease, progress, and the ways a task ends.

Every status change is one UPDATE made by `_move`, which refuses a move that
`tasks.TRANSITIONS` does not allow and puts the source status in its WHERE
clause, so a task leaves each status once. An ending writes, in the same
transaction, its callback (`callbacks.py`) and its credits (`credits.py`).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import sqlalchemy as sa

from fluxserve.store import callbacks, credits
from fluxserve.store.base import LeaseState, Outcome
from fluxserve.store.connection import Connection, Database
from fluxserve.store.rows import TASK_BY_ID, task_from_row
from fluxserve.store.schema import tasks
from fluxserve.store.wakeups import CALLBACKS, TASKS
from fluxserve.tasks import CANCELLED_MESSAGE, Claim, Task, TaskInput, TaskStatus, can_move

LOST_WORKER_MESSAGE = "The worker running this task was lost {attempts} times; giving up"
SWEEP_LOCK = 0x464C5558_01
"""PostgreSQL's advisory lock of the one sweeper at a time; arbitrary, fluxserve's own."""

OnEnd = Callable[[Task], None]
QUEUED, RUNNING = TaskStatus.NOT_STARTED, TaskStatus.RUNNING


def _move(source: TaskStatus, target: TaskStatus) -> sa.Update:
    """The one way the store changes a task's status: an UPDATE of tasks in `source`."""
    if not can_move(source, target):
        raise ValueError(f"a task cannot move from {source} to {target}")
    return tasks.update().where(tasks.c.status == source.value).values(status=target.value)


def _held_by(claim: Claim) -> sa.ColumnElement[bool]:
    """The row is still this claim's: leased with the claim's token (running, with `_move`)."""
    return sa.and_(tasks.c.task_id == claim.task.task_id, tasks.c.lease_token == claim.lease_token)


_PROGRESS = (
    tasks.update()
    .where(
        tasks.c.task_id == sa.bindparam("task_id"),
        tasks.c.status == RUNNING.value,
        tasks.c.lease_token == sa.bindparam("token"),
    )
    .values(
        progress=sa.case(
            (tasks.c.progress < sa.bindparam("progress"), sa.bindparam("progress")),
            else_=tasks.c.progress,
        ),
        lease_expires_at=sa.bindparam("expires_at", type_=sa.Float),
    )
    .returning(tasks.c.cancelled_at)
)


@dataclass(frozen=True)
class _Lease:
    """The lease a claim gives the tasks it takes: one worker, one token, one expiry."""

    worker_id: str
    token: str
    expires_at: float

    @property
    def params(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "now": time.time()}


def _claiming(which: sa.ColumnElement[bool], lease: Mapping[str, Any] | None = None) -> sa.Update:
    """Queued tasks matching `which` -> running under a lease (`_Lease.params`), given
    here or when the statement runs; returns their rows."""

    def given(name: str, type_: Any = None) -> Any:
        if lease is None:
            return sa.bindparam(name, type_=type_)
        return sa.bindparam(name, lease[name], type_=type_)

    return (
        _move(QUEUED, RUNNING)
        .where(which)
        .values(
            progress=0,
            worker_id=given("worker_id"),
            lease_token=given("token"),
            lease_expires_at=given("expires_at", sa.Float),
            attempts=tasks.c.attempts + 1,
            started_at=sa.func.coalesce(tasks.c.started_at, given("now", sa.Float)),
        )
        .returning(*tasks.c)
    )


@cache
def _claim_oldest(models: tuple[str, ...]) -> sa.Update:
    """The claim of the oldest queued task of `models`: built (and compiled) once each."""
    oldest = (
        sa.select(tasks.c.seq)
        # Equalities, not IN: a list would be bound only when the statement runs.
        .where(tasks.c.status == QUEUED.value, sa.or_(*(tasks.c.model == m for m in models)))
        .order_by(tasks.c.vtime, tasks.c.seq)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return _claiming(tasks.c.seq == oldest)


async def claim_batch(
    db: Database,
    models: Sequence[str],
    worker_id: str,
    lease_seconds: float,
    *,
    limit: int,
    window: int,
) -> list[Claim]:
    # One token for the batch: a lease is still per row, checked with the task id.
    lease = _Lease(worker_id, secrets.token_hex(8), time.time() + lease_seconds)
    changes: list[str] = []
    async with db.transaction(changes=changes) as conn:
        head = await conn.one(_claim_oldest(tuple(models)), **lease.params)
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


async def _claim_companions(
    conn: Connection, head: Any, lease: _Lease, limit: int, window: int
) -> list[Any]:
    """Up to `limit` of the next `window` queued tasks of `head`'s model that share its
    batch shape, claimed under `lease`."""
    shape = TaskInput.from_json(head.input).batch_shape
    if shape is None or window < 1:
        return []
    nearest = await conn.all(
        sa.select(tasks.c.seq, tasks.c.input)
        .where(tasks.c.status == QUEUED.value, tasks.c.model == head.model)
        .order_by(tasks.c.vtime, tasks.c.seq)
        .limit(window)
        .with_for_update(skip_locked=True)
    )
    alike = [row.seq for row in nearest if TaskInput.from_json(row.input).batch_shape == shape]
    if not alike:
        return []
    return await conn.all(_claiming(tasks.c.seq.in_(alike[:limit]), lease.params))


async def report_progress(
    db: Database, claim: Claim, progress: int, lease_seconds: float
) -> LeaseState:
    changes: list[str] = []
    async with db.transaction(changes=changes) as conn:
        row = await conn.one(
            _PROGRESS,
            task_id=claim.task.task_id,
            token=claim.lease_token,
            progress=progress,
            expires_at=time.time() + lease_seconds,
        )
        if row is not None:
            changes.append(claim.task.task_id)
    if row is None:
        return LeaseState.LOST
    return LeaseState.HELD if row.cancelled_at is None else LeaseState.CANCEL_REQUESTED


async def record_upstream(db: Database, claim: Claim, upstream: dict[str, Any]) -> bool:
    statement = tasks.update().where(_held_by(claim)).values(upstream=upstream)
    return await db.execute(statement) == 1


@asynccontextmanager
async def _ending(
    db: Database, on_end: OnEnd, changes: list[str], wake: tuple[str, ...] = (CALLBACKS,)
) -> AsyncIterator[tuple[Connection, list[Task]]]:
    """A transaction that may end tasks: those put in its list get their callback and
    their credits settled by `_ended`, and are told to `on_end` once it commits."""
    ended: list[Task] = []
    async with db.transaction(wake, changes) as conn:
        yield conn, ended
    for task in ended:
        on_end(task)


async def _ended(
    conn: Connection, task: Task, status: TaskStatus, now: float, ended: list[Task]
) -> None:
    """What every ending writes with its status: the callback, the credits."""
    if task.wants(status.value):
        await callbacks.queue_callback(conn, task, status.value, now)
    finished = status is TaskStatus.FINISHED
    await credits.settle(conn, task.account_id, task.task_id, task.price, finished)
    ended.append(task)


async def finish_task(db: Database, on_end: OnEnd, claim: Claim, outcome: Outcome) -> bool:
    files = [f.to_json() for f in outcome.files]
    values = dict(engine=outcome.engine, seed=outcome.seed, width=outcome.width, files=files)
    values.update(height=outcome.height, progress=100)
    return await _end(db, claim, TaskStatus.FINISHED, on_end, values)


async def fail_task(db: Database, on_end: OnEnd, claim: Claim, message: str) -> bool:
    return await _end(db, claim, TaskStatus.FAILED, on_end, {"error_message": message})


@cache
def _end_of(status: TaskStatus, columns: tuple[str, ...]) -> sa.Update:
    """A claim's task -> `status`, with `columns` given: built (and compiled) once each."""
    return (
        _move(RUNNING, status)
        .where(
            tasks.c.task_id == sa.bindparam("task_id"),
            tasks.c.lease_token == sa.bindparam("token"),
        )
        .values(
            finished_at=sa.bindparam("finished_at", type_=sa.Float),
            lease_expires_at=None,
            **{name: sa.bindparam(name, type_=tasks.c[name].type) for name in columns},
        )
        .returning(tasks.c.cancelled_at)
    )


async def _end(
    db: Database, claim: Claim, status: TaskStatus, on_end: OnEnd, values: dict[str, Any]
) -> bool:
    now = time.time()
    changes: list[str] = []
    async with _ending(db, on_end, changes) as (conn, ended):
        held = {"task_id": claim.task.task_id, "token": claim.lease_token}
        row = await conn.one(_end_of(status, tuple(values)), finished_at=now, **held, **values)
        if row is None:
            return False
        task = replace(claim.task, status=status, finished_at=now, cancelled_at=row.cancelled_at)
        changes.append(task.task_id)
        await _ended(conn, task, status, now, ended)
    return True


async def cancel_task(db: Database, on_end: OnEnd, task_id: str) -> Task | None:
    now = time.time()
    changes: list[str] = []
    async with _ending(db, on_end, changes) as (conn, ended):
        queued = await conn.one(
            _move(QUEUED, TaskStatus.FAILED)
            .where(tasks.c.task_id == task_id)
            .values(error_message=CANCELLED_MESSAGE, cancelled_at=now, finished_at=now)
            .returning(*tasks.c)
        )
        if queued is not None:
            task = task_from_row(queued)
            await _ended(conn, task, TaskStatus.FAILED, now, ended)
            changes.append(task_id)
            return task
        # Running: its worker sees the mark when it next reports progress.
        await conn.execute(
            tasks.update()
            .where(
                tasks.c.task_id == task_id,
                tasks.c.status == RUNNING.value,
                tasks.c.cancelled_at.is_(None),
            )
            .values(cancelled_at=now)
        )
        row = await conn.one(TASK_BY_ID, task_id=task_id)
    return None if row is None else task_from_row(row)


def _failed(message: str | sa.ColumnElement[str], now: float) -> dict[str, Any]:
    """The values of a running task's move to failed outside its worker's hands."""
    return {"finished_at": now, "lease_expires_at": None, "error_message": message}


_BACK_IN_THE_QUEUE = {"progress": 0, "worker_id": None, "lease_token": None}


async def release_task(db: Database, on_end: OnEnd, claim: Claim) -> bool:
    now = time.time()
    changes = [claim.task.task_id]
    async with _ending(db, on_end, changes, wake=(TASKS, CALLBACKS)) as (conn, ended):
        cancelled = await conn.one(
            _move(RUNNING, TaskStatus.FAILED)
            .where(_held_by(claim), tasks.c.cancelled_at.is_not(None))
            .values(_failed(CANCELLED_MESSAGE, now))
            .returning(*tasks.c)
        )
        if cancelled is not None:
            await _ended(conn, task_from_row(cancelled), TaskStatus.FAILED, now, ended)
            return True
        released = await conn.execute(
            _move(RUNNING, QUEUED)
            .where(_held_by(claim))
            .values(attempts=tasks.c.attempts - 1, lease_expires_at=None, **_BACK_IN_THE_QUEUE)
        )
    return released == 1


async def requeue_expired(db: Database, on_end: OnEnd, max_attempts: int) -> tuple[int, int]:
    now = time.time()
    expired = tasks.c.lease_expires_at < now
    changes: list[str] = []
    async with _ending(db, on_end, changes, wake=(TASKS, CALLBACKS)) as (conn, ended):
        if db.name == "postgresql":  # one sweeper at a time; SQLite's writers take turns
            turn = await conn.one(sa.select(sa.func.pg_try_advisory_xact_lock(SWEEP_LOCK)))
            if turn is None or not turn[0]:
                return 0, 0
        # A cancelled task whose worker was lost ends now, as cancelled.
        message = sa.case(
            (tasks.c.cancelled_at.is_not(None), CANCELLED_MESSAGE),
            else_=LOST_WORKER_MESSAGE.format(attempts=max_attempts),
        )
        gone = await conn.all(
            _move(RUNNING, TaskStatus.FAILED)
            .where(
                expired,
                sa.or_(tasks.c.attempts >= max_attempts, tasks.c.cancelled_at.is_not(None)),
            )
            .values(_failed(message, now))
            .returning(*tasks.c)
        )
        requeued = await conn.all(
            _move(RUNNING, QUEUED)
            .where(expired)
            .values(lease_expires_at=None, **_BACK_IN_THE_QUEUE)
            .returning(tasks.c.task_id)
        )
        # The accounts' rows after every task row, as a finish locks its task's and
        # then its account's: a sweep holding an account while it waited for a task
        # that a late worker is finishing would deadlock with it. In account order:
        # the one order for any transaction that locks several accounts.
        for row in sorted(gone, key=lambda row: (row.account_id or "", row.task_id)):
            await _ended(conn, task_from_row(row), TaskStatus.FAILED, now, ended)
        changes.extend(row.task_id for row in [*gone, *requeued])
    return len(requeued), len(gone)
