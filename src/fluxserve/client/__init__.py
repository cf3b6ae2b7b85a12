"""The Python client of fluxserve, and of any server of the same wire shape.

    from fluxserve.client import Client

    client = Client(base_url="http://127.0.0.1:8000", api_key=KEY)
    image = client.generate("a red fox", model="flux-2-pro", size="1:1")
    image.save("fox.png")

`AsyncClient` has the same methods, awaited. Both need httpx, httpx-sse and
pydantic only: nothing here imports the server, its store, torch or diffusers.
"""

from __future__ import annotations

from fluxserve.client.aio import AsyncClient
from fluxserve.client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConflictError,
    FluxserveError,
    InsufficientCreditsError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TaskFailedError,
    UnavailableError,
    WaitTimeoutError,
)
from fluxserve.client.flows import GeneratedImage, LoraOption, TaskOptions
from fluxserve.client.sync import Client
from fluxserve.protocol import (
    Balance,
    FileInfo,
    LoraInfo,
    LoraList,
    SubmittedTask,
    TaskData,
    TaskLora,
    TaskPage,
    TaskStatus,
    UploadedFile,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "Balance",
    "Client",
    "ConflictError",
    "FileInfo",
    "FluxserveError",
    "GeneratedImage",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "LoraInfo",
    "LoraList",
    "LoraOption",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "SubmittedTask",
    "TaskData",
    "TaskFailedError",
    "TaskLora",
    "TaskOptions",
    "TaskPage",
    "TaskStatus",
    "UnavailableError",
    "UploadedFile",
    "WaitTimeoutError",
]
