"""The worker's side of `input.loras`: each LoRA as a file on this machine.

A named LoRA is looked up again in the LoRA folder and the Hugging Face cache (it
may have gone since submit). A LoRA by URL is fetched through the net guard,
chunk by chunk into a hidden partial file in `lora_cache_dir` (never whole in
memory), checked to be a LoRA safetensors file, and renamed into place under its
content hash, with a note of the URL's hash pointing at it: the same URL is
fetched once, and the same bytes from two URLs are one adapter. Each use marks a
file's time; past `lora_cache_bytes`, a new fetch removes the least recently
used files, but none used in the last `IN_USE` seconds (a task may be about to
load it, here or in another worker on this disk), and the notes of the files
removed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import httpx

from fluxserve.engines.base import LoraWeights
from fluxserve.errors import EngineError
from fluxserve.loras import SUFFIX, LoraCatalog, is_lora, safetensors_header
from fluxserve.net_fetch import fetch_streamed
from fluxserve.net_policy import NetPolicy
from fluxserve.settings import Settings
from fluxserve.tasks import LoraSpec

# A LoRA may be hundreds of megabytes: longer than a reference image's fetch_timeout.
LORA_FETCH_TIMEOUT = 600.0
IN_USE = 3600.0
"""Seconds after its last use that a cached LoRA is never removed, whatever the cache's size."""
PARTIAL = ".partial"
"""How the name of a LoRA still being fetched ends; it is renamed once whole and checked."""


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
            return await self._download(url, url_hash, client)

    async def _download(self, url: str, url_hash: str, client: httpx.AsyncClient) -> Path:
        """Fetch `url` into a partial file, hashing as it comes, and keep it once whole;
        whatever fails or is refused, the partial file goes."""
        partial, file = await asyncio.to_thread(_open_partial, self.cache_dir)
        digest = hashlib.sha256()

        def write(chunk: bytes) -> None:
            file.write(chunk)
            digest.update(chunk)

        try:
            with file:
                await fetch_streamed(
                    client,
                    url,
                    write,
                    policy=self.policy,
                    max_bytes=self.settings.max_lora_bytes,
                    total_timeout=LORA_FETCH_TIMEOUT,
                )
            return await asyncio.to_thread(self._keep, url, url_hash, partial, digest.hexdigest())
        finally:
            partial.unlink(missing_ok=True)  # renamed away when kept

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

    def _keep(self, url: str, url_hash: str, partial: Path, content_hash: str) -> Path:
        if not is_lora(safetensors_header(partial)):
            raise EngineError(f"LoRA {url} is not a LoRA in the safetensors format")
        path = self.cache_dir / f"{content_hash}{SUFFIX}"
        os.replace(partial, path)
        (self.cache_dir / "urls").mkdir(exist_ok=True)
        _write_atomically(self.cache_dir / "urls" / url_hash, content_hash.encode())
        _trim(self.cache_dir, self.settings.lora_cache_bytes)
        return path


def _file_key(path: Path) -> str:
    """A key for a named LoRA's file that changes when the file is replaced; no hashing of
    its contents, which may be large and read on every task."""
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()


def _open_partial(cache_dir: Path) -> tuple[Path, BinaryIO]:
    """A new hidden file in `cache_dir` for one fetch, open for writing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".", suffix=PARTIAL, dir=cache_dir)
    return Path(name), os.fdopen(fd, "wb")


def _write_atomically(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
    partial.write_bytes(content)
    os.replace(partial, path)


def _trim(cache_dir: Path, limit: int) -> None:
    """Remove the least recently used LoRAs while the cache holds more than `limit`
    bytes, sparing those used in the last `IN_USE` seconds (the newest among them),
    then the URL notes left pointing at no file.

    Partial files count toward the size, as fetches under way; one untouched for
    `IN_USE` seconds, far longer than a fetch may take, was left by a worker that
    died mid-fetch, and goes whatever the size.
    """
    recent = time.time() - IN_USE
    partials = _by_use(cache_dir, f".*{PARTIAL}")
    files = _by_use(cache_dir, f"*{SUFFIX}")
    total = sum(size for _, size, _ in partials + files)
    for used, size, path in partials:
        if used <= recent:
            path.unlink(missing_ok=True)
            total -= size
    for used, size, path in files:
        if total <= limit or used > recent:
            break
        path.unlink(missing_ok=True)
        total -= size
    _forget_removed(cache_dir)


def _by_use(cache_dir: Path, pattern: str) -> list[tuple[float, int, Path]]:
    """The files in `cache_dir` matching `pattern` as (last used, size, path), the least
    recently used first."""
    found = []
    for path in cache_dir.glob(pattern):
        with contextlib.suppress(OSError):  # removed meanwhile by another worker
            stat = path.stat()
            found.append((stat.st_mtime, stat.st_size, path))
    return sorted(found)


def _forget_removed(cache_dir: Path) -> None:
    """Remove the URL notes whose file is no longer in the cache: removed here, by
    another worker, or by hand. (A note being written is a hidden partial: spared.)"""
    for note in (cache_dir / "urls").iterdir():
        if note.name.startswith("."):
            continue
        with contextlib.suppress(OSError):  # removed meanwhile by another worker
            if not (cache_dir / f"{note.read_text().strip()}{SUFFIX}").exists():
                note.unlink()
