"""LoRAs fetched from URLs stay on disk within `lora_cache_bytes`: the least recently
used go first, and none that was used within the last hour."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fluxserve.lora_fetch import LoraSource
from fluxserve.net_policy import NetPolicy
from fluxserve.netguard import guarded_client
from fluxserve.settings import Settings
from fluxserve.tasks import LoraSpec

from conftest import serve_asgi

# Three LoRA files of one size, each with weights of its own.
FILES = {
    name: save({"transformer.proj.lora_A.weight": np.full((4, 64), seed, dtype=np.float32)})
    for seed, name in enumerate(("a", "b", "c"))
}
SIZE = len(FILES["a"])


async def test_the_least_recently_used_lora_goes_when_the_cache_is_full(tmp_path: Path) -> None:
    hits: list[str] = []

    async def serve(request: Request) -> Response:
        name = request.path_params["name"]
        hits.append(name)
        return Response(FILES[name])

    settings = Settings(
        data_dir=tmp_path,
        allow_lora_urls=True,
        allow_private_networks=True,
        lora_cache_bytes=SIZE * 5 // 2,  # room for two of the three
    )
    policy = NetPolicy(allow_private_networks=True)
    source = LoraSource(settings, policy)
    app = Starlette(routes=[Route("/{name}.safetensors", serve)])
    async with serve_asgi(app) as url, guarded_client(policy) as client:

        async def path_of(name: str) -> Path:
            [lora] = await source.resolve([LoraSpec(url=f"{url}/{name}.safetensors")], client)
            return lora.path

        a, b = await path_of("a"), await path_of("b")
        now = time.time()
        os.utime(a, (now - 3 * 3600, now - 3 * 3600))
        os.utime(b, (now - 2 * 3600, now - 2 * 3600))
        assert await path_of("a") == a  # from the cache, and used now
        c = await path_of("c")
        assert hits == ["a", "b", "c"]
        assert a.is_file() and c.is_file()
        assert not b.exists()  # the least recently used

        # Fetched again when asked for; now all three were used within the hour,
        # so none goes, though they hold more than the cache's size.
        assert await path_of("b") == b
        assert hits == ["a", "b", "c", "b"]
        assert a.is_file() and b.is_file() and c.is_file()
