"""Reads of tasks: by id with the queue position, an account's pages, states, depths."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from fluxserve.store.base import TaskPage
from fluxserve.store.connection import Database
from fluxserve.store.rows import TASK_BY_ID, task_from_row
from fluxserve.store.schema import tasks
from fluxserve.tasks import Task, TaskStatus

STATES_PER_READ = 500
"""Task ids per read of `task_states`: well under both drivers' limits on parameters."""
RANKED_FROM = 8
"""Status reads arriving together that share one pass over their queues, at the least."""
_QUEUED = TaskStatus.NOT_STARTED.value


def _queue_position(mine: Any) -> Any:
    """How many queued tasks of `mine`'s model are claimed no later than it: (vtime, seq) order.

    Two counts over plain ranges of the (status, model, vtime, seq) index: the
    tasks of earlier vtimes, and those of `mine`'s vtime up to its seq. SQLite
    walks such a range about a third faster than one bounded by a row value.
    """
    same_queue = sa.and_(tasks.c.status == _QUEUED, tasks.c.model == mine.c.model)
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
    sa.case((_mine.c.status == _QUEUED, _queue_position(_mine))).label("queue_position"),
).where(_mine.c.task_id == sa.bindparam("task_id"))


def _tasks_and_positions() -> sa.Select[Any]:
    """Tasks by their ids and, for the queued ones, their queue positions, from one
    pass over the front of their queues, up to the furthest of them (PostgreSQL)."""
    ids = sa.bindparam("task_ids", type_=ARRAY(sa.String))
    wanted = tasks.select().where(tasks.c.task_id == sa.any_(ids)).cte("wanted")
    waiting = wanted.c.status == _QUEUED
    position = sa.func.count().over(
        partition_by=tasks.c.model, order_by=(tasks.c.vtime, tasks.c.seq)
    )
    ranked = (
        sa.select(tasks.c.seq, position.label("position"))
        .where(
            tasks.c.status == _QUEUED,
            tasks.c.model.in_(sa.select(wanted.c.model).where(waiting)),
            tasks.c.vtime
            <= sa.select(sa.func.max(wanted.c.vtime)).where(waiting).scalar_subquery(),
        )
        .cte("ranked")
    )
    return sa.select(wanted, ranked.c.position.label("queue_position")).select_from(
        wanted.outerjoin(ranked, ranked.c.seq == wanted.c.seq)
    )


_TASKS_AND_POSITIONS = _tasks_and_positions()


async def get_task(db: Database, task_id: str) -> Task | None:
    row = await db.one(TASK_BY_ID, task_id=task_id)
    return None if row is None else task_from_row(row)


def with_position(row: Any) -> tuple[Task, int | None] | None:
    return None if row is None else (task_from_row(row), row.queue_position or None)


async def get_task_and_position(db: Database, task_id: str) -> tuple[Task, int | None] | None:
    return with_position(await db.one(TASK_AND_POSITION, task_id=task_id))


async def tasks_and_positions(db: Database, task_ids: list[str]) -> dict[str, Any]:
    """Each task's row with its queue position. A few are counted one by one; more
    share one pass over the front of their queues (PostgreSQL)."""
    if len(task_ids) < RANKED_FROM or db.name != "postgresql":
        found = await asyncio.gather(
            *(db.one(TASK_AND_POSITION, task_id=task_id) for task_id in task_ids)
        )
    else:
        found = await db.all(_TASKS_AND_POSITIONS, task_ids=task_ids)
    return {row.task_id: row for row in found if row is not None}


async def list_tasks(
    db: Database,
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
    if before is not None and before <= db.max_seq:
        statement = statement.where(tasks.c.seq < before)
    rows = await db.all(statement.order_by(tasks.c.seq.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return TaskPage([task_from_row(r) for r in rows], rows[-1].seq if more else None)


async def task_states(db: Database, task_ids: Collection[str]) -> dict[str, tuple[TaskStatus, int]]:
    wanted = list(task_ids)
    states: dict[str, tuple[TaskStatus, int]] = {}
    for start in range(0, len(wanted), STATES_PER_READ):
        chunk = wanted[start : start + STATES_PER_READ]
        rows = await db.all(
            sa.select(tasks.c.task_id, tasks.c.status, tasks.c.progress).where(
                tasks.c.task_id.in_(chunk)
            )
        )
        states.update((row.task_id, (TaskStatus(row.status), row.progress)) for row in rows)
    return states


async def queue_depths(db: Database) -> dict[str, int]:
    rows = await db.all(
        sa.select(tasks.c.model, sa.func.count().label("queued"))
        .where(tasks.c.status == _QUEUED)
        .group_by(tasks.c.model)
    )
    return {row.model: row.queued for row in rows}
