"""What a submit's transaction checks before its task is queued: an earlier
submit with the same Idempotency-Key, the key's limits, the account's credits,
and the task's place in the fair queue."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fluxserve.errors import Conflict, InsufficientCredits, RateLimited
from fluxserve.store.base import IdempotencyKey, SubmitLimits
from fluxserve.store.rows import task_from_row
from fluxserve.store.schema import accounts, api_keys, idempotency_keys, tasks
from fluxserve.tasks import NewTask, Task, TaskStatus


async def replay(
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
    return None if earlier is None else task_from_row(earlier)


async def check_limits(conn: AsyncConnection, owner: str, limits: SubmitLimits, now: float) -> None:
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


async def take_turn(conn: AsyncConnection, task: NewTask) -> int:
    """The task's vtime: its place in the fair queue; holds its price from the account.

    Claims go in (vtime, seq) order. Each account's tasks take successive
    vtimes, and an account arriving at a busy queue starts just ahead of the
    queue's head: so it waits behind at most the running tasks, and then the
    accounts with queued work take turns, whatever their backlogs.
    """
    queued = sa.and_(tasks.c.status == TaskStatus.NOT_STARTED.value, tasks.c.model == task.model)
    if task.account_id is not None:
        # One statement: the queue's head is a subquery (the account's own clock
        # when the queue is empty), so a submit makes no separate read for it.
        head = sa.func.coalesce(
            sa.select(sa.func.min(tasks.c.vtime)).where(queued).scalar_subquery(),
            accounts.c.next_vtime,
        )
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
