"""The API key: `Authorization: Bearer <key>`, or BFL's `x-key: <key>`."""

from __future__ import annotations

from collections.abc import Mapping

from fluxserve.api.keycache import KeyCache
from fluxserve.errors import Unauthenticated
from fluxserve.keys import hash_key
from fluxserve.store import ApiKeyRecord


async def authenticate(keys: KeyCache, headers: Mapping[str, str]) -> ApiKeyRecord:
    """The key behind the request's `x-key` (as Black Forest Labs' clients send it)
    or else its bearer token; 401 if missing, unknown or revoked. An `x-key` that
    is sent is the one that counts, empty or bad."""
    if "x-key" in headers:
        token = headers["x-key"].strip()
    else:
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        token = bearer.strip() if scheme.lower() == "bearer" else ""
    if not token:
        raise Unauthenticated("Missing API key: send the header 'Authorization: Bearer <key>'")
    record = await keys.lookup(hash_key(token))
    if record is None:
        raise Unauthenticated("Invalid API key")
    if record.revoked_at is not None:
        raise Unauthenticated("API key has been revoked")
    return record
