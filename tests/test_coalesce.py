"""Lookups that arrive together are answered together, and each caller gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from fluxserve.store.coalesce import Coalescer


class Squares:
    """A lookup that records its rounds and takes a moment, as a database would."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []
        self.fail = False

    async def __call__(self, keys: list[int]) -> dict[int, int]:
        self.rounds.append(sorted(keys))
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("database unavailable")
        return {key: key * key for key in keys if key >= 0}


async def test_a_lone_lookup_runs_at_once_and_later_ones_share_the_next_round() -> None:
    squares = Squares()
    reads = Coalescer(squares)
    first = asyncio.create_task(reads.get(1))
    await asyncio.sleep(0)  # the first round starts with key 1 alone
    rest = [asyncio.create_task(reads.get(key)) for key in (2, 3, 3, -4)]
    assert await asyncio.gather(first, *rest) == [1, 4, 9, 9, None]
    assert squares.rounds == [[1], [-4, 2, 3]]
    assert await reads.get(5) == 25
    assert squares.rounds[-1] == [5]


async def test_a_failed_round_fails_its_callers_only() -> None:
    squares = Squares()
    reads = Coalescer(squares)
    squares.fail = True
    results = await asyncio.gather(reads.get(1), reads.get(2), return_exceptions=True)
    assert [str(error) for error in results] == ["database unavailable"] * 2
    squares.fail = False
    assert await reads.get(3) == 9


async def test_a_caller_that_gives_up_leaves_the_others_their_answers() -> None:
    squares = Squares()
    reads = Coalescer(squares)
    waiting = [asyncio.create_task(reads.get(key)) for key in (1, 2, 3)]
    await asyncio.sleep(0)
    waiting[1].cancel()
    assert await waiting[0] == 1 and await waiting[2] == 9
    with pytest.raises(asyncio.CancelledError):
        await waiting[1]


async def test_closing_cancels_whoever_still_waits() -> None:
    reads = Coalescer(Squares())
    waiting = [asyncio.create_task(reads.get(key)) for key in (1, 2)]
    await asyncio.sleep(0)
    later = asyncio.create_task(reads.get(3))
    await asyncio.sleep(0)
    await reads.close()
    for task in (*waiting, later):
        with pytest.raises(asyncio.CancelledError):
            await task
