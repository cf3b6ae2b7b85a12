"""Submitting and reading tasks: the rules that hold whichever process asks."""

from __future__ import annotations

import dataclasses
import secrets
import time

from fluxserve import reference_shape
from fluxserve.errors import Conflict, InvalidRequest, NotFound, PermissionDenied, UnsafeURLError
from fluxserve.netguard import NetPolicy, check_url
from fluxserve.store import Store
from fluxserve.store.base import CallbackEvent
from fluxserve.tasks import TERMINAL_EVENTS, NewTask, Task, TaskInput, new_task_id


class TaskService:
    """Submit and get, for one store and its outbound-URL policies."""

    def __init__(
        self, store: Store, policy: NetPolicy, *, callback_policy: NetPolicy | None = None
    ) -> None:
        self.store = store
        self.policy = policy
        # Callback URLs may be held to more (https only) than fetched image URLs.
        self.callback_policy = callback_policy or policy

    async def submit(
        self,
        owner: str,
        model: str,
        task_input: TaskInput,
        callback_url: str | None,
        callback_events: tuple[str, ...] = TERMINAL_EVENTS,
    ) -> Task:
        """Queue a task; it is committed when this returns."""
        if callback_url is not None:
            self._check_outbound("callback_url", callback_url, self.callback_policy)
        for index, url in enumerate(task_input.image_urls):
            if not url.startswith("data:"):
                self._check_outbound(f"input.image_urls[{index}]", url, self.policy)
        reference_shape.check_submitted(task_input.image_urls)
        if task_input.seed is None:
            # Drawn now, not at run time: a task that runs twice (its first worker
            # lost) makes the same image and overwrites the same file.
            task_input = dataclasses.replace(task_input, seed=secrets.randbelow(2**32))
        now = time.time()
        return await self.store.create_task(
            NewTask(
                task_id=new_task_id(now),
                owner=owner,
                model=model,
                input=task_input,
                callback_url=callback_url,
                created_at=now,
                callback_events=callback_events,
            )
        )

    async def get(self, owner: str, task_id: str) -> Task:
        """The caller's task; 404 when unknown, 403 when another key's."""
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"Task {task_id} not found")
        if task.owner != owner:
            raise PermissionDenied("Task belongs to another user")
        return task

    async def callbacks(self, owner: str, task_id: str) -> tuple[Task, list[CallbackEvent]]:
        """The caller's task and its callback events, each with every attempt."""
        task = await self.get(owner, task_id)
        return task, await self.store.callback_events(task_id)

    async def redeliver(self, owner: str, task_id: str) -> CallbackEvent:
        """Send the ended task's terminal callback again: the same event, due now."""
        task = await self.get(owner, task_id)
        if task.callback_url is None:
            raise Conflict(f"Task {task_id} has no callback_url to deliver to")
        if not task.status.terminal:
            raise Conflict(
                f"Task {task_id} is {task.status.value}; "
                "only a finished or failed task's callback can be redelivered"
            )
        event_id = await self.store.redeliver_callback(task)
        events = await self.store.callback_events(task_id)
        return next(event for event in events if event.event_id == event_id)

    def _check_outbound(self, field: str, url: str, policy: NetPolicy) -> None:
        try:
            check_url(url, policy)
        except UnsafeURLError as exc:
            raise InvalidRequest(f"{field} is not allowed: {exc}") from exc
