"""API keys: made here, shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

KEY_PREFIX = "fsk_"


@dataclass(frozen=True)
class NewKey:
    key_id: str
    secret: str
    key_hash: str
    prefix: str


def hash_key(secret: str) -> str:
    """The stored form of a key. Keys are 256 random bits, so a fast hash is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> NewKey:
    """A fresh key: the secret is printed once and never stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(
        key_id="key_" + secrets.token_hex(6),
        secret=secret,
        key_hash=hash_key(secret),
        prefix=secret[:10],
    )
