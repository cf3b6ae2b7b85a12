"""Which tasks changed, for a process's stream feed, on the shared SQL store.

Each write that changes a task's status or progress names the task (see
`SqlBase._write`); the dialects carry the names to other processes, or say
that any task may have changed where they cannot name them (`sqlite.py`).
"""

from __future__ import annotations

from collections.abc import Collection

import sqlalchemy as sa

from fluxserve.store.schema import tasks
from fluxserve.store.sql_base import SqlBase
from fluxserve.tasks import TaskStatus

STATES_PER_READ = 500
"""Task ids per read of `task_states`: well under both drivers' limits on parameters."""


class ChangeQueries(SqlBase):
    """Task changes and task states; mixed into SqlStore."""

    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        return await self._task_changes.take(at_most)

    async def task_states(self, task_ids: Collection[str]) -> dict[str, tuple[TaskStatus, int]]:
        wanted = list(task_ids)
        states: dict[str, tuple[TaskStatus, int]] = {}
        async with self._read() as conn:
            for start in range(0, len(wanted), STATES_PER_READ):
                chunk = wanted[start : start + STATES_PER_READ]
                rows = await conn.execute(
                    sa.select(tasks.c.task_id, tasks.c.status, tasks.c.progress).where(
                        tasks.c.task_id.in_(chunk)
                    )
                )
                states.update((row.task_id, (TaskStatus(row.status), row.progress)) for row in rows)
        return states
