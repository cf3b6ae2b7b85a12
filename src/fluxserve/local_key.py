"""The data directory's own key: made at `serve`'s first start, kept for `fluxserve generate`.

On the first start of `fluxserve serve` with a database that has no account yet,
a key is made for a first account (`first@localhost`) and printed once, inside the
page's URL. The database keeps only its hash, like every key's; the key itself is
kept in `<data_dir>/local.key`, readable by its owner alone (who can read the data
directory's database already), so that `fluxserve generate` on the same data
directory finds it: in process, or against a server with `--server` and no `--key`.
Revoked, the key is replaced by the next one made the same way.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fluxserve import accounts
from fluxserve.errors import Conflict
from fluxserve.keys import hash_key, new_key
from fluxserve.store import Store

KEY_FILE = "local.key"
FIRST_ACCOUNT = "first@localhost"


def key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILE


def saved_key(data_dir: Path) -> str | None:
    """The key kept in the data directory, if there is one."""
    path = key_path(data_dir)
    return (path.read_text().strip() or None) if path.is_file() else None


def _keep(data_dir: Path, secret: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = key_path(data_dir)
    # Made with its mode, never readable by others, even for a moment.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")


async def first_start_key(store: Store, data_dir: Path) -> str | None:
    """A key for the first account, kept in the data directory, if the database has no
    account yet; None if it has one. Of processes starting at once, one makes it."""
    made = new_key()
    if not await store.create_first_key(
        accounts.new_account_id(),
        FIRST_ACCOUNT,
        made.key_id,
        "first start",
        made.key_hash,
        made.prefix,
    ):
        return None
    _keep(data_dir, made.secret)
    return made.secret


async def new_local_key(store: Store, data_dir: Path, name: str) -> str:
    """A new key for the first account (made now if there is none), kept in the data
    directory in place of the one before."""
    if await store.account_by_email(FIRST_ACCOUNT) is None:
        with contextlib.suppress(Conflict):  # made by another process meanwhile
            await accounts.create_account(store, FIRST_ACCOUNT)
    made, _ = await accounts.create_key(store, name, FIRST_ACCOUNT)
    _keep(data_dir, made.secret)
    return made.secret


async def local_key(store: Store, data_dir: Path, name: str) -> str:
    """The key kept in the data directory while the store honours it, else a new one."""
    saved = saved_key(data_dir)
    if saved:
        record = await store.key_for_hash(hash_key(saved))
        if record is not None and record.revoked_at is None:
            return saved
    return await new_local_key(store, data_dir, name)
