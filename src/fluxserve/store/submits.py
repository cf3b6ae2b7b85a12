"""A submit: an earlier submit with the same Idempotency-Key, the key's limits, the
account's credits and the task's place in the fair queue are checked, and then
the task is queued; or several tasks are, all or none (`submit_together`).
Every statement is built once, here, so each database compiles it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from fluxserve.errors import Conflict, RateLimited
from fluxserve.store import credits
from fluxserve.store.base import IdempotencyKey, SubmitLimits
from fluxserve.store.connection import Connection
from fluxserve.store.rows import TASK_BY_ID, task_from_row
from fluxserve.store.schema import api_keys, idempotency_keys, tasks
from fluxserve.tasks import NewTask, Task, TaskStatus

_IDEMPOTENCY_KEY = sa.and_(
    idempotency_keys.c.account_id == sa.bindparam("scope"),
    idempotency_keys.c.idempotency_key == sa.bindparam("key"),
)
_EARLIER_SUBMIT = idempotency_keys.select().where(_IDEMPOTENCY_KEY)
_FORGET_SUBMIT = idempotency_keys.delete().where(_IDEMPOTENCY_KEY)

# Locks the key's row (PostgreSQL; SQLite writers take turns anyway), so two
# concurrent submits cannot both pass the counts that follow.
_LOCK_KEY = (
    sa.select(api_keys.c.key_id).where(api_keys.c.key_id == sa.bindparam("owner")).with_for_update()
)
_mine = tasks.c.owner == sa.bindparam("owner")
_recent = sa.and_(_mine, tasks.c.created_at > sa.bindparam("since", type_=sa.Float))
_RECENT_SUBMITS = sa.select(sa.func.count()).where(_recent)
# The recent submit whose minute ends as the room for the next ones opens.
_NTH_RECENT_SUBMIT = (
    sa.select(tasks.c.created_at)
    .where(_recent)
    .order_by(tasks.c.created_at)
    .limit(1)
    .offset(sa.bindparam("skip", type_=sa.Integer))
)
_ACTIVE_TASKS = sa.select(sa.func.count()).where(
    _mine,
    sa.or_(
        tasks.c.status == TaskStatus.NOT_STARTED.value,
        tasks.c.status == TaskStatus.RUNNING.value,
    ),
)
# Inserts are given whole rows; one object each, so each compiles once.
_NEW_TASK = tasks.insert()
_NEW_IDEMPOTENCY_KEY = idempotency_keys.insert()

_TASK_COLUMNS = (
    "task_id",
    "owner",
    "account_id",
    "model",
    "status",
    "progress",
    "input",
    "callback_url",
    "files",
    "attempts",
    "created_at",
    "callback_events",
    "price",
)
_KEY_COLUMNS = ("account_id", "idempotency_key", "request_hash", "task_id", "created_at")


def _given(table: sa.Table, names: Sequence[str]) -> list[Any]:
    """Bound parameters named as `table`'s columns, of their types."""
    return [sa.bindparam(name, type_=table.c[name].type) for name in names]


def _queue_in_one_statement(paid: bool, idempotent: bool) -> sa.Select[Any]:
    """The turn, the task, its hold and its Idempotency-Key, written by one statement
    (PostgreSQL's data-modifying WITH); a row only when the turn was taken."""
    turn = credits.turn(paid).cte("turn")
    new_task = (
        tasks.insert()
        .from_select(
            [*_TASK_COLUMNS, "vtime"],
            sa.select(*_given(tasks, _TASK_COLUMNS), turn.c.next_vtime - 1),
        )
        .returning(tasks.c.task_id)
        .cte("new_task")
    )
    writes = [credits.hold_in_one_statement(new_task)] if paid else []
    if idempotent:
        row = sa.select(*_given(idempotency_keys, _KEY_COLUMNS)).select_from(new_task)
        writes.append(idempotency_keys.insert().from_select(_KEY_COLUMNS, row).cte("new_key"))
    return sa.select(new_task.c.task_id).add_cte(*writes)


_QUEUE_IN_ONE_STATEMENT = {
    (paid, idempotent): _queue_in_one_statement(paid, idempotent)
    for paid in (False, True)
    for idempotent in (False, True)
}


async def submit(
    conn: Connection,
    task: NewTask,
    limits: SubmitLimits | None,
    idempotency: IdempotencyKey | None,
    *,
    in_one_statement: bool = False,
) -> Task:
    """Queue `task` once its checks pass; or the task an earlier submit with the same
    Idempotency-Key made. Refuses (an ApiError) before it writes anything.

    `in_one_statement` (PostgreSQL): the turn and every row a submit writes go in
    one statement, so it needs no transaction of its own unless `limits` are checked.
    """
    scope = task.account_id or task.owner
    if idempotency is not None:
        earlier = await _replay(conn, scope, idempotency, task.created_at)
        if earlier is not None:
            return earlier
    if limits is not None:
        await _check_limits(conn, task.owner, limits, task.created_at)
    row = _task_row(task)
    key_row = {} if idempotency is None else _key_row(task, scope, idempotency)
    queued = None
    if in_one_statement and task.account_id is not None:
        statement = _QUEUE_IN_ONE_STATEMENT[task.price > 0, idempotency is not None]
        queued = await conn.one(statement, **{**credits.turn_params(task), **row, **key_row})
        if queued is None and task.price > 0:
            await credits.refuse(conn, task)
        # None otherwise: no such account; the task queues as one of no account.
    if queued is None:
        vtime = await credits.take_turn(conn, task)
        await conn.execute(_NEW_TASK, **row, vtime=vtime)
        if idempotency is not None:
            await conn.execute(_NEW_IDEMPOTENCY_KEY, **key_row)
    return task.queued()


def _task_row(task: NewTask) -> dict[str, Any]:
    """The task's row, all but its vtime."""
    return dict(
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
    )


def _key_row(task: NewTask, scope: str, idempotency: IdempotencyKey) -> dict[str, Any]:
    return dict(
        account_id=scope,
        idempotency_key=idempotency.key,
        request_hash=idempotency.request_hash,
        task_id=task.task_id,
        created_at=task.created_at,
    )


async def _replay(
    conn: Connection, scope: str, idempotency: IdempotencyKey, now: float
) -> Task | None:
    """The task an earlier submit with this Idempotency-Key made, if it is still fresh."""
    row = await conn.one(_EARLIER_SUBMIT, scope=scope, key=idempotency.key)
    if row is None:
        return None
    if row.created_at <= now - idempotency.ttl:
        await conn.execute(_FORGET_SUBMIT, scope=scope, key=idempotency.key)
        return None
    if row.request_hash != idempotency.request_hash:
        raise Conflict(
            "Idempotency-Key was already used with a different request; "
            "use a new key for a new task"
        )
    earlier = await conn.one(TASK_BY_ID, task_id=row.task_id)
    return None if earlier is None else task_from_row(earlier)


async def submit_together(
    conn: Connection, new_tasks: Sequence[NewTask], limits: SubmitLimits | None
) -> list[Task]:
    """Queue every one of `new_tasks` (of one key) or none of them.

    The key's limits are checked for all of them at once, and the account's
    credits for their prices together, before the first is written: a request
    refused is refused whole, and leaves no task behind to count against the
    key's minute. Runs in a transaction of its own, so a turn still refused
    midway (another process spent the credits meanwhile) undoes the rest.
    """
    first = new_tasks[0]
    if limits is not None:
        await _check_limits(conn, first.owner, limits, first.created_at, len(new_tasks))
    await credits.check_covered(conn, new_tasks)
    return [await submit(conn, task, None, None) for task in new_tasks]


async def _check_limits(
    conn: Connection, owner: str, limits: SubmitLimits, now: float, wanted: int = 1
) -> None:
    """RateLimited unless the key has room for `wanted` more tasks under each limit;
    its submits take turns meanwhile."""
    await conn.one(_LOCK_KEY, owner=owner)
    if limits.per_minute is not None:
        since = now - 60
        (count,) = await conn.one(_RECENT_SUBMITS, owner=owner, since=since)
        if count + wanted > limits.per_minute:
            skip = count + wanted - limits.per_minute - 1
            row = await conn.one(_NTH_RECENT_SUBMIT, owner=owner, since=since, skip=skip)
            raise RateLimited(
                f"Rate limit reached: {limits.per_minute} submits per minute per API key"
                + _room(count, "in the last minute", wanted),
                retry_after=60 if row is None else row.created_at - since,
            )
    if limits.concurrent is not None:
        (active,) = await conn.one(_ACTIVE_TASKS, owner=owner)
        if active + wanted > limits.concurrent:
            raise RateLimited(
                f"Too many tasks at once: at most {limits.concurrent} queued or running "
                f"per API key{_room(active, 'queued or running', wanted)}; retry when tasks end",
                retry_after=1,
            )


def _room(have: int, what: str, wanted: int) -> str:
    """For a request of several tasks: why its tasks do not fit."""
    return "" if wanted == 1 else f" ({have} {what}, no room for {wanted} more)"
