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


async def test_a_partition_whose_round_waits_holds_up_only_its_own_keys() -> None:
    released = asyncio.Event()
    rounds: list[list[str]] = []

    async def lookup(keys: list[str]) -> dict[str, str]:
        rounds.append(sorted(keys))
        if keys[0].startswith("slow"):
            await released.wait()
        return {key: key.upper() for key in keys}

    reads = Coalescer(lookup, partition=lambda key: key.split("-")[0])
    slow = asyncio.create_task(reads.get("slow-1"))
    await asyncio.sleep(0)
    later_slow = asyncio.create_task(reads.get("slow-2"))
    fast = await asyncio.wait_for(asyncio.gather(reads.get("fast-1"), reads.get("fast-2")), 5)
    assert fast == ["FAST-1", "FAST-2"]
    assert not slow.done() and not later_slow.done()
    released.set()
    assert (await slow, await later_slow) == ("SLOW-1", "SLOW-2")
    assert rounds == [["slow-1"], ["fast-1", "fast-2"], ["slow-2"]]
