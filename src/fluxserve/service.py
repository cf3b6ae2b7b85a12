"""Submitting and reading tasks: the rules that hold whichever process asks."""

from __future__ import annotations

import time

from fluxserve.errors import InvalidRequest, NotFound, PermissionDenied, UnsafeURLError
from fluxserve.netguard import NetPolicy, check_url
from fluxserve.store import Store
from fluxserve.tasks import NewTask, Task, TaskInput, new_task_id


class TaskService:
    """Submit and get, for one store and one outbound-URL policy."""

    def __init__(self, store: Store, policy: NetPolicy) -> None:
        self.store = store
        self.policy = policy

    async def submit(
        self, owner: str, model: str, task_input: TaskInput, callback_url: str | None
    ) -> Task:
        """Queue a task; it is committed when this returns."""
        if callback_url is not None:
            self._check_outbound("callback_url", callback_url)
        for index, url in enumerate(task_input.image_urls):
            if not url.startswith("data:"):
                self._check_outbound(f"input.image_urls[{index}]", url)
        now = time.time()
        return await self.store.create_task(
            NewTask(
                task_id=new_task_id(now),
                owner=owner,
                model=model,
                input=task_input,
                callback_url=callback_url,
                created_at=now,
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

    def _check_outbound(self, field: str, url: str) -> None:
        try:
            check_url(url, self.policy)
        except UnsafeURLError as exc:
            raise InvalidRequest(f"{field} is not allowed: {exc}") from exc
