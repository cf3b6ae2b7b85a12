"""Why the engine thread stops a batch at its next denoising step: the worker is
stopping, the batch ran out of time, or some of its tasks were cancelled. Each is
raised from the step callback and tells the worker what becomes of the batch's tasks.
"""

from __future__ import annotations

from fluxserve.tasks import CANCELLED_MESSAGE


class Interrupted(Exception):
    """Raised on the engine thread at the next step when the worker must stop.

    Every task of the batch goes back to the queue.
    """


class TaskStopped(Exception):
    """Raised on the engine thread at the next step of a timed-out batch.

    Unlike `Interrupted`, its tasks do not go back to the queue: they fail with
    this message.
    """


class Cancelled(Exception):
    """Raised on the engine thread at the next step once tasks of the batch are cancelled.

    Those fail as cancelled; the others go back to the queue, to run again.
    """

    def __init__(self, task_ids: frozenset[str]) -> None:
        super().__init__(CANCELLED_MESSAGE)
        self.task_ids = task_ids
