"""Accounts own keys, tasks and credits. Every key belongs to one."""

from __future__ import annotations

import secrets

from fluxserve.errors import NotFound
from fluxserve.keys import NewKey, new_key
from fluxserve.store import Store
from fluxserve.store.base import Account


def new_account_id() -> str:
    return "acct_" + secrets.token_hex(6)


async def create_account(store: Store, email: str) -> Account:
    """A new account with no credits; Conflict if the email has one."""
    return await store.create_account(new_account_id(), email)


async def create_key(store: Store, name: str, email: str | None = None) -> tuple[NewKey, Account]:
    """A key for the account of `email`, or, with none given, for a new account of its own
    (`<key_id>@localhost`)."""
    key = new_key()
    if email is None:
        account = await create_account(store, f"{key.key_id}@localhost")
    else:
        found = await store.account_by_email(email)
        if found is None:
            raise NotFound(
                f"No account {email}; create it with: fluxserve accounts create --email {email}"
            )
        account = found
    await store.create_key(key.key_id, name, key.key_hash, key.prefix, account.account_id)
    return key, account
