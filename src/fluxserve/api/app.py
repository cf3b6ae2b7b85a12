"""The FastAPI application: one Runtime, started and stopped with the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from fluxserve import __version__
from fluxserve.api.account_routes import router as account_router
from fluxserve.api.callback_routes import router as callback_router
from fluxserve.api.envelope import install_error_handlers
from fluxserve.api.keycache import KeyCache
from fluxserve.api.routes import router
from fluxserve.api.stream_routes import router as stream_router
from fluxserve.api.upload_routes import router as upload_router
from fluxserve.runtime import Runtime


def create_app(runtime: Runtime) -> FastAPI:
    """The app serving `runtime`; its lifespan starts and stops the runtime."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="fluxserve", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.keys = KeyCache(runtime.store, runtime.settings.api_key_cache_ttl)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(stream_router)
    app.include_router(callback_router)
    app.include_router(account_router)
    app.include_router(upload_router)
    return app
