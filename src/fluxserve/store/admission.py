"""A submit's transaction, as one program (see `direct.py`): an earlier submit with
the same Idempotency-Key, the key's limits, the account's credits and the task's
place in the fair queue are checked, and then the task is queued.

Every statement is built once, here, so each store compiles it once for its
driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from fluxserve.errors import Conflict, InsufficientCredits, RateLimited
from fluxserve.store.base import IdempotencyKey, SubmitLimits
from fluxserve.store.direct import Program, Step
from fluxserve.store.rows import TASK_BY_ID, task_from_row
from fluxserve.store.schema import accounts, api_keys, credit_ledger, idempotency_keys, tasks
from fluxserve.store.sql_accounts import LedgerKind
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
_RECENT_SUBMITS = sa.select(sa.func.count(), sa.func.min(tasks.c.created_at)).where(
    _mine, tasks.c.created_at > sa.bindparam("since", type_=sa.Float)
)
_ACTIVE_TASKS = sa.select(sa.func.count()).where(
    _mine,
    sa.or_(
        tasks.c.status == TaskStatus.NOT_STARTED.value,
        tasks.c.status == TaskStatus.RUNNING.value,
    ),
)

_queued = sa.and_(
    tasks.c.status == TaskStatus.NOT_STARTED.value, tasks.c.model == sa.bindparam("model")
)
_price = sa.bindparam("price", type_=sa.BigInteger)
# The queue's head is a subquery (the account's own clock when the queue is
# empty), so a turn is one statement.
_head = sa.func.coalesce(
    sa.select(sa.func.min(tasks.c.vtime)).where(_queued).scalar_subquery(),
    accounts.c.next_vtime,
)
_start = sa.case((accounts.c.next_vtime >= _head, accounts.c.next_vtime), else_=_head - 1)
_TURN = (
    accounts.update()
    .where(accounts.c.account_id == sa.bindparam("account"))
    .values(next_vtime=_start + 1, held=accounts.c.held + _price)
    .returning(accounts.c.next_vtime)
)
_PAID_TURN = _TURN.where(accounts.c.balance - accounts.c.held >= _price)
_AVAILABLE = sa.select(accounts.c.balance - accounts.c.held).where(
    accounts.c.account_id == sa.bindparam("account")
)
_QUEUE_TAIL = sa.select(sa.func.max(tasks.c.vtime)).where(_queued)
# Inserts are given whole rows; one object each, so each compiles once.
_NEW_TASK = tasks.insert()
_NEW_HOLD = credit_ledger.insert()
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


def _given(table: sa.Table, names: Sequence[str]) -> list[Any]:
    """Bound parameters named as `table`'s columns, of their types."""
    return [sa.bindparam(name, type_=table.c[name].type) for name in names]


def _queue_in_one_statement(paid: bool, idempotent: bool) -> sa.Select[Any]:
    """The turn, the task, its hold and its Idempotency-Key, written by one statement
    (PostgreSQL's data-modifying WITH); a row only when the turn was taken."""
    turn = (_PAID_TURN if paid else _TURN).cte("turn")
    new_task = (
        tasks.insert()
        .from_select(
            [*_TASK_COLUMNS, "vtime"],
            sa.select(*_given(tasks, _TASK_COLUMNS), turn.c.next_vtime - 1),
        )
        .returning(tasks.c.task_id)
        .cte("new_task")
    )
    writes = []
    if paid:
        hold = sa.select(
            *_given(credit_ledger, ["account_id", "task_id"]),
            sa.literal(LedgerKind.HOLD),
            _price,
            sa.null(),
            sa.bindparam("created_at", type_=sa.Float),
        ).select_from(new_task)
        columns = ["account_id", "task_id", "kind", "amount", "note", "created_at"]
        writes.append(credit_ledger.insert().from_select(columns, hold).cte("hold"))
    if idempotent:
        columns = ["account_id", "idempotency_key", "request_hash", "task_id", "created_at"]
        row = sa.select(*_given(idempotency_keys, columns)).select_from(new_task)
        writes.append(idempotency_keys.insert().from_select(columns, row).cte("new_key"))
    return sa.select(new_task.c.task_id).add_cte(*writes)


_QUEUE_IN_ONE_STATEMENT = {
    (paid, idempotent): _queue_in_one_statement(paid, idempotent)
    for paid in (False, True)
    for idempotent in (False, True)
}


def submit(
    task: NewTask,
    limits: SubmitLimits | None,
    idempotency: IdempotencyKey | None,
    *,
    in_one_statement: bool = False,
) -> Program[Task]:
    """Queue `task` once its checks pass; or the task an earlier submit with the same
    Idempotency-Key made.

    `in_one_statement` (PostgreSQL): the turn and every row a submit writes go in
    one statement, so the program writes once and needs no transaction of its
    own unless `limits` are checked.
    """
    scope = task.account_id or task.owner
    if idempotency is not None:
        earlier = yield from _replay(scope, idempotency, task.created_at)
        if earlier is not None:
            return earlier
    if limits is not None:
        yield from _check_limits(task.owner, limits, task.created_at)
    rows = _rows(task, scope, idempotency)
    queued = None
    if in_one_statement and task.account_id is not None:
        statement = _QUEUE_IN_ONE_STATEMENT[task.price > 0, idempotency is not None]
        queued = yield Step(statement, {**rows.turn, **rows.task, **rows.idempotency})
        if queued is None and task.price > 0:
            yield from _refuse(task)
        # None otherwise: no such account; the task queues as one of no account.
    if queued is None:
        vtime = yield from _take_turn(task)
        yield Step(_NEW_TASK, {**rows.task, "vtime": vtime})
        if task.price > 0 and task.account_id is not None:
            yield Step(_NEW_HOLD, rows.hold)
        if idempotency is not None:
            yield Step(_NEW_IDEMPOTENCY_KEY, rows.idempotency)
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


@dataclass(frozen=True)
class _Rows:
    """What a submit writes, by bound-parameter name: the turn's parameters, and the
    task's (all but its vtime), the hold's and the Idempotency-Key's rows."""

    turn: dict[str, Any]
    task: dict[str, Any]
    hold: dict[str, Any]
    idempotency: dict[str, Any]


def _rows(task: NewTask, scope: str, idempotency: IdempotencyKey | None) -> _Rows:
    return _Rows(
        turn={"account": task.account_id, "model": task.model, "price": task.price},
        task=dict(
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
        ),
        hold=dict(
            account_id=task.account_id,
            task_id=task.task_id,
            kind=LedgerKind.HOLD,
            amount=task.price,
            note=None,
            created_at=task.created_at,
        ),
        idempotency={}
        if idempotency is None
        else dict(
            account_id=scope,
            idempotency_key=idempotency.key,
            request_hash=idempotency.request_hash,
            task_id=task.task_id,
            created_at=task.created_at,
        ),
    )


def _replay(scope: str, idempotency: IdempotencyKey, now: float) -> Program[Task | None]:
    """The task an earlier submit with this Idempotency-Key made, if it is still fresh."""
    key = {"scope": scope, "key": idempotency.key}
    row = yield Step(_EARLIER_SUBMIT, key)
    if row is None:
        return None
    if row.created_at <= now - idempotency.ttl:
        yield Step(_FORGET_SUBMIT, key)
        return None
    if row.request_hash != idempotency.request_hash:
        raise Conflict(
            "Idempotency-Key was already used with a different request; "
            "use a new key for a new task"
        )
    earlier = yield Step(TASK_BY_ID, {"task_id": row.task_id})
    return None if earlier is None else task_from_row(earlier)


def _check_limits(owner: str, limits: SubmitLimits, now: float) -> Program[None]:
    """RateLimited when the key is past a limit; its submits take turns meanwhile."""
    yield Step(_LOCK_KEY, {"owner": owner})
    if limits.per_minute is not None:
        since = now - 60
        count, oldest = yield Step(_RECENT_SUBMITS, {"owner": owner, "since": since})
        if count >= limits.per_minute:
            raise RateLimited(
                f"Rate limit reached: {limits.per_minute} submits per minute per API key",
                retry_after=oldest - since,
            )
    if limits.concurrent is not None:
        (active,) = yield Step(_ACTIVE_TASKS, {"owner": owner})
        if active >= limits.concurrent:
            raise RateLimited(
                f"Too many tasks at once: at most {limits.concurrent} queued or running "
                "per API key; retry when one ends",
                retry_after=1,
            )


def _take_turn(task: NewTask) -> Program[int]:
    """The task's vtime: its place in the fair queue; holds its price from the account.

    Claims go in (vtime, seq) order. Each account's tasks take successive
    vtimes, and an account arriving at a busy queue starts just ahead of the
    queue's head: so it waits behind at most the running tasks, and then the
    accounts with queued work take turns, whatever their backlogs.
    """
    if task.account_id is not None:
        params = {"account": task.account_id, "model": task.model, "price": task.price}
        turn = yield Step(_PAID_TURN if task.price > 0 else _TURN, params)
        if turn is not None:
            return int(turn.next_vtime) - 1
        if task.price > 0:
            yield from _refuse(task)
    # A task of no known account queues at the back, in submit order.
    (tail,) = yield Step(_QUEUE_TAIL, {"model": task.model})
    return int(tail or 0)


def _refuse(task: NewTask) -> Program[None]:
    """InsufficientCredits, saying what the account has."""
    account = yield Step(_AVAILABLE, {"account": task.account_id})
    available = 0 if account is None else account[0]
    raise InsufficientCredits(
        f"This task costs {task.price} credits; the account has {available} available"
    )
