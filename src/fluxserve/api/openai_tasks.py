"""An OpenAI images request as fluxserve tasks: `n` images are `n` tasks, each
submitted through the unified path (so priced, limited and visible through
/api/generate like any other), waited for, and answered in OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from fluxserve.api.openai_errors import AfterQueued, OpenAIError
from fluxserve.runtime import Runtime
from fluxserve.store import ApiKeyRecord
from fluxserve.tasks import OUTPUT_FORMATS, Task, TaskInput, TaskStatus


@dataclass(frozen=True)
class ImagesPlan:
    """What one request asks for: `n` tasks of `model` with `task_input`."""

    model: str
    task_input: TaskInput
    n: int
    response_format: Literal["url", "b64_json"]


async def run_images(rt: Runtime, key: ApiKeyRecord, plan: ImagesPlan) -> dict[str, Any]:
    """Queue the plan's tasks, all or none, wait for them, and answer with their images.

    Once they are queued, an error answer names them and tells OpenAI's SDKs not
    to send the request again (`AfterQueued`), which would queue them a second time.
    """
    tasks = await rt.service.submit_together(key, plan.model, plan.task_input, plan.n)
    task_ids = [task.task_id for task in tasks]
    try:
        return await _answer(rt, plan, await _wait(rt, key, task_ids))
    except Exception as exc:
        raise AfterQueued(exc, task_ids) from exc


async def _wait(rt: Runtime, key: ApiKeyRecord, task_ids: Sequence[str]) -> list[Task]:
    """The tasks once all have ended; a 504 once `openai_wait` runs out."""
    try:
        async with asyncio.timeout(rt.settings.openai_wait):
            return await _all_ended(rt, key, task_ids)
    except TimeoutError:
        raise OpenAIError(
            504,
            f"The images were not ready within {rt.settings.openai_wait:g} seconds. "
            f"They are still being made as tasks {', '.join(task_ids)}: read each with "
            "GET /api/generate/status/{task_id} and the same API key.",
            type="server_error",
            code="timeout",
        ) from None


async def _all_ended(rt: Runtime, key: ApiKeyRecord, task_ids: Sequence[str]) -> list[Task]:
    """Each task once it has ended. Should one wait fail, the others are cancelled
    (their feed subscriptions closed) before its error is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            waits = [group.create_task(_ended(rt, key, task_id)) for task_id in task_ids]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [wait.result() for wait in waits]


async def _ended(rt: Runtime, key: ApiKeyRecord, task_id: str) -> Task:
    """The task once it has ended, woken by its changes (see task_feed.py)."""
    subscription, snapshot = await rt.feed.open(
        task_id, lambda: rt.service.get_with_position(key, task_id)
    )
    try:
        while not snapshot.terminal:
            snapshot = await subscription.next()
    finally:
        subscription.close()
    return await rt.service.get(key, task_id)


async def _answer(rt: Runtime, plan: ImagesPlan, tasks: Sequence[Task]) -> dict[str, Any]:
    """OpenAI's answer: an image per finished task. A task that failed gives none;
    when none finished, the answer is an error that says why."""
    finished = [task for task in tasks if task.status is TaskStatus.FINISHED]
    if not finished:
        reasons = "; ".join(f"{task.task_id}: {task.error_message}" for task in tasks)
        raise OpenAIError(
            500,
            f"Image generation failed ({reasons})",
            type="server_error",
            code="generation_failed",
        )
    data = [await _image(rt, task, plan.response_format) for task in finished]
    first = finished[0]
    answer: dict[str, Any] = {
        "created": int(max(task.finished_at or time.time() for task in finished)),
        "data": data,
        "output_format": plan.task_input.output_format,
    }
    if first.width and first.height:
        answer["size"] = f"{first.width}x{first.height}"
    return answer


async def _image(rt: Runtime, task: Task, response_format: str) -> dict[str, Any]:
    [file] = task.files
    image: dict[str, Any] = {"task_id": task.task_id}
    if response_format == "url":
        image["url"] = rt.storage.url(file.key)
        return image
    data = await rt.storage.get(file.key)
    if data is None:
        raise OpenAIError(
            500,
            f"The image of task {task.task_id} is no longer stored",
            type="server_error",
        )
    image["b64_json"] = base64.b64encode(data).decode()
    return image


def with_images(plan: ImagesPlan, image_urls: Sequence[str]) -> ImagesPlan:
    """The plan with its edit's reference images."""
    return replace(plan, task_input=replace(plan.task_input, image_urls=tuple(image_urls)))


# The OpenAPI document's account of the answer.
class ImageData(BaseModel):
    url: str | SkipJsonSchema[None] = Field(None, description="With response_format url")
    b64_json: str | SkipJsonSchema[None] = Field(
        None, description="With response_format b64_json: the file's bytes in base64"
    )
    task_id: str = Field(description="The fluxserve task that made this image")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds when the last image was made")
    data: list[ImageData] = Field(description="One per finished task: n, less any that failed")
    output_format: str = Field(json_schema_extra={"enum": list(OUTPUT_FORMATS)})
    size: str | SkipJsonSchema[None] = Field(
        None, pattern=r"^\d+x\d+$", description="The images' real width x height"
    )
