"""`Authorization: Bearer <key>` on every /api route."""

from __future__ import annotations

from collections.abc import Mapping

from fluxserve.api.keycache import KeyCache
from fluxserve.errors import Unauthenticated
from fluxserve.keys import hash_key
from fluxserve.store import ApiKeyRecord


async def authenticate(keys: KeyCache, headers: Mapping[str, str]) -> ApiKeyRecord:
    """The key behind the request's bearer token; 401 if missing, unknown or revoked."""
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("Missing API key: send the header 'Authorization: Bearer <key>'")
    record = await keys.lookup(hash_key(token))
    if record is None:
        raise Unauthenticated("Invalid API key")
    if record.revoked_at is not None:
        raise Unauthenticated("API key has been revoked")
    return record
