"""The fleet: the workers' heartbeats, for /ready and the metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence

from fluxserve.store.base import WorkerRecord
from fluxserve.store.connection import Database
from fluxserve.store.schema import workers


async def record_heartbeat(
    db: Database, worker_id: str, models: Sequence[str], engine: str, state: str
) -> None:
    now = time.time()
    values = {"models": list(models), "engine": engine, "state": state, "last_seen": now}
    async with db.transaction() as conn:
        # Only this worker writes its row, one heartbeat at a time (see the
        # worker's _heartbeat), so update-then-insert cannot race.
        updated = await conn.execute(
            workers.update().where(workers.c.worker_id == worker_id).values(**values)
        )
        if updated == 0:
            await conn.execute(
                workers.insert().values(worker_id=worker_id, started_at=now, **values)
            )


async def forget_worker(db: Database, worker_id: str) -> None:
    await db.execute(workers.delete().where(workers.c.worker_id == worker_id))


async def live_workers(db: Database, seen_within: float) -> list[WorkerRecord]:
    rows = await db.all(
        workers.select()
        .where(workers.c.last_seen >= time.time() - seen_within)
        .order_by(workers.c.started_at)
    )
    return [
        WorkerRecord(r.worker_id, tuple(r.models), r.engine, r.state, r.started_at, r.last_seen)
        for r in rows
    ]
