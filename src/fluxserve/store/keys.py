"""API keys: their hashes and prefixes, never the keys themselves."""

from __future__ import annotations

import time

import sqlalchemy as sa

from fluxserve.errors import AlreadyStored
from fluxserve.store import credits
from fluxserve.store.base import ApiKeyRecord
from fluxserve.store.connection import Database
from fluxserve.store.rows import key_from_row
from fluxserve.store.schema import accounts, api_keys

KEY_BY_HASH = api_keys.select().where(api_keys.c.key_hash == sa.bindparam("key_hash"))


def _new_key(key_id: str, name: str, key_hash: str, prefix: str, account_id: str) -> sa.Insert:
    return api_keys.insert().values(
        key_id=key_id,
        name=name,
        key_hash=key_hash,
        prefix=prefix,
        created_at=time.time(),
        account_id=account_id,
    )


async def create_key(
    db: Database, key_id: str, name: str, key_hash: str, prefix: str, account_id: str
) -> None:
    try:
        await db.execute(_new_key(key_id, name, key_hash, prefix, account_id))
    except AlreadyStored:
        # Ours, when a try whose connection was lost as it committed ran again.
        made = await key_for_hash(db, key_hash)
        if made is None or made.key_id != key_id:
            raise


async def create_first_key(
    db: Database, account_id: str, email: str, key_id: str, name: str, key_hash: str, prefix: str
) -> bool:
    # One transaction: a crash leaves no account without its key, and of two
    # processes that found no account at once, the unique email lets one through.
    try:
        async with db.transaction() as conn:
            if await conn.one(sa.select(accounts.c.account_id).limit(1)) is not None:
                return False
            await conn.execute(credits.new_account(account_id, email))
            await conn.execute(_new_key(key_id, name, key_hash, prefix, account_id))
    except AlreadyStored:
        return False
    return True


async def key_for_hash(db: Database, key_hash: str) -> ApiKeyRecord | None:
    row = await db.one(KEY_BY_HASH, key_hash=key_hash)
    return None if row is None else key_from_row(row)


async def list_keys(db: Database) -> list[ApiKeyRecord]:
    return [
        key_from_row(row) for row in await db.all(api_keys.select().order_by(api_keys.c.created_at))
    ]


async def revoke_key(db: Database, key_id: str) -> ApiKeyRecord | None:
    # A key revoked before keeps its time: run again (a try whose connection was lost
    # as it committed), this answers what the first run did.
    row = await db.one(
        api_keys.update()
        .where(api_keys.c.key_id == key_id)
        .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, time.time()))
        .returning(*api_keys.c)
    )
    return None if row is None else key_from_row(row)
