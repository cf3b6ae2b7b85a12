"""Group commit: submits that arrive together share one transaction.

A submit without per-key limits refuses (its credits, its Idempotency-Key)
before it writes anything, and locks no row but its account's. So the submits
that reach a busy process while its previous ones are being written can run one
after another in one transaction: one commit (one sync of the disk on SQLite,
one NOTIFY on PostgreSQL) for all of them. A lone submit still runs at once.

Each submit is answered once the shared transaction has committed, with its own
task or its own refusal. When the shared transaction fails (a write refused to
repeat: a task id or an Idempotency-Key already taken), each of its submits runs
again alone, so only the one at fault sees the error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from fluxserve.errors import AlreadyStored, ApiError
from fluxserve.store.coalesce import Coalescer
from fluxserve.store.connection import Connection, Database

T = TypeVar("T")
Work = Callable[[Connection], Awaitable[Any]]


@dataclass(eq=False)
class Write:
    """A write, the channels its commit wakes, and the key (an account) whose rows
    alone it locks."""

    work: Work
    wake: tuple[str, ...]
    key: str


@dataclass(frozen=True)
class _Failed:
    """A write's own error, handed to its caller alone."""

    error: BaseException


class GroupCommit:
    """`write()` on `db`; `alone(write)` runs a lone write (by default, as a
    transaction of its own).

    `per_key`: the writes of each key share transactions of their own, and the
    keys' transactions run side by side (PostgreSQL: no two of them wait on
    each other's rows, and a key whose row is locked holds up only its own
    writes). Otherwise all share one (SQLite: one writer anyway).
    """

    def __init__(
        self,
        db: Database,
        alone: Callable[[Write], Awaitable[Any]] | None = None,
        *,
        per_key: bool,
    ) -> None:
        self._db = db
        self._alone = alone or self._transaction_of_its_own
        self._rounds: Coalescer[Write, Any] = Coalescer(
            self._group, (lambda write: write.key) if per_key else (lambda _write: None)
        )

    async def write(
        self, work: Callable[[Connection], Awaitable[T]], wake: tuple[str, ...], key: str
    ) -> T:
        """The write's answer, once the transaction it shared has committed."""
        answer = await self._rounds.get(Write(work, wake, key))
        if isinstance(answer, _Failed):
            raise answer.error
        return cast(T, answer)

    async def close(self) -> None:
        await self._rounds.close()

    async def _transaction_of_its_own(self, write: Write) -> Any:
        async with self._db.transaction(write.wake) as conn:
            return await write.work(conn)

    async def _group(self, writes: list[Write]) -> dict[Write, Any]:
        """Each write's answer, or its own error as `_Failed`."""
        if len(writes) > 1:
            wake = tuple(sorted({channel for write in writes for channel in write.wake}))
            try:
                async with self._db.transaction(wake) as conn:
                    return {write: await _answer(write, conn) for write in writes}
            except AlreadyStored:
                pass  # one of them refused to repeat: each alone, to learn which
            except Exception as exc:
                return dict.fromkeys(writes, _Failed(exc))
        answers = {}
        for write in writes:
            try:
                answers[write] = await self._alone(write)
            except Exception as exc:
                answers[write] = _Failed(exc)
        return answers


async def _answer(write: Write, conn: Connection) -> Any:
    """The write's answer, or its refusal (an ApiError, raised before it wrote).
    Any other error ends the whole transaction."""
    try:
        return await write.work(conn)
    except ApiError as exc:
        return _Failed(exc)
