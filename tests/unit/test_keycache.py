"""The per-process API-key cache: reused within its TTL, looked up again after."""

from __future__ import annotations

from typing import Any

from fluxserve.api.keycache import KeyCache
from fluxserve.store import ApiKeyRecord, Store


class Keys:
    """The one store method the cache calls, counting its calls."""

    def __init__(self) -> None:
        self.records: dict[str, ApiKeyRecord] = {}
        self.lookups = 0

    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
        self.lookups += 1
        return self.records.get(key_hash)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(key_id: str, revoked_at: float | None = None) -> ApiKeyRecord:
    return ApiKeyRecord(key_id, "name", "fsk_abc", 0.0, revoked_at, "acct_1")


def cache(keys: Keys, clock: Clock, ttl: float = 5.0, **options: Any) -> KeyCache:
    store: Store = keys  # type: ignore[assignment]
    return KeyCache(store, ttl, clock=clock, **options)


async def test_a_key_is_looked_up_once_per_ttl() -> None:
    keys, clock = Keys(), Clock()
    keys.records["h1"] = record("key_1")
    keycache = cache(keys, clock)
    assert await keycache.lookup("h1") == record("key_1")
    clock.now += 4.9
    assert await keycache.lookup("h1") == record("key_1")
    assert keys.lookups == 1
    clock.now += 0.2
    assert await keycache.lookup("h1") == record("key_1")
    assert keys.lookups == 2


async def test_a_revoke_in_the_store_shows_once_the_ttl_has_passed() -> None:
    keys, clock = Keys(), Clock()
    keys.records["h1"] = record("key_1")
    keycache = cache(keys, clock)
    await keycache.lookup("h1")
    keys.records["h1"] = record("key_1", revoked_at=1001.0)
    assert (await keycache.lookup("h1")) == record("key_1")
    clock.now += 5.0
    found = await keycache.lookup("h1")
    assert found is not None and found.revoked_at == 1001.0


async def test_unknown_keys_are_not_kept() -> None:
    keys, clock = Keys(), Clock()
    keycache = cache(keys, clock)
    assert await keycache.lookup("h1") is None
    keys.records["h1"] = record("key_1")  # created by another process meanwhile
    assert await keycache.lookup("h1") == record("key_1")


async def test_a_ttl_of_zero_looks_up_every_time() -> None:
    keys, clock = Keys(), Clock()
    keys.records["h1"] = record("key_1")
    keycache = cache(keys, clock, ttl=0)
    for _ in range(3):
        await keycache.lookup("h1")
    assert keys.lookups == 3


async def test_a_full_cache_drops_its_oldest_key() -> None:
    keys, clock = Keys(), Clock()
    for n in range(3):
        keys.records[f"h{n}"] = record(f"key_{n}")
    keycache = cache(keys, clock, max_keys=2)
    for n in range(3):
        await keycache.lookup(f"h{n}")
    keys.lookups = 0
    await keycache.lookup("h2")
    await keycache.lookup("h1")
    assert keys.lookups == 0
    await keycache.lookup("h0")
    assert keys.lookups == 1
