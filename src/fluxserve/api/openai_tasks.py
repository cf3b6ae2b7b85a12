"""An OpenAI images request as fluxserve tasks: `n` images are `n` tasks, each
submitted through the unified path (so priced, limited and visible through
/api/generate like any other), waited for, and answered in OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from fluxserve.api.openai_errors import NO_RETRY, OpenAIError
from fluxserve.errors import ApiError, StoreUnavailable
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
    """Queue the plan's tasks, wait for them, and answer with their images."""
    task_ids = await _submit_all(rt, key, plan)
    try:
        async with asyncio.timeout(rt.settings.openai_wait):
            tasks = await asyncio.gather(*(_ended(rt, key, task_id) for task_id in task_ids))
    except TimeoutError:
        raise OpenAIError(
            504,
            f"The images were not ready within {rt.settings.openai_wait:g} seconds. "
            f"They are still being made as tasks {', '.join(task_ids)}: read each with "
            "GET /api/generate/status/{task_id} and the same API key.",
            type="server_error",
            code="timeout",
            headers=NO_RETRY,
            extra={"task_ids": task_ids},
        ) from None
    return await _answer(rt, plan, tasks)


async def _submit_all(rt: Runtime, key: ApiKeyRecord, plan: ImagesPlan) -> list[str]:
    """One task per image. Should one be refused (credits, limits), those queued
    before it are cancelled, so a refused request costs nothing."""
    task_ids: list[str] = []
    try:
        for _ in range(plan.n):
            task = await rt.service.submit(key, plan.model, plan.task_input, None)
            task_ids.append(task.task_id)
    except (ApiError, StoreUnavailable):
        for task_id in task_ids:
            with contextlib.suppress(ApiError, StoreUnavailable):
                await rt.service.cancel(key, task_id)
        raise
    return task_ids


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
            # Sent again, it would queue its images again, most likely to fail alike.
            headers=NO_RETRY,
            extra={"task_ids": [task.task_id for task in tasks]},
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
            extra={"task_ids": [task.task_id]},
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
