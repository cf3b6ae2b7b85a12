"""Lookups that arrive together are answered together.

While one round of lookups runs, new keys wait; the next round takes all of
them. A lone lookup starts a round at once, so it waits for nothing; under load,
one round answers many callers, with one round trip and one pass over whatever
they share (see `PostgresStore.get_task_and_position`), or one transaction for
many writes (see `group_commit.py`).

Keys may fall into partitions, each with rounds of its own: a round that waits
(on a row lock, say) holds up only the keys of its partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_Waiting = dict[K, list[asyncio.Future[V | None]]]


class Coalescer(Generic[K, V]):
    """`get(key)` through `lookup(keys) -> {key: value}`, one round at a time in
    each `partition(key)` (by default, one partition for all)."""

    def __init__(
        self,
        lookup: Callable[[list[K]], Awaitable[dict[K, V]]],
        partition: Callable[[K], Hashable] = lambda _key: None,
    ) -> None:
        self._lookup = lookup
        self._partition = partition
        self._waiting: dict[Hashable, _Waiting[K, V]] = {}
        self._rounds: dict[Hashable, asyncio.Task[None]] = {}

    async def get(self, key: K) -> V | None:
        """The value for `key`, or None when the lookup found none."""
        answer: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        part = self._partition(key)
        self._waiting.setdefault(part, {}).setdefault(key, []).append(answer)
        if part not in self._rounds:
            self._rounds[part] = asyncio.create_task(self._run_rounds(part))
        return await answer

    async def close(self) -> None:
        """Stop; whoever still waits gets CancelledError."""
        rounds = list(self._rounds.values())
        for running in rounds:
            running.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)

    async def _run_rounds(self, part: Hashable) -> None:
        batch: _Waiting[K, V] = {}
        try:
            while batch := self._waiting.pop(part, {}):
                try:
                    found = await self._lookup(list(batch))
                except Exception as exc:  # each caller gets the round's error
                    for _, answer in _pending(batch):
                        answer.set_exception(exc)
                else:
                    for key, answer in _pending(batch):
                        answer.set_result(found.get(key))
        finally:
            del self._rounds[part]
            for waiting in (batch, self._waiting.pop(part, {})):
                for _, answer in _pending(waiting):
                    answer.cancel()


def _pending(batch: _Waiting[K, V]) -> Iterator[tuple[K, asyncio.Future[V | None]]]:
    """Each key's answers whose callers have not given up on them."""
    for key, answers in batch.items():
        for answer in answers:
            if not answer.done():
                yield key, answer
