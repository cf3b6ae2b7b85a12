"""The store on SQLAlchemy Core (async), shared by the SQLite and PostgreSQL backends.

The dialects differ only in how an engine is made, how writers take turns, and
how a write wakes the waiting workers and dispatchers: see `sqlite.py` and
`postgres.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fluxserve.errors import Conflict, InsufficientCredits, RateLimited, StoreUnavailable
from fluxserve.store.base import (
    ApiKeyRecord,
    Attempt,
    CallbackEvent,
    CallbackRecord,
    CallbackState,
    IdempotencyKey,
    LeaseState,
    Outcome,
    Store,
    SubmitLimits,
    TaskPage,
    WebhookSecret,
    WorkerRecord,
)
from fluxserve.store.direct import CompiledRead
from fluxserve.store.schema import (
    accounts,
    api_keys,
    callback_attempts,
    callbacks,
    idempotency_keys,
    tasks,
    webhook_secrets,
    workers,
)
from fluxserve.store.sql_accounts import (
    AccountQueries,
    LedgerKind,
    add_ledger_row,
    settle_task_credits,
)
from fluxserve.store.sql_files import FileQueries
from fluxserve.tasks import (
    CANCELLED_MESSAGE,
    TERMINAL_EVENTS,
    Claim,
    NewTask,
    ResultFile,
    Task,
    TaskInput,
    TaskStatus,
    new_event_id,
)

LOST_WORKER_MESSAGE = "The worker running this task was lost {attempts} times; giving up"


TASKS = "fluxserve_tasks"
CALLBACKS = "fluxserve_callbacks"
"""Wake-up channels: a task became claimable; a callback became due."""


def _row_to_task(row: Any) -> Task:
    return Task(
        task_id=row.task_id,
        owner=row.owner,
        model=row.model,
        input=TaskInput.from_json(row.input),
        callback_url=row.callback_url,
        status=TaskStatus(row.status),
        progress=row.progress,
        created_at=row.created_at,
        engine=row.engine,
        seed=row.seed,
        width=row.width,
        height=row.height,
        error_message=row.error_message,
        files=tuple(ResultFile.from_json(f) for f in row.files),
        attempts=row.attempts,
        started_at=row.started_at,
        finished_at=row.finished_at,
        callback_events=tuple(row.callback_events or TERMINAL_EVENTS),
        account_id=row.account_id,
        price=row.price,
        cancelled_at=row.cancelled_at,
        files_expired_at=row.files_expired_at,
    )


_KEY_BY_HASH = api_keys.select().where(api_keys.c.key_hash == sa.bindparam("key_hash"))
_TASK_BY_ID = tasks.select().where(tasks.c.task_id == sa.bindparam("task_id"))


def _queued_up_to(mine: Any) -> sa.ColumnElement[bool]:
    """Queued tasks of `mine`'s model claimed no later than it: (vtime, seq) order."""
    return sa.and_(
        tasks.c.status == TaskStatus.NOT_STARTED.value,
        tasks.c.model == mine.c.model,
        sa.tuple_(tasks.c.vtime, tasks.c.seq) <= sa.tuple_(mine.c.vtime, mine.c.seq),
    )


# The task by its id and, only while it is queued, a range count on the
# (status, model, vtime, seq) index correlated to that one row: no self-join,
# whose plan degrades badly on a table the planner has no statistics for.
_mine = tasks.alias("mine")
_TASK_AND_POSITION = sa.select(
    _mine,
    sa.case(
        (
            _mine.c.status == TaskStatus.NOT_STARTED.value,
            sa.select(sa.func.count()).where(_queued_up_to(_mine)).scalar_subquery(),
        )
    ).label("queue_position"),
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


class SqlStore(AccountQueries, FileQueries, Store):
    """Everything but the dialect's engine, write turns and wake-ups."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: AsyncEngine | None = None
        self._events = {TASKS: asyncio.Event(), CALLBACKS: asyncio.Event()}
        self._compiled_reads: dict[sa.Select[Any], CompiledRead] = {}

    def _create_engine(self) -> AsyncEngine:
        raise NotImplementedError

    async def start(self) -> None:
        self._engine = self._create_engine()
        async with self._write() as conn:
            await self._before_migrations(conn)
            await conn.run_sync(_upgrade)

    async def _before_migrations(self, conn: AsyncConnection) -> None:
        """Make concurrent starts take turns at migrating, where the dialect needs it."""

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("store not started")
        return self._engine

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        with _unavailable_on_connection_errors():
            async with self.engine.connect() as conn:
                yield conn

    async def _fetch_one(self, statement: sa.Select[Any], **params: Any) -> Any | None:
        """The first row of a hot read; the dialects run it on their driver directly."""
        async with self._read() as conn:
            return (await conn.execute(statement, params)).first()

    def _compiled(self, statement: sa.Select[Any]) -> CompiledRead:
        """`statement` compiled for this store's dialect, once."""
        compiled = self._compiled_reads.get(statement)
        if compiled is None:
            compiled = CompiledRead.of(statement, self.engine.dialect)
            self._compiled_reads[statement] = compiled
        return compiled

    @asynccontextmanager
    async def _write(self, wake: tuple[str, ...] = ()) -> AsyncIterator[AsyncConnection]:
        """A transaction; when it commits, wake whoever waits on the `wake` channels."""
        with _unavailable_on_connection_errors():
            async with self.engine.begin() as conn:
                yield conn
                await self._notify(conn, wake)
        for channel in wake:
            self._events[channel].set()

    async def _notify(self, conn: AsyncConnection, channels: tuple[str, ...]) -> None:
        """Tell other processes, inside the transaction; in-process waiters need nothing."""

    def _wake_local(self, channel: str) -> None:
        self._events[channel].set()

    async def _take_sweep_turn(self, conn: AsyncConnection) -> bool:
        """Whether this transaction may sweep now; one sweeper at a time."""
        return True

    # API keys ---------------------------------------------------------------
    async def create_key(
        self, key_id: str, name: str, key_hash: str, prefix: str, account_id: str
    ) -> None:
        async with self._write() as conn:
            await conn.execute(
                api_keys.insert().values(
                    key_id=key_id,
                    name=name,
                    key_hash=key_hash,
                    prefix=prefix,
                    created_at=time.time(),
                    account_id=account_id,
                )
            )

    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self._fetch_one(_KEY_BY_HASH, key_hash=key_hash)
        return None if row is None else _key_record(row)

    async def list_keys(self) -> list[ApiKeyRecord]:
        async with self._read() as conn:
            rows = await conn.execute(api_keys.select().order_by(api_keys.c.created_at))
            return [_key_record(row) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        async with self._write() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        return result.rowcount == 1

    # Tasks ------------------------------------------------------------------
    async def create_task(
        self,
        task: NewTask,
        *,
        limits: SubmitLimits | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Task:
        try:
            return await self._create_task(task, limits, idempotency)
        except sa.exc.IntegrityError:
            if idempotency is None:
                raise
            # A concurrent submit with the same key committed first: answer its task.
            return await self._create_task(task, limits, idempotency)

    async def _create_task(
        self, task: NewTask, limits: SubmitLimits | None, idempotency: IdempotencyKey | None
    ) -> Task:
        scope = task.account_id or task.owner
        async with self._write(wake=(TASKS,)) as conn:
            if idempotency is not None:
                earlier = await _replay(conn, scope, idempotency, task.created_at)
                if earlier is not None:
                    return earlier
            if limits is not None:
                await _check_limits(conn, task.owner, limits, task.created_at)
            vtime = await _take_turn(conn, task)
            await conn.execute(
                tasks.insert().values(
                    task_id=task.task_id,
                    owner=task.owner,
                    account_id=task.account_id,
                    model=task.model,
                    status=TaskStatus.NOT_STARTED.value,
                    progress=0,
                    input=task.input.to_json(),
                    callback_url=task.callback_url,
                    files=[],
                    attempts=0,
                    created_at=task.created_at,
                    callback_events=list(task.callback_events),
                    price=task.price,
                    vtime=vtime,
                )
            )
            if task.price > 0 and task.account_id is not None:
                await add_ledger_row(
                    conn, task.account_id, task.task_id, LedgerKind.HOLD, task.price
                )
            if idempotency is not None:
                await conn.execute(
                    idempotency_keys.insert().values(
                        account_id=scope,
                        idempotency_key=idempotency.key,
                        request_hash=idempotency.request_hash,
                        task_id=task.task_id,
                        created_at=task.created_at,
                    )
                )
        return Task(
            task_id=task.task_id,
            owner=task.owner,
            model=task.model,
            input=task.input,
            callback_url=task.callback_url,
            status=TaskStatus.NOT_STARTED,
            progress=0,
            created_at=task.created_at,
            callback_events=task.callback_events,
            account_id=task.account_id,
            price=task.price,
        )

    async def get_task(self, task_id: str) -> Task | None:
        row = await self._fetch_one(_TASK_BY_ID, task_id=task_id)
        return None if row is None else _row_to_task(row)

    async def get_task_and_position(self, task_id: str) -> tuple[Task, int | None] | None:
        row = await self._fetch_one(_TASK_AND_POSITION, task_id=task_id)
        return None if row is None else (_row_to_task(row), row.queue_position or None)

    async def queue_position(self, task_id: str) -> int | None:
        found = await self.get_task_and_position(task_id)
        return None if found is None else found[1]

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
        async with self._write() as conn:
            head = (await conn.execute(lease.claim(tasks.c.seq == oldest))).first()
            if head is None:
                return []
            rows = [head]
            if limit > 1:
                rows += await _claim_companions(conn, head, lease, limit - 1, window)
        # In queue order: a task skipped while another claim had it locked for a
        # look may come back as a companion of a later head.
        rows.sort(key=lambda row: (row.vtime, row.seq))
        return [Claim(_row_to_task(row), worker_id, lease.token) for row in rows]

    async def wait_for_task(self, at_most: float) -> None:
        await _wait(self._events[TASKS], at_most)

    async def report_progress(
        self, claim: Claim, progress: int, lease_seconds: float
    ) -> LeaseState:
        async with self._write() as conn:
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
        async with self._write(wake=(CALLBACKS,)) as conn:
            result = await conn.execute(
                tasks.update()
                .where(_held_by(claim))
                .values(status=status.value, finished_at=now, lease_expires_at=None, **values)
            )
            if result.rowcount != 1:
                return False
            await self._on_end(conn, claim.task, status, now)
        return True

    async def _on_end(
        self, conn: AsyncConnection, task: Task, status: TaskStatus, now: float
    ) -> None:
        """What every ending writes with its status: the callback, the credits."""
        if task.wants(status.value):
            await self._queue_callback(conn, task, status.value, now)
        finished = status is TaskStatus.FINISHED
        await settle_task_credits(conn, task.account_id, task.task_id, task.price, finished)

    async def cancel_task(self, task_id: str) -> Task | None:
        now = time.time()
        async with self._write(wake=(CALLBACKS,)) as conn:
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
                task = _row_to_task(queued)
                await self._on_end(conn, task, TaskStatus.FAILED, now)
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
            row = (await conn.execute(tasks.select().where(tasks.c.task_id == task_id))).first()
        return None if row is None else _row_to_task(row)

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
        if before is not None:
            statement = statement.where(tasks.c.seq < before)
        statement = statement.order_by(tasks.c.seq.desc()).limit(limit + 1)
        async with self._read() as conn:
            rows = (await conn.execute(statement)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return TaskPage([_row_to_task(r) for r in rows], rows[-1].seq if more else None)

    async def _queue_callback(
        self, conn: AsyncConnection, task: Task, event_type: str, now: float
    ) -> str:
        assert task.callback_url is not None
        event_id = new_event_id()
        await conn.execute(
            callbacks.insert().values(
                event_id=event_id,
                task_id=task.task_id,
                url=task.callback_url,
                origin=callback_origin(task.callback_url),
                event_type=event_type,
                state=CallbackState.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        return event_id

    async def release_task(self, claim: Claim) -> bool:
        now = time.time()
        async with self._write(wake=(TASKS, CALLBACKS)) as conn:
            cancelled = (
                await conn.execute(
                    tasks.update()
                    .where(_held_by(claim), tasks.c.cancelled_at.is_not(None))
                    .values(_failed(CANCELLED_MESSAGE, now))
                    .returning(*tasks.c)
                )
            ).first()
            if cancelled is not None:
                await self._on_end(conn, _row_to_task(cancelled), TaskStatus.FAILED, now)
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
        async with self._write(wake=(TASKS, CALLBACKS)) as conn:
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
                await self._on_end(conn, _row_to_task(row), TaskStatus.FAILED, now)
            requeued = await conn.execute(
                tasks.update()
                .where(expired)
                .values(
                    status=TaskStatus.NOT_STARTED.value,
                    progress=0,
                    worker_id=None,
                    lease_token=None,
                    lease_expires_at=None,
                )
            )
        return requeued.rowcount, len(gone)

    # Callback outbox --------------------------------------------------------
    async def claim_callbacks(
        self, limit: int, hold_seconds: float, skip_origins: Collection[str] = ()
    ) -> list[CallbackRecord]:
        now = time.time()
        due = (
            sa.select(callbacks.c.callback_id)
            .where(
                callbacks.c.state.in_(_OUTBOX),
                callbacks.c.next_attempt_at <= now,
                callbacks.c.origin.not_in(list(skip_origins)),
            )
            .order_by(callbacks.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with self._write() as conn:
            rows = await conn.execute(
                callbacks.update()
                .where(callbacks.c.callback_id.in_(due.scalar_subquery()))
                .values(state=CallbackState.SENDING.value, next_attempt_at=now + hold_seconds)
                .returning(
                    callbacks.c.callback_id,
                    callbacks.c.event_id,
                    callbacks.c.task_id,
                    callbacks.c.url,
                    callbacks.c.attempts,
                    callbacks.c.event_type,
                    callbacks.c.origin,
                )
            )
            return [
                CallbackRecord(
                    r.callback_id, r.event_id, r.task_id, r.url, r.attempts, r.event_type, r.origin
                )
                for r in rows
            ]

    async def release_callbacks(self, callback_ids: Sequence[int]) -> None:
        async with self._write() as conn:
            await conn.execute(
                callbacks.update()
                .where(
                    callbacks.c.callback_id.in_(list(callback_ids)),
                    callbacks.c.state == CallbackState.SENDING.value,
                )
                .values(state=CallbackState.PENDING.value, next_attempt_at=time.time())
            )

    async def next_callback_at(self, skip_origins: Collection[str] = ()) -> float | None:
        async with self._read() as conn:
            return await conn.scalar(
                sa.select(sa.func.min(callbacks.c.next_attempt_at)).where(
                    callbacks.c.state.in_(_OUTBOX),
                    callbacks.c.origin.not_in(list(skip_origins)),
                )
            )

    async def wait_for_callback(self, at_most: float) -> None:
        await _wait(self._events[CALLBACKS], at_most)

    async def record_attempt(
        self, callback_id: int, attempt: Attempt, *, retry_at: float | None
    ) -> None:
        values: dict[str, Any] = {"attempts": callbacks.c.attempts + 1, "last_error": attempt.error}
        if attempt.delivered:
            values.update(state=CallbackState.DELIVERED.value, delivered_at=_ended(attempt))
        elif retry_at is not None:
            values.update(state=CallbackState.PENDING.value, next_attempt_at=retry_at)
        else:
            values.update(state=CallbackState.FAILED.value)
        # A retry only needs this process's dispatcher to recompute its wait.
        async with self._write(wake=(CALLBACKS,) if retry_at is not None else ()) as conn:
            await conn.execute(
                callbacks.update().where(callbacks.c.callback_id == callback_id).values(**values)
            )
            await conn.execute(_attempt_row(callback_id, attempt))

    async def record_event(
        self, task_id: str, event_id: str, event_type: str, url: str, attempt: Attempt
    ) -> None:
        state = CallbackState.DELIVERED if attempt.delivered else CallbackState.FAILED
        async with self._write() as conn:
            callback_id = await conn.scalar(
                callbacks.insert()
                .values(
                    event_id=event_id,
                    task_id=task_id,
                    url=url,
                    origin=callback_origin(url),
                    event_type=event_type,
                    state=state.value,
                    attempts=1,
                    next_attempt_at=attempt.attempted_at,
                    last_error=attempt.error,
                    created_at=attempt.attempted_at,
                    delivered_at=_ended(attempt) if attempt.delivered else None,
                )
                .returning(callbacks.c.callback_id)
            )
            await conn.execute(_attempt_row(callback_id, attempt))

    async def callback_events(self, task_id: str) -> list[CallbackEvent]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    callbacks.select()
                    .where(callbacks.c.task_id == task_id)
                    .order_by(callbacks.c.callback_id)
                )
            ).all()
            logged = await conn.execute(
                callback_attempts.select()
                .where(callback_attempts.c.callback_id.in_([row.callback_id for row in rows]))
                .order_by(callback_attempts.c.attempt_id)
            )
            attempts: dict[int, list[Attempt]] = {}
            for a in logged:
                attempts.setdefault(a.callback_id, []).append(
                    Attempt(a.attempted_at, a.duration, a.status_code, a.error)
                )
        return [
            CallbackEvent(
                event_id=row.event_id,
                event_type=row.event_type,
                url=row.url,
                state=CallbackState(row.state),
                created_at=row.created_at,
                next_attempt_at=row.next_attempt_at if row.state in _OUTBOX else None,
                delivered_at=row.delivered_at,
                attempts=tuple(attempts.get(row.callback_id, ())),
            )
            for row in rows
        ]

    async def redeliver_callback(self, task: Task) -> str:
        assert task.status.terminal and task.callback_url is not None
        now = time.time()
        async with self._write(wake=(CALLBACKS,)) as conn:
            row = (
                await conn.execute(
                    sa.select(callbacks.c.callback_id, callbacks.c.event_id).where(
                        callbacks.c.task_id == task.task_id,
                        callbacks.c.event_type.in_(TERMINAL_EVENTS),
                    )
                )
            ).first()
            if row is None:
                return await self._queue_callback(conn, task, task.status.value, now)
            # Not while `sending`: a second dispatcher would send it twice at once.
            await conn.execute(
                callbacks.update()
                .where(
                    callbacks.c.callback_id == row.callback_id,
                    callbacks.c.state != CallbackState.SENDING.value,
                )
                .values(state=CallbackState.PENDING.value, attempts=0, next_attempt_at=now)
            )
            return str(row.event_id)

    async def pending_callbacks(self) -> int:
        async with self._read() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).where(callbacks.c.state.in_(_OUTBOX))
            )
        return int(count or 0)

    # Webhook signing secrets --------------------------------------------------
    async def webhook_secret(self, key_id: str, candidate: str) -> WebhookSecret:
        found = await self._webhook_secret(key_id)
        if found is not None:
            return found
        try:
            async with self._write() as conn:
                await conn.execute(
                    webhook_secrets.insert().values(
                        key_id=key_id, secret=candidate, created_at=time.time()
                    )
                )
        except sa.exc.IntegrityError:
            pass  # another process made the key's secret first; that one holds
        made = await self._webhook_secret(key_id)
        assert made is not None
        return made

    async def rotate_webhook_secret(
        self, key_id: str, new_secret: str, previous_expires_at: float
    ) -> WebhookSecret:
        now = time.time()
        # SET's right-hand sides read the row as it was: the old secret moves over.
        rotate = (
            webhook_secrets.update()
            .where(webhook_secrets.c.key_id == key_id)
            .values(
                previous_secret=webhook_secrets.c.secret,
                previous_expires_at=previous_expires_at,
                secret=new_secret,
                created_at=now,
            )
        )
        try:
            async with self._write() as conn:
                if (await conn.execute(rotate)).rowcount == 0:
                    await conn.execute(
                        webhook_secrets.insert().values(
                            key_id=key_id, secret=new_secret, created_at=now
                        )
                    )
        except sa.exc.IntegrityError:
            # Another process made the key's first secret meanwhile: rotate that one.
            async with self._write() as conn:
                await conn.execute(rotate)
        rotated = await self._webhook_secret(key_id)
        assert rotated is not None
        return rotated

    async def _webhook_secret(self, key_id: str) -> WebhookSecret | None:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    webhook_secrets.select().where(webhook_secrets.c.key_id == key_id)
                )
            ).first()
        if row is None:
            return None
        return WebhookSecret(
            row.key_id, row.secret, row.created_at, row.previous_secret, row.previous_expires_at
        )

    # The fleet --------------------------------------------------------------
    async def queue_depths(self) -> dict[str, int]:
        statement = (
            sa.select(tasks.c.model, sa.func.count())
            .where(tasks.c.status == TaskStatus.NOT_STARTED.value)
            .group_by(tasks.c.model)
        )
        async with self._read() as conn:
            return {model: count for model, count in await conn.execute(statement)}

    async def record_heartbeat(
        self, worker_id: str, models: Sequence[str], engine: str, state: str
    ) -> None:
        now = time.time()
        values = {"models": list(models), "engine": engine, "state": state, "last_seen": now}
        async with self._write() as conn:
            # Only this worker writes its row, so update-then-insert cannot race.
            updated = await conn.execute(
                workers.update().where(workers.c.worker_id == worker_id).values(**values)
            )
            if updated.rowcount == 0:
                await conn.execute(
                    workers.insert().values(worker_id=worker_id, started_at=now, **values)
                )

    async def forget_worker(self, worker_id: str) -> None:
        async with self._write() as conn:
            await conn.execute(workers.delete().where(workers.c.worker_id == worker_id))

    async def live_workers(self, seen_within: float) -> list[WorkerRecord]:
        statement = (
            workers.select()
            .where(workers.c.last_seen >= time.time() - seen_within)
            .order_by(workers.c.started_at)
        )
        async with self._read() as conn:
            return [
                WorkerRecord(
                    r.worker_id, tuple(r.models), r.engine, r.state, r.started_at, r.last_seen
                )
                for r in await conn.execute(statement)
            ]


# The states the outbox dispatcher looks at: due, or held by a dispatcher that
# may have died (claimed again once its hold runs out).
_OUTBOX = (CallbackState.PENDING.value, CallbackState.SENDING.value)


def callback_origin(url: str) -> str:
    """`scheme://host:port` of a callback URL, the default port spelled out."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{parts.hostname or ''}:{port}"


def _ended(attempt: Attempt) -> float:
    return attempt.attempted_at + attempt.duration


def _attempt_row(callback_id: int, attempt: Attempt) -> sa.Insert:
    return callback_attempts.insert().values(
        callback_id=callback_id,
        attempted_at=attempt.attempted_at,
        duration=attempt.duration,
        status_code=attempt.status_code,
        error=attempt.error,
    )


@contextlib.contextmanager
def _unavailable_on_connection_errors() -> Iterator[None]:
    """Connection-level failures become StoreUnavailable: callers retry or answer 503."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError, OSError) as exc:
        raise StoreUnavailable(f"database unavailable: {exc}") from exc
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(f"database connection lost: {exc}") from exc
        raise


def _key_record(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        row.key_id, row.name, row.prefix, row.created_at, row.revoked_at, row.account_id
    )


def _failed(message: str | sa.ColumnElement[str], now: float) -> dict[str, Any]:
    """The values of a running task's move to failed outside its worker's hands."""
    return {
        "status": TaskStatus.FAILED.value,
        "finished_at": now,
        "lease_expires_at": None,
        "error_message": message,
    }


async def _replay(
    conn: AsyncConnection, scope: str, idempotency: IdempotencyKey, now: float
) -> Task | None:
    """The task an earlier submit with this Idempotency-Key made, if it is still fresh."""
    key = sa.and_(
        idempotency_keys.c.account_id == scope,
        idempotency_keys.c.idempotency_key == idempotency.key,
    )
    row = (await conn.execute(idempotency_keys.select().where(key))).first()
    if row is None:
        return None
    if row.created_at <= now - idempotency.ttl:
        await conn.execute(idempotency_keys.delete().where(key))
        return None
    if row.request_hash != idempotency.request_hash:
        raise Conflict(
            "Idempotency-Key was already used with a different request; "
            "use a new key for a new task"
        )
    earlier = (await conn.execute(tasks.select().where(tasks.c.task_id == row.task_id))).first()
    return None if earlier is None else _row_to_task(earlier)


async def _check_limits(
    conn: AsyncConnection, owner: str, limits: SubmitLimits, now: float
) -> None:
    """RateLimited when the key is past a limit; its submits take turns meanwhile."""
    # Lock the key's row (PostgreSQL; SQLite writers take turns anyway) so two
    # concurrent submits cannot both pass the counts below.
    await conn.execute(
        sa.select(api_keys.c.key_id).where(api_keys.c.key_id == owner).with_for_update()
    )
    mine = tasks.c.owner == owner
    if limits.per_minute is not None:
        window = now - 60
        count, oldest = (
            await conn.execute(
                sa.select(sa.func.count(), sa.func.min(tasks.c.created_at)).where(
                    mine, tasks.c.created_at > window
                )
            )
        ).one()
        if count >= limits.per_minute:
            raise RateLimited(
                f"Rate limit reached: {limits.per_minute} submits per minute per API key",
                retry_after=oldest - window,
            )
    if limits.concurrent is not None:
        active = await conn.scalar(
            sa.select(sa.func.count()).where(
                mine,
                tasks.c.status.in_([TaskStatus.NOT_STARTED.value, TaskStatus.RUNNING.value]),
            )
        )
        if (active or 0) >= limits.concurrent:
            raise RateLimited(
                f"Too many tasks at once: at most {limits.concurrent} queued or running "
                "per API key; retry when one ends",
                retry_after=1,
            )


async def _take_turn(conn: AsyncConnection, task: NewTask) -> int:
    """The task's vtime: its place in the fair queue; holds its price from the account.

    Claims go in (vtime, seq) order. Each account's tasks take successive
    vtimes, and an account arriving at a busy queue starts just ahead of the
    queue's head: so it waits behind at most the running tasks, and then the
    accounts with queued work take turns, whatever their backlogs.
    """
    queued = sa.and_(tasks.c.status == TaskStatus.NOT_STARTED.value, tasks.c.model == task.model)
    head = await conn.scalar(sa.select(sa.func.min(tasks.c.vtime)).where(queued))
    if task.account_id is not None:
        start: sa.ColumnElement[int] = accounts.c.next_vtime
        if head is not None:
            start = sa.case((accounts.c.next_vtime >= head, accounts.c.next_vtime), else_=head - 1)
        turn = (
            accounts.update()
            .where(accounts.c.account_id == task.account_id)
            .values(next_vtime=start + 1, held=accounts.c.held + task.price)
            .returning(accounts.c.next_vtime)
        )
        if task.price > 0:
            turn = turn.where(accounts.c.balance - accounts.c.held >= task.price)
        row = (await conn.execute(turn)).first()
        if row is not None:
            return int(row.next_vtime) - 1
        if task.price > 0:
            available = await conn.scalar(
                sa.select(accounts.c.balance - accounts.c.held).where(
                    accounts.c.account_id == task.account_id
                )
            )
            raise InsufficientCredits(
                f"This task costs {task.price} credits; the account has {available or 0} available"
            )
    # A task of no known account queues at the back, in submit order.
    tail = await conn.scalar(sa.select(sa.func.max(tasks.c.vtime)).where(queued))
    return int(tail or 0)


async def _wait(event: asyncio.Event, at_most: float) -> None:
    # Clearing after the wake-up (not before) keeps a set() that lands between
    # a caller's empty poll and this wait from being lost.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), at_most)
    event.clear()


def _upgrade(connection: sa.Connection) -> None:
    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("fluxserve.store") / "migrations")
    )
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
