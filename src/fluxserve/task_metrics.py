"""Tasks by how they ended, and how long they waited, ran and took, per model.

Counted where the store ends a task, whichever part of fluxserve ended it (a
worker finishing or failing it, a cancel, the sweeper giving up on a lost
worker's task), once that end has committed; so each ended task counts once,
in the process that ended it.
"""

from __future__ import annotations

import time

from fluxserve.metrics import Metrics
from fluxserve.tasks import MODELS, Task

# The `status` label: the wire's final status, with cancels apart from failures,
# since a cancel is the client's choice and not the service failing.
ENDINGS = ("finished", "failed", "cancelled")
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


def ending(task: Task) -> str:
    """`task`'s final status, as the `status` label tells it."""
    return "cancelled" if task.cancelled else task.status.value


class TaskMetrics:
    """The counters and histograms of ended tasks; `ended` is the store's listener."""

    def __init__(self, metrics: Metrics) -> None:
        self.ended_total = metrics.counter(
            "fluxserve_tasks_ended_total",
            "Tasks that ended, by model and final status: finished, failed, or cancelled "
            "(failed with cancelled: true).",
            ("model", "status"),
        )
        self.queue_wait = metrics.histogram(
            "fluxserve_task_queue_wait_seconds",
            "From submit to a worker's first start, of tasks that ended having started.",
            ("model",),
            WAIT_BUCKETS,
        )
        self.run_time = metrics.histogram(
            "fluxserve_task_run_seconds",
            "From a worker's first start to the end, of tasks that ended having started.",
            ("model",),
            RUN_BUCKETS,
        )
        self.total_time = metrics.histogram(
            "fluxserve_task_seconds",
            "From submit to the end, of every task that ended.",
            ("model",),
            WAIT_BUCKETS,
        )
        # Each label set shows as 0 before it first counts, so rate() has a start.
        for model in MODELS:
            for status in ENDINGS:
                self.ended_total.labels(model=model, status=status)
            for histogram in (self.queue_wait, self.run_time, self.total_time):
                histogram.labels(model=model)

    def ended(self, task: Task) -> None:
        """Count `task`, which the store has just ended (at its `finished_at`)."""
        end = task.finished_at or time.time()
        self.ended_total.labels(model=task.model, status=ending(task)).inc()
        self.total_time.labels(model=task.model).observe(end - task.created_at)
        if task.started_at is not None:
            self.queue_wait.labels(model=task.model).observe(task.started_at - task.created_at)
            self.run_time.labels(model=task.model).observe(end - task.started_at)
