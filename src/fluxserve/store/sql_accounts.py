"""Accounts and their credits, on the shared SQL store.

A task's own credit movements (hold at submit, then charge or release) are
written by the task's transitions in `sql.py`, in the same transaction as the
status they follow; this module holds the account itself and its grants.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fluxserve.errors import AlreadyStored, Conflict, NotFound
from fluxserve.store.base import Account, ApiKeyRecord, LedgerEntry
from fluxserve.store.rows import key_from_row
from fluxserve.store.schema import accounts, api_keys, credit_ledger
from fluxserve.store.sql_base import SqlBase


class LedgerKind:
    """Ledger rows. Grants and charges move the balance; holds and releases the held part."""

    GRANT = "grant"  # + or -, by an operator
    HOLD = "hold"  # a task's price, promised at submit
    CHARGE = "charge"  # - the price, when the task finishes
    RELEASE = "release"  # the hold given back, when the task fails or is cancelled


_KEY_BY_HASH = api_keys.select().where(api_keys.c.key_hash == sa.bindparam("key_hash"))


class AccountQueries(SqlBase):
    """API keys, accounts, grants and the ledger; mixed into SqlStore."""

    # API keys ---------------------------------------------------------------
    async def create_key(
        self, key_id: str, name: str, key_hash: str, prefix: str, account_id: str
    ) -> None:
        async with self._write() as conn:
            await conn.execute(_key_insert(key_id, name, key_hash, prefix, account_id))

    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self._fetch_one(_KEY_BY_HASH, key_hash=key_hash)
        return None if row is None else key_from_row(row)

    async def list_keys(self) -> list[ApiKeyRecord]:
        async with self._read() as conn:
            rows = await conn.execute(api_keys.select().order_by(api_keys.c.created_at))
            return [key_from_row(row) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        async with self._write() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        return result.rowcount == 1

    # Accounts ---------------------------------------------------------------
    async def create_account(self, account_id: str, email: str) -> Account:
        try:
            async with self._write() as conn:
                await conn.execute(
                    accounts.insert().values(
                        account_id=account_id, email=email, created_at=time.time()
                    )
                )
        except AlreadyStored as exc:
            raise Conflict(f"An account with email {email} exists already") from exc
        made = await self.get_account(account_id)
        assert made is not None
        return made

    async def create_first_key(
        self, account_id: str, email: str, key_id: str, name: str, key_hash: str, prefix: str
    ) -> bool:
        # One transaction: a crash leaves no account without its key, and of two
        # processes that found no account at once, the unique email lets one through.
        now = time.time()
        try:
            async with self._write() as conn:
                if (await conn.execute(sa.select(accounts.c.account_id).limit(1))).first():
                    return False
                await conn.execute(
                    accounts.insert().values(account_id=account_id, email=email, created_at=now)
                )
                await conn.execute(_key_insert(key_id, name, key_hash, prefix, account_id))
        except AlreadyStored:
            return False
        return True

    async def get_account(self, account_id: str) -> Account | None:
        return await self._account(accounts.c.account_id == account_id)

    async def account_by_email(self, email: str) -> Account | None:
        return await self._account(accounts.c.email == email)

    async def _account(self, where: sa.ColumnElement[bool]) -> Account | None:
        async with self._read() as conn:
            row = (await conn.execute(accounts.select().where(where))).first()
        return None if row is None else _account_record(row)

    async def grant_credits(self, account_id: str, amount: int, note: str | None) -> Account:
        async with self._write() as conn:
            row = (
                await conn.execute(
                    accounts.update()
                    .where(accounts.c.account_id == account_id)
                    .values(balance=accounts.c.balance + amount)
                    .returning(*accounts.c)
                )
            ).first()
            if row is None:
                raise NotFound(f"No account {account_id}")
            await add_ledger_row(conn, account_id, None, LedgerKind.GRANT, amount, note)
        return _account_record(row)

    async def ledger(self, account_id: str, limit: int) -> list[LedgerEntry]:
        statement = (
            credit_ledger.select()
            .where(credit_ledger.c.account_id == account_id)
            .order_by(credit_ledger.c.entry_id.desc())
            .limit(limit)
        )
        async with self._read() as conn:
            return [
                LedgerEntry(r.entry_id, r.task_id, r.kind, r.amount, r.note, r.created_at)
                for r in await conn.execute(statement)
            ]


async def add_ledger_row(
    conn: AsyncConnection,
    account_id: str,
    task_id: str | None,
    kind: str,
    amount: int,
    note: str | None = None,
) -> None:
    await conn.execute(
        credit_ledger.insert().values(
            account_id=account_id,
            task_id=task_id,
            kind=kind,
            amount=amount,
            note=note,
            created_at=time.time(),
        )
    )


async def settle_task_credits(
    conn: AsyncConnection, account_id: str | None, task_id: str, price: int, finished: bool
) -> None:
    """Charge (finished) or release (failed) a task's hold, in its ending transaction.

    The caller's status write is guarded so that a task ends once; the ledger's
    unique (task_id, kind) is the second line against a double charge.
    """
    if price <= 0 or account_id is None:
        return
    kind = LedgerKind.CHARGE if finished else LedgerKind.RELEASE
    await add_ledger_row(conn, account_id, task_id, kind, -price if finished else price)
    values: dict[str, Any] = {"held": accounts.c.held - price}
    if finished:
        values["balance"] = accounts.c.balance - price
    await conn.execute(
        accounts.update().where(accounts.c.account_id == account_id).values(**values)
    )


def _key_insert(key_id: str, name: str, key_hash: str, prefix: str, account_id: str) -> sa.Insert:
    """The statement that stores a key: its hash and prefix, never the key itself."""
    return api_keys.insert().values(
        key_id=key_id,
        name=name,
        key_hash=key_hash,
        prefix=prefix,
        created_at=time.time(),
        account_id=account_id,
    )


def _account_record(row: Any) -> Account:
    return Account(row.account_id, row.email, row.created_at, row.balance, row.held)
