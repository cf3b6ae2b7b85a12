"""Lookups that arrive together are answered together.

While one round of lookups runs, new keys wait; the next round takes all of
them. A lone lookup starts a round at once, so it waits for nothing; under load,
one round answers many callers, with one round trip and one pass over whatever
they share (see `PostgresStore.get_task_and_position`), or one transaction for
many writes (see `group_commit.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`get(key)` through `lookup(keys) -> {key: value}`, one round at a time."""

    def __init__(self, lookup: Callable[[list[K]], Awaitable[dict[K, V]]]) -> None:
        self._lookup = lookup
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._round: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V | None:
        """The value for `key`, or None when the lookup found none."""
        answer: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(answer)
        if self._round is None:
            self._round = asyncio.create_task(self._rounds())
        return await answer

    async def close(self) -> None:
        """Stop; whoever still waits gets CancelledError."""
        if self._round is not None:
            self._round.cancel()
            await asyncio.gather(self._round, return_exceptions=True)

    async def _rounds(self) -> None:
        batch: dict[K, list[asyncio.Future[V | None]]] = {}
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    found = await self._lookup(list(batch))
                except Exception as exc:  # each caller gets the round's error
                    for _, answer in _pending(batch):
                        answer.set_exception(exc)
                else:
                    for key, answer in _pending(batch):
                        answer.set_result(found.get(key))
                batch = {}
        finally:
            self._round = None
            for waiting in (batch, self._waiting):
                for _, answer in _pending(waiting):
                    answer.cancel()
            self._waiting = {}


def _pending(
    batch: dict[K, list[asyncio.Future[V | None]]],
) -> Iterator[tuple[K, asyncio.Future[V | None]]]:
    """Each key's answers whose callers have not given up on them."""
    for key, answers in batch.items():
        for answer in answers:
            if not answer.done():
                yield key, answer
