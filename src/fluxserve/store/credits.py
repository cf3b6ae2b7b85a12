"""Accounts and their credits: grants, and each task's hold, charge and release.

A task's price is held from its account when it is submitted, with the task's
turn in the fair queue (`take_turn`); it is charged when the task finishes and
released when it fails or is cancelled (`settle`), in the transaction that ends
it. The ledger keeps at most one row of each kind per task, so a retried worker
can never charge twice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NoReturn

import sqlalchemy as sa

from fluxserve.errors import AlreadyStored, Conflict, InsufficientCredits, NotFound
from fluxserve.store.base import Account, LedgerEntry
from fluxserve.store.connection import Connection, Database
from fluxserve.store.schema import accounts, credit_ledger, tasks
from fluxserve.tasks import NewTask, TaskStatus


class LedgerKind:
    """Ledger rows. Grants and charges move the balance; holds and releases the held part."""

    GRANT = "grant"  # + or -, by an operator
    HOLD = "hold"  # a task's price, promised at submit
    CHARGE = "charge"  # - the price, when the task finishes
    RELEASE = "release"  # the hold given back, when the task fails or is cancelled


_account = accounts.c.account_id == sa.bindparam("account")
_queued = sa.and_(
    tasks.c.status == TaskStatus.NOT_STARTED.value, tasks.c.model == sa.bindparam("model")
)
PRICE = sa.bindparam("price", type_=sa.BigInteger)
# The queue's head is a subquery (the account's own clock when the queue is
# empty), so a turn is one statement.
_head = sa.func.coalesce(
    sa.select(sa.func.min(tasks.c.vtime)).where(_queued).scalar_subquery(),
    accounts.c.next_vtime,
)
_start = sa.case((accounts.c.next_vtime >= _head, accounts.c.next_vtime), else_=_head - 1)
_TURN = (
    accounts.update()
    .where(_account)
    .values(next_vtime=_start + 1, held=accounts.c.held + PRICE)
    .returning(accounts.c.next_vtime)
)
_PAID_TURN = _TURN.where(accounts.c.balance - accounts.c.held >= PRICE)
_AVAILABLE = sa.select(accounts.c.balance - accounts.c.held).where(_account)
# Holds the account's row (PostgreSQL) until the turns that follow have taken it.
_AVAILABLE_LOCKED = _AVAILABLE.with_for_update()
_QUEUE_TAIL = sa.select(sa.func.max(tasks.c.vtime)).where(_queued)
_NEW_LEDGER_ROW = credit_ledger.insert()
_BY_ID = accounts.select().where(_account)
_BY_EMAIL = accounts.select().where(accounts.c.email == sa.bindparam("email"))


def turn(paid: bool) -> sa.Update:
    """The statement of a task's turn; a `paid` one refuses when credits are short."""
    return _PAID_TURN if paid else _TURN


def turn_params(task: NewTask) -> dict[str, Any]:
    return {"account": task.account_id, "model": task.model, "price": task.price}


def _hold_row(task: NewTask) -> dict[str, Any]:
    """The ledger row of `task`'s hold."""
    return _ledger_row(task.account_id, task.task_id, LedgerKind.HOLD, task.price, task.created_at)


async def take_turn(conn: Connection, task: NewTask) -> int:
    """The task's vtime: its place in the fair queue; holds its price from the account.

    Claims go in (vtime, seq) order. Each account's tasks take successive
    vtimes, and an account arriving at a busy queue starts just ahead of the
    queue's head: so it waits behind at most the running tasks, and then the
    accounts with queued work take turns, whatever their backlogs.
    """
    if task.account_id is not None:
        taken = await conn.one(turn(task.price > 0), **turn_params(task))
        if taken is not None:
            if task.price > 0:
                await conn.execute(_NEW_LEDGER_ROW, **_hold_row(task))
            return int(taken.next_vtime) - 1
        if task.price > 0:
            await refuse(conn, task)
    # A task of no known account queues at the back, in submit order.
    (tail,) = await conn.one(_QUEUE_TAIL, model=task.model)
    return int(tail or 0)


async def refuse(conn: Connection, task: NewTask) -> NoReturn:
    """InsufficientCredits, saying what the account has."""
    found = await conn.one(_AVAILABLE, account=task.account_id)
    available = 0 if found is None else found[0]
    raise InsufficientCredits(
        f"This task costs {task.price} credits; the account has {available} available"
    )


async def check_covered(conn: Connection, new_tasks: Sequence[NewTask]) -> None:
    """InsufficientCredits unless the account has credits for all of `new_tasks`
    (of one account) together: one refusal that says what the lot costs."""
    total = sum(task.price for task in new_tasks)
    account_id = new_tasks[0].account_id
    if total <= 0 or account_id is None:
        return
    found = await conn.one(_AVAILABLE_LOCKED, account=account_id)
    available = 0 if found is None else found[0]
    if available < total:
        raise InsufficientCredits(
            f"These {len(new_tasks)} tasks cost {total} credits together; "
            f"the account has {available} available"
        )


async def settle(
    conn: Connection, account_id: str | None, task_id: str, price: int, finished: bool
) -> None:
    """Charge (finished) or release (failed) a task's hold, in its ending transaction.

    The caller's status write is guarded so that a task ends once; the ledger's
    unique (task_id, kind) is the second line against a double charge.
    """
    if price <= 0 or account_id is None:
        return
    kind = LedgerKind.CHARGE if finished else LedgerKind.RELEASE
    row = _ledger_row(account_id, task_id, kind, -price if finished else price, time.time())
    await conn.execute(_NEW_LEDGER_ROW, **row)
    values: dict[str, Any] = {"held": accounts.c.held - price}
    if finished:
        values["balance"] = accounts.c.balance - price
    await conn.execute(
        accounts.update().where(accounts.c.account_id == account_id).values(**values)
    )


def new_account(account_id: str, email: str) -> sa.Insert:
    return accounts.insert().values(account_id=account_id, email=email, created_at=time.time())


async def create_account(db: Database, account_id: str, email: str) -> Account:
    try:
        await db.execute(new_account(account_id, email))
    except AlreadyStored as exc:
        # Ours, when a try whose connection was lost as it committed ran again.
        made = await get_account(db, account_id)
        if made is None or made.email != email:
            raise Conflict(f"An account with email {email} exists already") from exc
        return made
    made = await get_account(db, account_id)
    assert made is not None
    return made


async def get_account(db: Database, account_id: str) -> Account | None:
    return _account_record(await db.one(_BY_ID, account=account_id))


async def account_by_email(db: Database, email: str) -> Account | None:
    return _account_record(await db.one(_BY_EMAIL, email=email))


async def grant_credits(db: Database, account_id: str, amount: int, note: str | None) -> Account:
    async with db.transaction() as conn:
        row = await conn.one(
            accounts.update()
            .where(accounts.c.account_id == account_id)
            .values(balance=accounts.c.balance + amount)
            .returning(*accounts.c)
        )
        if row is None:
            raise NotFound(f"No account {account_id}")
        grant = _ledger_row(account_id, None, LedgerKind.GRANT, amount, time.time(), note)
        await conn.execute(_NEW_LEDGER_ROW, **grant)
    return Account(row.account_id, row.email, row.created_at, row.balance, row.held)


async def ledger(db: Database, account_id: str, limit: int) -> list[LedgerEntry]:
    rows = await db.all(
        credit_ledger.select()
        .where(credit_ledger.c.account_id == account_id)
        .order_by(credit_ledger.c.entry_id.desc())
        .limit(limit)
    )
    return [
        LedgerEntry(r.entry_id, r.task_id, r.kind, r.amount, r.note, r.created_at) for r in rows
    ]


def _ledger_row(
    account_id: str | None,
    task_id: str | None,
    kind: str,
    amount: int,
    at: float,
    note: str | None = None,
) -> dict[str, Any]:
    return dict(
        account_id=account_id, task_id=task_id, kind=kind, amount=amount, note=note, created_at=at
    )


def _account_record(row: Any) -> Account | None:
    if row is None:
        return None
    return Account(row.account_id, row.email, row.created_at, row.balance, row.held)


def hold_in_one_statement(new_task: sa.CTE) -> sa.CTE:
    """The hold's ledger row, written by the statement that queues the task (on
    PostgreSQL, see `submits.py`); bound by the task's own parameter names."""
    hold = sa.select(
        sa.bindparam("account_id", type_=credit_ledger.c.account_id.type),
        sa.bindparam("task_id", type_=credit_ledger.c.task_id.type),
        sa.literal(LedgerKind.HOLD),
        PRICE,
        sa.null(),
        sa.bindparam("created_at", type_=sa.Float),
    ).select_from(new_task)
    columns = ["account_id", "task_id", "kind", "amount", "note", "created_at"]
    return credit_ledger.insert().from_select(columns, hold).cte("hold")
