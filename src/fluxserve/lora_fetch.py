"""The worker's side of `input.loras`: each LoRA as a file on this machine.

A named LoRA is looked up again in the LoRA folder and the Hugging Face cache (it
may have gone since submit). A LoRA by URL is fetched through the net guard,
checked to be a LoRA safetensors file, and kept in `lora_cache_dir` under its
content hash, with a note of the URL's hash pointing at it: the same URL is
fetched once, and the same bytes from two URLs are one adapter. Each use marks a
file's time; past `lora_cache_bytes`, a new fetch removes the least recently
used files, but none used in the last `IN_USE` seconds (a task may be about to
load it, here or in another worker on this disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from fluxserve.engines.base import LoraWeights
from fluxserve.errors import EngineError
from fluxserve.loras import SUFFIX, LoraCatalog, is_lora, safetensors_header
from fluxserve.net_fetch import fetch_bytes
from fluxserve.net_policy import NetPolicy
from fluxserve.settings import Settings
from fluxserve.tasks import LoraSpec

# A LoRA may be hundreds of megabytes: longer than a reference image's fetch_timeout.
LORA_FETCH_TIMEOUT = 600.0
IN_USE = 3600.0
"""Seconds after its last use that a cached LoRA is never removed, whatever the cache's size."""


class LoraSource:
    """Resolves a task's LoRAs to files for one worker; fetches each URL once."""

    def __init__(self, settings: Settings, policy: NetPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self.catalog = LoraCatalog(settings.resolved_lora_dir)
        self.cache_dir = settings.lora_cache_dir
        self._url_locks: dict[str, asyncio.Lock] = {}

    async def resolve(
        self, specs: Sequence[LoraSpec], client: httpx.AsyncClient
    ) -> tuple[LoraWeights, ...]:
        """Each of `specs` as a local file, in order; EngineError or FetchError says
        which cannot be had."""
        found = []
        for spec in specs:
            if spec.name is not None:
                path, key = await asyncio.to_thread(self._named, spec.name)
            else:
                path = await self._fetched(str(spec.url), client)
                key = path.stem
            found.append(LoraWeights(key=key, path=path, scale=spec.scale, label=spec.label))
        return tuple(found)

    def _named(self, name: str) -> tuple[Path, str]:
        lora = self.catalog.find(name)
        try:
            if lora is not None:
                return lora.path, _file_key(lora.path)
        except OSError:
            pass  # gone meanwhile
        raise EngineError(
            f"LoRA {name!r} is not on this worker (not in {self.catalog.folder} "
            "nor in the Hugging Face cache)"
        )

    async def _fetched(self, url: str, client: httpx.AsyncClient) -> Path:
        if not self.settings.allow_lora_urls:
            raise EngineError(f"LoRA {url}: LoRAs by URL are turned off (allow_lora_urls)")
        url_hash = hashlib.sha256(url.encode()).hexdigest()
        lock = self._url_locks.setdefault(url_hash, asyncio.Lock())
        async with lock:  # tasks naming one URL wait for its one fetch
            cached = await asyncio.to_thread(self._cached, url_hash)
            if cached is not None:
                return cached
            fetched = await fetch_bytes(
                client,
                url,
                policy=self.policy,
                max_bytes=self.settings.max_lora_bytes,
                total_timeout=LORA_FETCH_TIMEOUT,
            )
            return await asyncio.to_thread(self._keep, url, url_hash, fetched.content)

    def _cached(self, url_hash: str) -> Path | None:
        try:
            content_hash = (self.cache_dir / "urls" / url_hash).read_text().strip()
        except OSError:
            return None
        path = self.cache_dir / f"{content_hash}{SUFFIX}"
        try:
            os.utime(path)  # used now: the last to be removed
        except OSError:
            return None
        return path

    def _keep(self, url: str, url_hash: str, content: bytes) -> Path:
        content_hash = hashlib.sha256(content).hexdigest()
        path = self.cache_dir / f"{content_hash}{SUFFIX}"
        (self.cache_dir / "urls").mkdir(parents=True, exist_ok=True)
        _write_atomically(path, content)
        if not is_lora(safetensors_header(path)):
            path.unlink(missing_ok=True)
            raise EngineError(f"LoRA {url} is not a LoRA in the safetensors format")
        _write_atomically(self.cache_dir / "urls" / url_hash, content_hash.encode())
        _trim(self.cache_dir, self.settings.lora_cache_bytes)
        return path


def _file_key(path: Path) -> str:
    """A key for a named LoRA's file that changes when the file is replaced; no hashing of
    its contents, which may be large and read on every task."""
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()


def _write_atomically(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)


def _trim(cache_dir: Path, limit: int) -> None:
    """Remove the least recently used LoRAs while the cache holds more than `limit`
    bytes, sparing those used in the last `IN_USE` seconds (the newest among them)."""
    files = []
    for path in cache_dir.glob(f"*{SUFFIX}"):
        with contextlib.suppress(OSError):  # removed meanwhile by another worker
            stat = path.stat()
            files.append((stat.st_mtime, stat.st_size, path))
    files.sort()
    total = sum(size for _, size, _ in files)
    recent = time.time() - IN_USE
    for used, size, path in files:
        if total <= limit or used > recent:
            return
        path.unlink(missing_ok=True)
        total -= size
