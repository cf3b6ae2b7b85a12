"""LoRAs fetched from URLs go to disk as they arrive, never whole in memory, and stay
there within `lora_cache_bytes`: the least recently used go first, and none that was
used within the last hour."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fluxserve.errors import EngineError, FetchError
from fluxserve.lora_fetch import LoraSource
from fluxserve.net_policy import NetPolicy
from fluxserve.netguard import guarded_client
from fluxserve.settings import Settings
from fluxserve.tasks import LoraSpec

from conftest import serve_asgi, until

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
        assert notes(source.cache_dir) == {a.stem, c.stem}  # and its URL's note with it

        # Fetched again when asked for; now all three were used within the hour,
        # so none goes, though they hold more than the cache's size.
        assert await path_of("b") == b
        assert hits == ["a", "b", "c", "b"]
        assert a.is_file() and b.is_file() and c.is_file()
        assert notes(source.cache_dir) == {a.stem, b.stem, c.stem}


def notes(cache_dir: Path) -> set[str]:
    """The content hashes the cache's URL notes point at."""
    return {note.read_text() for note in (cache_dir / "urls").iterdir()}


# A LoRA of 256 KiB, served in two parts with a pause between them.
BIG = {"transformer.proj.lora_A.weight": np.arange(256 * 256, dtype=np.float32).reshape(256, 256)}
BIG_FILE = save(BIG)
FIRST_PART = 100 * 1024


class PausedServer:
    """Serves BIG_FILE at /big.safetensors: its first part, then the rest once released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.app = Starlette(routes=[Route("/big.safetensors", self.serve)])

    async def serve(self, request: Request) -> Response:
        return StreamingResponse(self.parts())  # chunked: no length to refuse it by

    async def parts(self) -> AsyncIterator[bytes]:
        yield BIG_FILE[:FIRST_PART]
        await self.release.wait()
        yield BIG_FILE[FIRST_PART:]


def on_disk(cache_dir: Path) -> dict[str, int]:
    """Every file in the cache folder, hidden ones too, by name: its size."""
    if not cache_dir.is_dir():
        return {}
    return {path.name: path.stat().st_size for path in cache_dir.iterdir() if path.is_file()}


def partial_size(cache_dir: Path) -> int:
    return sum(size for name, size in on_disk(cache_dir).items() if name.endswith(".partial"))


async def test_a_lora_goes_to_disk_as_it_arrives_and_into_place_once_whole(
    tmp_path: Path,
) -> None:
    server = PausedServer()
    settings = Settings(data_dir=tmp_path, allow_lora_urls=True, allow_private_networks=True)
    policy = NetPolicy(allow_private_networks=True)
    source = LoraSource(settings, policy)
    async with serve_asgi(server.app) as url, guarded_client(policy) as client:
        fetch = asyncio.create_task(
            source.resolve([LoraSpec(url=f"{url}/big.safetensors")], client)
        )
        # The server holds back the rest of the body; part of it is on disk already.
        await until(lambda: partial_size(source.cache_dir) > 0)
        assert not fetch.done()
        assert not list(source.cache_dir.glob("*.safetensors"))
        server.release.set()
        [lora] = await fetch
    assert lora.path.read_bytes() == BIG_FILE
    assert np.array_equal(
        load_file(lora.path)["transformer.proj.lora_A.weight"],
        np.asarray(BIG["transformer.proj.lora_A.weight"]),
    )
    assert set(on_disk(source.cache_dir)) == {lora.path.name}  # no partial left behind


async def test_a_lora_over_max_lora_bytes_or_not_a_lora_leaves_nothing(tmp_path: Path) -> None:
    server = PausedServer()
    server.app.add_route("/a.safetensors", lambda request: Response(save({"w": np.ones(4)})))
    limit = len(BIG_FILE) - 1
    settings = Settings(
        data_dir=tmp_path, allow_lora_urls=True, allow_private_networks=True, max_lora_bytes=limit
    )
    policy = NetPolicy(allow_private_networks=True)
    source = LoraSource(settings, policy)
    async with serve_asgi(server.app) as url, guarded_client(policy) as client:
        big = f"{url}/big.safetensors"
        fetch = asyncio.create_task(source.resolve([LoraSpec(url=big)], client))
        await until(lambda: partial_size(source.cache_dir) > 0)
        server.release.set()
        with pytest.raises(
            FetchError, match=f"could not fetch {big}: response is larger than {limit} bytes"
        ):
            await fetch
        assert list(source.cache_dir.iterdir()) == []

        plain = f"{url}/a.safetensors"
        with pytest.raises(EngineError, match="is not a LoRA in the safetensors format"):
            await source.resolve([LoraSpec(url=plain)], client)
        assert list(source.cache_dir.iterdir()) == []


async def test_a_partial_file_a_dead_fetch_left_goes_with_the_next_fetch(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, allow_lora_urls=True, allow_private_networks=True)
    policy = NetPolicy(allow_private_networks=True)
    source = LoraSource(settings, policy)
    source.cache_dir.mkdir(parents=True)
    left = source.cache_dir / ".left-by-a-dead-worker.partial"
    under_way = source.cache_dir / ".another-workers-fetch.partial"
    left.write_bytes(b"x" * 100)
    under_way.write_bytes(b"y" * 100)
    two_hours_ago = time.time() - 2 * 3600
    os.utime(left, (two_hours_ago, two_hours_ago))
    app = Starlette(routes=[Route("/a.safetensors", lambda request: Response(FILES["a"]))])
    async with serve_asgi(app) as url, guarded_client(policy) as client:
        [lora] = await source.resolve([LoraSpec(url=f"{url}/a.safetensors")], client)
    assert set(on_disk(source.cache_dir)) == {lora.path.name, under_way.name}
