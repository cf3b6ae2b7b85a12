"""The callback outbox, its attempts, and the webhook signing secrets."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from fluxserve.errors import AlreadyStored
from fluxserve.store.base import (
    Attempt,
    CallbackEvent,
    CallbackRecord,
    CallbackState,
    WebhookSecret,
)
from fluxserve.store.connection import Connection, Database
from fluxserve.store.schema import callback_attempts, callbacks, webhook_secrets
from fluxserve.store.wakeups import CALLBACKS
from fluxserve.tasks import TERMINAL_EVENTS, Task, new_event_id

_NEW_EVENT = callbacks.insert()  # given whole rows (see `_event_row`): compiled once
_NEW_LOGGED_EVENT = callbacks.insert().returning(callbacks.c.callback_id)


def _event_row(
    event_id: str, task_id: str, url: str, event_type: str, at: float, **values: Any
) -> dict[str, Any]:
    return dict(
        event_id=event_id,
        task_id=task_id,
        url=url,
        origin=callback_origin(url),
        event_type=event_type,
        next_attempt_at=at,
        created_at=at,
        **values,
    )


async def queue_callback(conn: Connection, task: Task, event_type: str, now: float) -> str:
    """Queue the task's `event_type` event, due now, in the caller's transaction."""
    assert task.callback_url is not None
    event_id = new_event_id()
    pending = {"state": CallbackState.PENDING.value, "attempts": 0}
    row = _event_row(event_id, task.task_id, task.callback_url, event_type, now, **pending)
    await conn.execute(_NEW_EVENT, **row)
    return event_id


async def claim_callbacks(
    db: Database, limit: int, hold_seconds: float, skip_origins: Collection[str] = ()
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
    async with db.transaction() as conn:
        rows = await conn.all(
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


async def release_callbacks(db: Database, callback_ids: Sequence[int]) -> None:
    await db.execute(
        callbacks.update()
        .where(
            callbacks.c.callback_id.in_(list(callback_ids)),
            callbacks.c.state == CallbackState.SENDING.value,
        )
        .values(state=CallbackState.PENDING.value, next_attempt_at=time.time())
    )


async def next_callback_at(db: Database, skip_origins: Collection[str] = ()) -> float | None:
    (due,) = await db.one(
        sa.select(sa.func.min(callbacks.c.next_attempt_at)).where(
            callbacks.c.state.in_(_OUTBOX),
            callbacks.c.origin.not_in(list(skip_origins)),
        )
    )
    return None if due is None else float(due)


async def record_attempt(
    db: Database, callback_id: int, attempt: Attempt, *, retry_at: float | None
) -> None:
    values: dict[str, Any] = {"attempts": callbacks.c.attempts + 1, "last_error": attempt.error}
    if attempt.delivered:
        values.update(state=CallbackState.DELIVERED.value, delivered_at=_ended(attempt))
    elif retry_at is not None:
        values.update(state=CallbackState.PENDING.value, next_attempt_at=retry_at)
    else:
        values.update(state=CallbackState.FAILED.value)
    # A retry only needs this process's dispatcher to recompute its wait.
    async with db.transaction(wake=(CALLBACKS,) if retry_at is not None else ()) as conn:
        await conn.execute(
            callbacks.update().where(callbacks.c.callback_id == callback_id).values(**values)
        )
        await conn.execute(_attempt_row(callback_id, attempt))


async def record_event(
    db: Database, task_id: str, event_id: str, event_type: str, url: str, attempt: Attempt
) -> None:
    state = CallbackState.DELIVERED if attempt.delivered else CallbackState.FAILED
    async with db.transaction() as conn:
        event = _event_row(
            event_id,
            task_id,
            url,
            event_type,
            attempt.attempted_at,
            state=state.value,
            attempts=1,
            last_error=attempt.error,
            delivered_at=_ended(attempt) if attempt.delivered else None,
        )
        row = await conn.one(_NEW_LOGGED_EVENT, **event)
        await conn.execute(_attempt_row(row.callback_id, attempt))


async def callback_events(db: Database, task_id: str) -> list[CallbackEvent]:
    rows = await db.all(
        callbacks.select().where(callbacks.c.task_id == task_id).order_by(callbacks.c.callback_id)
    )
    logged = await db.all(
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


async def redeliver_callback(db: Database, task: Task) -> str:
    assert task.status.terminal and task.callback_url is not None
    now = time.time()
    async with db.transaction(wake=(CALLBACKS,)) as conn:
        row = await conn.one(
            sa.select(callbacks.c.callback_id, callbacks.c.event_id).where(
                callbacks.c.task_id == task.task_id,
                callbacks.c.event_type.in_(TERMINAL_EVENTS),
            )
        )
        if row is None:
            return await queue_callback(conn, task, task.status.value, now)
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


async def pending_callbacks(db: Database) -> int:
    (count,) = await db.one(sa.select(sa.func.count()).where(callbacks.c.state.in_(_OUTBOX)))
    return int(count or 0)


async def webhook_secret(db: Database, key_id: str, candidate: str) -> WebhookSecret:
    found = await _webhook_secret(db, key_id)
    if found is not None:
        return found
    # Another process may make the key's secret first: that one holds.
    with contextlib.suppress(AlreadyStored):
        await db.execute(
            webhook_secrets.insert().values(key_id=key_id, secret=candidate, created_at=time.time())
        )
    made = await _webhook_secret(db, key_id)
    assert made is not None
    return made


async def rotate_webhook_secret(
    db: Database, key_id: str, new_secret: str, previous_expires_at: float
) -> WebhookSecret:
    now = time.time()
    # SET's right-hand sides read the row as it was: the old secret moves over. A key
    # whose secret is `new_secret` already was rotated by this call's own try, whose
    # commit reply was lost: run again, each statement here leaves it as it is.
    rotate = (
        webhook_secrets.update()
        .where(webhook_secrets.c.key_id == key_id, webhook_secrets.c.secret != new_secret)
        .values(
            previous_secret=webhook_secrets.c.secret,
            previous_expires_at=previous_expires_at,
            secret=new_secret,
            created_at=now,
        )
    )
    if await db.execute(rotate) == 0:
        try:  # the key's first secret, or the one this call made or rotated to already
            await db.execute(
                webhook_secrets.insert().values(key_id=key_id, secret=new_secret, created_at=now)
            )
        except AlreadyStored:
            # Ours, or another process made the key's first secret meanwhile: rotate that one.
            await db.execute(rotate)
    rotated = await _webhook_secret(db, key_id)
    assert rotated is not None
    return rotated


async def _webhook_secret(db: Database, key_id: str) -> WebhookSecret | None:
    row = await db.one(webhook_secrets.select().where(webhook_secrets.c.key_id == key_id))
    if row is None:
        return None
    return WebhookSecret(
        row.key_id, row.secret, row.created_at, row.previous_secret, row.previous_expires_at
    )


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
