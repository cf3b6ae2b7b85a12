"""The FastAPI application: one Runtime, started and stopped with the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from fluxserve import __version__
from fluxserve.api.account_routes import router as account_router
from fluxserve.api.bfl_errors import BFL_DOOR, SUBMIT_PATHS
from fluxserve.api.bfl_routes import router as bfl_router
from fluxserve.api.callback_routes import router as callback_router
from fluxserve.api.envelope import install_error_handlers
from fluxserve.api.guard import API_DOOR, BodyCaps, RequestGuard
from fluxserve.api.keycache import KeyCache
from fluxserve.api.lora_routes import router as lora_router
from fluxserve.api.observe import RequestMetrics, request_histogram, task_of_request
from fluxserve.api.openai_errors import OPENAI_DOOR
from fluxserve.api.openai_routes import EDITS_PATH
from fluxserve.api.openai_routes import router as openai_router
from fluxserve.api.openapi import install_openapi
from fluxserve.api.page_routes import install_page
from fluxserve.api.routes import SUBMIT_PATH, router
from fluxserve.api.schemas import MAX_IMAGES
from fluxserve.api.stream_routes import router as stream_router
from fluxserve.api.upload_routes import SELF_BOUNDED_PATHS, base64_body_cap
from fluxserve.api.upload_routes import router as upload_router
from fluxserve.runtime import Runtime
from fluxserve.settings import Settings


def create_app(runtime: Runtime) -> FastAPI:
    """The app serving `runtime`; its lifespan starts and stops the runtime."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    # No redirects to the slash-ended path: Starlette builds them from the Host
    # header, so anyone could make a fluxserve URL redirect to a host of theirs.
    app = FastAPI(
        title="fluxserve",
        version=__version__,
        lifespan=lifespan,
        redirect_slashes=False,
        dependencies=[Depends(task_of_request)],
    )
    app.state.runtime = runtime
    keys = KeyCache(runtime.store, runtime.settings.api_key_cache_ttl)
    app.add_middleware(
        RequestGuard,
        keys=keys,
        caps=body_caps(runtime.settings),
        doors=(API_DOOR, BFL_DOOR, OPENAI_DOOR),
    )
    # Added last, so outermost: it counts the guard's 401s and 413s too.
    app.add_middleware(RequestMetrics, histogram=request_histogram(runtime.metrics))
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(router)
    app.include_router(stream_router)
    app.include_router(callback_router)
    app.include_router(account_router)
    app.include_router(upload_router)
    app.include_router(openai_router)
    app.include_router(bfl_router)
    app.include_router(lora_router)
    install_page(app)
    return app


def body_caps(settings: Settings) -> BodyCaps:
    """`max_body_bytes` for every route, but room for the most data: references a
    submit may carry, the images of an OpenAI edit (each as large as a stream
    upload may be), and the uploads' own limits."""
    submit = MAX_IMAGES * base64_body_cap(settings.max_base64_upload_bytes)
    edit = MAX_IMAGES * settings.max_stream_upload_bytes
    return BodyCaps(
        settings.max_body_bytes,
        {
            **dict.fromkeys((SUBMIT_PATH, *SUBMIT_PATHS), settings.max_body_bytes + submit),
            EDITS_PATH: settings.max_body_bytes + edit,
            **dict.fromkeys(SELF_BOUNDED_PATHS),
        },
    )
