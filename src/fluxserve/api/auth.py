"""The API key: `Authorization: Bearer <key>`, or BFL's `x-key: <key>`."""

from __future__ import annotations

from collections.abc import Mapping

from fluxserve.api.keycache import KeyCache
from fluxserve.errors import Unauthenticated
from fluxserve.keys import hash_key
from fluxserve.store import ApiKeyRecord


async def authenticate(keys: KeyCache, headers: Mapping[str, str]) -> ApiKeyRecord:
    """The key behind the request's bearer token (or `x-key`, as Black Forest Labs'
    clients send it); 401 if missing, unknown or revoked."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    token = token or headers.get("x-key", "").strip()
    if not token:
        raise Unauthenticated("Missing API key: send the header 'Authorization: Bearer <key>'")
    record = await keys.lookup(hash_key(token))
    if record is None:
        raise Unauthenticated("Invalid API key")
    if record.revoked_at is not None:
        raise Unauthenticated("API key has been revoked")
    return record
