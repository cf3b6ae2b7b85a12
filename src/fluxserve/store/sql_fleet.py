"""The fleet, on the shared SQL store: the workers' heartbeats and the queue's depth per
model, for /ready and the metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa

from fluxserve.store.base import WorkerRecord
from fluxserve.store.schema import tasks, workers
from fluxserve.store.sql_base import SqlBase
from fluxserve.tasks import TaskStatus


class FleetQueries(SqlBase):
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
            # Only this worker writes its row, one heartbeat at a time (see the
            # worker's _heartbeat), so update-then-insert cannot race.
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
