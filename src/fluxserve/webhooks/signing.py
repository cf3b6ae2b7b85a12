"""Standard Webhooks signatures, and the per-key secrets that make them.

A callback carries `webhook-id`, `webhook-timestamp` and `webhook-signature:
v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the secret's
decoded bytes (https://www.standardwebhooks.com). Each API key has its own
secret, `whsec_<base64>`, made the first time it is needed. The server must know
it to sign, so unlike the API key it is stored as it is.

Rotation keeps the previous secret signing beside the new one for a grace
period; the header then holds both signatures, space-separated, and a receiver
holding either secret verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Sequence

from fluxserve.store import Store
from fluxserve.store.base import WebhookSecret

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the standard asks for 24 to 64


def new_secret() -> str:
    """A fresh signing secret, `whsec_` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of a message."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    message = b"%s.%d.%s" % (event_id.encode(), timestamp, body)
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: Sequence[str], event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one signature per secret, space-separated."""
    return " ".join(sign(secret, event_id, timestamp, body) for secret in secrets)


class WebhookSecrets:
    """Each API key's signing secret: made when first asked for, rotated on request."""

    def __init__(self, store: Store, *, grace_seconds: float) -> None:
        self.store = store
        self.grace_seconds = grace_seconds

    async def current(self, key_id: str) -> WebhookSecret:
        """The key's secret, made now if it has none yet."""
        return await self.store.webhook_secret(key_id, new_secret())

    async def rotate(self, key_id: str) -> WebhookSecret:
        """A new secret; the one it replaces keeps signing for the grace period."""
        return await self.store.rotate_webhook_secret(
            key_id, new_secret(), time.time() + self.grace_seconds
        )

    async def signing(self, key_id: str) -> list[str]:
        """The secrets that sign the key's callbacks now: the current one first."""
        record = await self.current(key_id)
        secrets = [record.secret]
        if record.previous_secret is not None and record.previous_signs(time.time()):
            secrets.append(record.previous_secret)
        return secrets
