"""Submitting and reading tasks: the rules that hold whichever process asks."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Callable

from fluxserve.data_references import is_data_url, store_data_references
from fluxserve.errors import Conflict, InvalidRequest, NotFound, PermissionDenied, UnsafeURLError
from fluxserve.logs import bind_task
from fluxserve.lora_rules import LoraRules
from fluxserve.net_policy import NetPolicy, check_url
from fluxserve.storage import Storage
from fluxserve.store import ApiKeyRecord, Store
from fluxserve.store.base import CallbackEvent, IdempotencyKey, SubmitLimits, TaskPage
from fluxserve.tasks import TERMINAL_EVENTS, NewTask, Task, TaskInput, new_task_id
from fluxserve.uploads import Uploads


class TaskService:
    """Submit, get, cancel and list, for one store and its outbound-URL policies."""

    def __init__(
        self,
        store: Store,
        policy: NetPolicy,
        *,
        callback_policy: NetPolicy | None = None,
        price: Callable[[str, str, int], int] = lambda _model, _resolution, _loras: 0,
        limits: SubmitLimits | None = None,
        idempotency_ttl: float = 24 * 3600,
        uploads: Uploads,
        lora_rules: LoraRules | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        # data: references become uploads at submit.
        self.uploads = uploads
        # Image URLs of its files are read from it directly, never fetched.
        self.storage: Storage = uploads.storage
        # Callback URLs may be held to more (https only) than fetched image URLs.
        self.callback_policy = callback_policy or policy
        self.price = price
        self.limits = limits
        self.idempotency_ttl = idempotency_ttl
        # None: no task may ask for LoRAs.
        self.lora_rules = lora_rules

    async def submit(
        self,
        key: ApiKeyRecord,
        model: str,
        task_input: TaskInput,
        callback_url: str | None,
        callback_events: tuple[str, ...] = TERMINAL_EVENTS,
        *,
        idempotency: tuple[str, str] | None = None,
    ) -> Task:
        """Queue a task; it is committed when this returns.

        `idempotency` is the request's Idempotency-Key and a hash of its body: a
        repeat within the TTL answers the first task.
        """
        task_input = await self._checked(key, model, task_input, callback_url)
        task = await self.store.create_task(
            self._new_task(key, model, task_input, callback_url, callback_events, time.time()),
            limits=self.limits,
            idempotency=None
            if idempotency is None
            else IdempotencyKey(*idempotency, ttl=self.idempotency_ttl),
        )
        bind_task(task.task_id)  # the request's later lines, its access log's too
        return task

    async def submit_together(
        self, key: ApiKeyRecord, model: str, task_input: TaskInput, count: int
    ) -> list[Task]:
        """Queue `count` tasks of one input, each with a seed of its own (unless the
        input sets one), all or none: see `Store.create_tasks`."""
        task_input = await self._checked(key, model, task_input, None)
        now = time.time()
        new_tasks = [
            self._new_task(key, model, task_input, None, TERMINAL_EVENTS, now) for _ in range(count)
        ]
        tasks = await self.store.create_tasks(new_tasks, limits=self.limits)
        bind_task(*(task.task_id for task in tasks))
        return tasks

    async def _checked(
        self, key: ApiKeyRecord, model: str, task_input: TaskInput, callback_url: str | None
    ) -> TaskInput:
        """The input once its URLs and LoRAs pass, its data: references stored as uploads."""
        if callback_url is not None:
            self._check_outbound("callback_url", callback_url, self.callback_policy)
        if task_input.loras:
            if self.lora_rules is None:
                raise InvalidRequest("input.loras is not accepted by this server")
            # Off the event loop: it reads the LoRA folder and the Hugging Face cache.
            await asyncio.to_thread(self.lora_rules.check, model, task_input.loras)
        for index, url in enumerate(task_input.image_urls):
            if not is_data_url(url) and not self._is_stored(url):
                self._check_outbound(f"input.image_urls[{index}]", url, self.policy)
        if any(is_data_url(url) for url in task_input.image_urls):
            stored = await store_data_references(
                self.uploads, key.account_id or key.key_id, task_input.image_urls
            )
            task_input = dataclasses.replace(task_input, image_urls=stored)
        return task_input

    def _new_task(
        self,
        key: ApiKeyRecord,
        model: str,
        task_input: TaskInput,
        callback_url: str | None,
        callback_events: tuple[str, ...],
        now: float,
    ) -> NewTask:
        if task_input.seed is None:
            # Drawn now, not at run time: a task that runs twice (its first worker
            # lost) makes the same image and overwrites the same file.
            task_input = dataclasses.replace(task_input, seed=secrets.randbelow(2**32))
        return NewTask(
            task_id=new_task_id(now),
            owner=key.key_id,
            account_id=key.account_id,
            model=model,
            input=task_input,
            callback_url=callback_url,
            created_at=now,
            callback_events=callback_events,
            price=self.price(model, task_input.resolution, len(task_input.loras)),
        )

    async def get(self, key: ApiKeyRecord, task_id: str) -> Task:
        """The caller's task; 404 when unknown, 403 when another account's."""
        _check_task_id(task_id)
        return _readable(key, task_id, await self.store.get_task(task_id))

    async def get_with_position(self, key: ApiKeyRecord, task_id: str) -> tuple[Task, int | None]:
        """The caller's task and, while it is queued, its queue position; errors as `get`."""
        _check_task_id(task_id)
        found = await self.store.get_task_and_position(task_id)
        task, position = (None, None) if found is None else found
        return _readable(key, task_id, task), position

    async def cancel(self, key: ApiKeyRecord, task_id: str) -> Task:
        """Cancel the caller's queued or running task; 409 once it has ended otherwise."""
        task = await self.get(key, task_id)
        if not task.status.terminal:
            task = await self.store.cancel_task(task_id) or task
        if task.status.terminal and not task.cancelled:
            raise Conflict(
                f"Task {task_id} is {task.status.value}; "
                "only a queued or running task can be cancelled"
            )
        return task

    async def history(
        self,
        key: ApiKeyRecord,
        *,
        status: str | None,
        model: str | None,
        limit: int,
        before: int | None,
    ) -> TaskPage:
        """The caller's account's tasks, newest first."""
        if key.account_id is None:
            return TaskPage([], None)
        return await self.store.list_tasks(
            key.account_id, status=status, model=model, limit=limit, before=before
        )

    async def callbacks(self, key: ApiKeyRecord, task_id: str) -> tuple[Task, list[CallbackEvent]]:
        """The caller's task and its callback events, each with every attempt."""
        task = await self.get(key, task_id)
        return task, await self.store.callback_events(task_id)

    async def redeliver(self, key: ApiKeyRecord, task_id: str) -> CallbackEvent:
        """Send the ended task's terminal callback again: the same event, due now."""
        task = await self.get(key, task_id)
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

    def _is_stored(self, url: str) -> bool:
        return self.storage.key_for_url(url) is not None

    def _check_outbound(self, field: str, url: str, policy: NetPolicy) -> None:
        try:
            check_url(url, policy)
        except UnsafeURLError as exc:
            raise InvalidRequest(f"{field} is not allowed: {exc}") from exc


def _check_task_id(task_id: str) -> None:
    """404 for an id no task can have, before the database is asked: PostgreSQL
    refuses a NUL in text outright, where any other unknown id is simply not found."""
    if "\x00" in task_id:
        raise NotFound(f"Task {task_id!r} not found")


def _readable(key: ApiKeyRecord, task_id: str, task: Task | None) -> Task:
    """`task` if the caller may read it; 404 when there is none, 403 when another's."""
    if task is None:
        raise NotFound(f"Task {task_id} not found")
    if not _owns(key, task):
        raise PermissionDenied("Task belongs to another user")
    return task


def _owns(key: ApiKeyRecord, task: Task) -> bool:
    """Tasks belong to accounts; a task of no account (from before 0004) to its key."""
    if task.account_id is not None and key.account_id is not None:
        return task.account_id == key.account_id
    return task.owner == key.key_id
