"""API keys looked up once per process and reused for a few seconds.

Every request names its key, and a store round trip costs more than the rest of
a status read. A key found is reused for `ttl` seconds, so a key revoked in the
store (`fluxserve keys revoke`, or by another process) keeps working in this
process for up to `ttl` seconds. Unknown keys are not kept: a key created
elsewhere works at once, and made-up keys cannot fill the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fluxserve.store import ApiKeyRecord
from fluxserve.store.ports import Accounts

MAX_KEYS = 10_000


class KeyCache:
    """`key_for_hash` with each found key remembered for `ttl` seconds (0: never)."""

    def __init__(
        self,
        store: Accounts,
        ttl: float,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._max_keys = max_keys
        self._clock = clock
        # key hash -> (when it goes stale, the record); oldest first.
        self._keys: dict[str, tuple[float, ApiKeyRecord]] = {}

    async def lookup(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, revoked or not; None if the store has none."""
        now = self._clock()
        cached = self._keys.get(key_hash)
        if cached is not None and now < cached[0]:
            return cached[1]
        record = await self._store.key_for_hash(key_hash)
        self._keys.pop(key_hash, None)
        if record is not None and self._ttl > 0:
            if len(self._keys) >= self._max_keys:
                del self._keys[next(iter(self._keys))]
            self._keys[key_hash] = (now + self._ttl, record)
        return record
