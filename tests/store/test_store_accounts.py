"""The store contract for accounts: credits, cancel, idempotency, limits, the fair queue
and history. Every test runs on SQLite and on PostgreSQL (the `store` fixture)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_store import outcome

from fluxserve.errors import Conflict, InsufficientCredits, RateLimited
from fluxserve.store import Store
from fluxserve.store.base import Account, IdempotencyKey, LeaseState, SubmitLimits
from fluxserve.tasks import (
    CANCELLED_MESSAGE,
    NewTask,
    ResultFile,
    Task,
    TaskInput,
    TaskStatus,
    new_task_id,
)

from conftest import queue_position

INPUT = TaskInput(prompt="a lighthouse at dusk", size="1:1", resolution="1K")
HOOK = "https://example.com/hook"


async def account(store: Store, name: str, credits: int = 0) -> Account:
    made = await store.create_account(f"acct_{name}", f"{name}@example.com")
    await store.create_key(f"key_{name}", name, (name * 64)[:64], "fsk_" + name, made.account_id)
    if credits:
        made = await store.grant_credits(made.account_id, credits, "top-up")
    return made


async def submit(
    store: Store,
    who: Account,
    *,
    price: int = 0,
    model: str = "flux-2-pro",
    callback: str | None = None,
    limits: SubmitLimits | None = None,
    idempotency: IdempotencyKey | None = None,
) -> Task:
    task = NewTask(
        new_task_id(),
        "key_" + who.account_id.removeprefix("acct_"),
        who.account_id,
        model,
        INPUT,
        callback,
        time.time(),
        price=price,
    )
    return await store.create_task(task, limits=limits, idempotency=idempotency)


async def balance(store: Store, who: Account) -> tuple[int, int]:
    now = await store.get_account(who.account_id)
    assert now is not None
    return now.balance, now.held


async def kinds(store: Store, who: Account) -> list[tuple[str, int]]:
    """The account's ledger, oldest first, as (kind, amount)."""
    return [(e.kind, e.amount) for e in reversed(await store.ledger(who.account_id, 100))]


# --- accounts and credits -----------------------------------------------------------


async def test_accounts_are_unique_by_email(store: Store) -> None:
    alice = await account(store, "alice")
    assert await store.account_by_email("alice@example.com") == alice
    with pytest.raises(Conflict):
        await store.create_account("acct_other", "alice@example.com")
    key = await store.key_for_hash(("alice" * 64)[:64])
    assert key is not None and key.account_id == alice.account_id


async def test_price_is_held_then_charged_once_when_finished(store: Store) -> None:
    alice = await account(store, "alice", credits=12)
    await submit(store, alice, price=5)
    assert await balance(store, alice) == (12, 5)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    assert await store.finish_task(claim, outcome())
    assert not await store.finish_task(claim, outcome())
    assert not await store.fail_task(claim, "late")
    assert await balance(store, alice) == (7, 0)
    assert await kinds(store, alice) == [("grant", 12), ("hold", 5), ("charge", -5)]
    task = await store.get_task(claim.task.task_id)
    assert task is not None and task.credits_amount == 5


async def test_failed_task_releases_its_hold_and_costs_nothing(store: Store) -> None:
    alice = await account(store, "alice", credits=5)
    await submit(store, alice, price=5)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.fail_task(claim, "engine error")
    assert await balance(store, alice) == (5, 0)
    assert await kinds(store, alice) == [("grant", 5), ("hold", 5), ("release", 5)]
    task = await store.get_task(claim.task.task_id)
    assert task is not None and task.credits_amount == 0


async def test_a_submit_past_the_available_balance_is_refused_and_stores_nothing(
    store: Store,
) -> None:
    alice = await account(store, "alice", credits=8)
    await submit(store, alice, price=5)
    with pytest.raises(InsufficientCredits, match=r"costs 5 credits.*3 available"):
        await submit(store, alice, price=5)
    assert await balance(store, alice) == (8, 5)
    assert await store.queue_depths() == {"flux-2-pro": 1}
    # Free tasks need no balance at all.
    broke = await account(store, "bob")
    assert (await submit(store, broke)).price == 0


async def test_a_rerun_after_a_lost_worker_is_charged_once(store: Store) -> None:
    alice = await account(store, "alice", credits=10)
    task = await submit(store, alice, price=4)
    first = await store.claim_task(["flux-2-pro"], "w1", 0.01)
    assert first is not None
    await asyncio.sleep(0.05)
    assert await store.requeue_expired(max_attempts=3) == (1, 0)
    second = await store.claim_task(["flux-2-pro"], "w2", 30)
    assert second is not None and second.task.task_id == task.task_id
    assert await store.finish_task(second, outcome())
    # The lost worker comes back with its result: discarded, nothing charged again.
    assert not await store.finish_task(first, outcome())
    assert await balance(store, alice) == (6, 0)
    assert [k for k, _ in await kinds(store, alice)].count("charge") == 1


# --- cancel -------------------------------------------------------------------------


async def test_cancel_a_queued_task_fails_it_now_with_its_callback_and_hold(
    store: Store,
) -> None:
    alice = await account(store, "alice", credits=5)
    task = await submit(store, alice, price=5, callback=HOOK)
    after = await store.cancel_task(task.task_id)
    assert after is not None and after.status is TaskStatus.FAILED and after.cancelled
    assert after.error_message == CANCELLED_MESSAGE
    assert await store.claim_task(["flux-2-pro"], "w1", 30) is None
    assert await balance(store, alice) == (5, 0)
    events = await store.callback_events(task.task_id)
    assert [e.event_type for e in events] == ["failed"]
    # Asking again changes nothing.
    again = await store.cancel_task(task.task_id)
    assert again is not None and again.finished_at == after.finished_at
    assert len(await store.callback_events(task.task_id)) == 1


async def test_cancel_a_running_task_reaches_its_worker_through_the_lease(store: Store) -> None:
    alice = await account(store, "alice", credits=5)
    task = await submit(store, alice, price=5)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    assert await store.report_progress(claim, 10, 30) is LeaseState.HELD
    marked = await store.cancel_task(task.task_id)
    assert marked is not None and marked.status is TaskStatus.RUNNING and not marked.cancelled
    assert await store.report_progress(claim, 20, 30) is LeaseState.CANCEL_REQUESTED
    assert await store.fail_task(claim, CANCELLED_MESSAGE)
    ended = await store.get_task(task.task_id)
    assert ended is not None and ended.cancelled
    assert await balance(store, alice) == (5, 0)


async def test_a_cancelled_task_is_never_handed_back_to_the_queue(store: Store) -> None:
    first = await submit(store, await account(store, "alice"))
    second = await submit(store, await account(store, "bob"))
    stopping = await store.claim_task(["flux-2-pro"], "w1", 30)
    lost = await store.claim_task(["flux-2-pro"], "w2", 0.01)
    assert stopping is not None and lost is not None
    await store.cancel_task(first.task_id)
    await store.cancel_task(second.task_id)
    # A stopping worker hands its task back: cancelled, it fails instead.
    assert await store.release_task(stopping)
    # A lost worker's task: the sweeper fails it as cancelled, whatever its attempts.
    await asyncio.sleep(0.05)
    assert await store.requeue_expired(max_attempts=3) == (0, 1)
    for task_id in (first.task_id, second.task_id):
        task = await store.get_task(task_id)
        assert task is not None and task.cancelled and task.error_message == CANCELLED_MESSAGE
    assert await store.claim_task(["flux-2-pro"], "w3", 30) is None


# --- idempotency and limits ---------------------------------------------------------


async def test_an_idempotency_key_answers_its_first_task(store: Store) -> None:
    alice = await account(store, "alice", credits=10)
    key = IdempotencyKey("order-17", "hash-a", ttl=60)
    first = await submit(store, alice, price=2, idempotency=key)
    again = await submit(store, alice, price=2, idempotency=key)
    assert again.task_id == first.task_id
    assert await balance(store, alice) == (10, 2)  # held once
    with pytest.raises(Conflict, match="different request"):
        await submit(store, alice, idempotency=IdempotencyKey("order-17", "hash-b", ttl=60))
    # Another account's same key is its own.
    bob = await account(store, "bob")
    assert (await submit(store, bob, idempotency=key)).task_id != first.task_id


async def test_concurrent_submits_with_one_idempotency_key_make_one_task(store: Store) -> None:
    alice = await account(store, "alice")
    key = IdempotencyKey("burst", "hash", ttl=60)
    tasks = await asyncio.gather(*(submit(store, alice, idempotency=key) for _ in range(8)))
    assert len({task.task_id for task in tasks}) == 1
    assert await store.queue_depths() == {"flux-2-pro": 1}


async def test_a_submit_refused_in_a_burst_leaves_the_others_queued(store: Store) -> None:
    # Submits arriving together may share a transaction: each keeps its own answer.
    alice = await account(store, "alice", credits=30)
    answers = await asyncio.gather(
        *(submit(store, alice, price=10) for _ in range(5)), return_exceptions=True
    )
    assert [type(answer).__name__ for answer in answers] == ["Task"] * 3 + [
        "InsufficientCredits"
    ] * 2
    assert "has 0 available" in str(answers[3])
    assert await store.queue_depths() == {"flux-2-pro": 3}
    now = await store.get_account(alice.account_id)
    assert now is not None and (now.balance, now.held) == (30, 30)


async def test_a_burst_with_a_task_id_already_taken_queues_the_others(store: Store) -> None:
    # The repeat makes a shared transaction fail: each submit then runs alone,
    # and the repeat answers the task that has the id (as after a connection
    # lost as its submit committed).
    alice = await account(store, "alice")
    taken = await submit(store, alice)

    def new(task_id: str | None = None) -> NewTask:
        owner = "key_alice"
        return NewTask(
            task_id or new_task_id(),
            owner,
            alice.account_id,
            "flux-2-pro",
            INPUT,
            None,
            time.time(),
        )

    burst = [new(), new(), new(taken.task_id), new(), new()]
    answers = await asyncio.gather(*map(store.create_task, burst))
    assert [answer.task_id for answer in answers] == [task.task_id for task in burst]
    assert await store.queue_depths() == {"flux-2-pro": 5}


async def test_a_burst_queues_in_the_order_it_arrived(store: Store) -> None:
    alice = await account(store, "alice")
    burst = await asyncio.gather(*(submit(store, alice) for _ in range(12)))
    positions = [await queue_position(store, task.task_id) for task in burst]
    assert positions == list(range(1, 13))
    later = await submit(store, alice)
    assert await queue_position(store, later.task_id) == 13


async def test_an_expired_idempotency_key_makes_a_new_task(store: Store) -> None:
    alice = await account(store, "alice")
    first = await submit(store, alice, idempotency=IdempotencyKey("k", "h", ttl=0.05))
    await asyncio.sleep(0.1)
    later = await submit(store, alice, idempotency=IdempotencyKey("k", "h", ttl=0.05))
    assert later.task_id != first.task_id


async def test_submits_per_minute_limit_names_when_to_retry(store: Store) -> None:
    alice = await account(store, "alice")
    limits = SubmitLimits(per_minute=3)
    for _ in range(3):
        await submit(store, alice, limits=limits)
    with pytest.raises(RateLimited, match="3 submits per minute") as refused:
        await submit(store, alice, limits=limits)
    assert 55 <= int(refused.value.headers["Retry-After"]) <= 60
    assert sum((await store.queue_depths()).values()) == 3
    # The limit is per key: another key is not held back.
    await submit(store, await account(store, "bob"), limits=limits)


async def test_active_tasks_limit_frees_a_place_when_one_ends(store: Store) -> None:
    alice = await account(store, "alice")
    limits = SubmitLimits(concurrent=2)
    await submit(store, alice, limits=limits)
    await submit(store, alice, limits=limits)
    with pytest.raises(RateLimited, match="at most 2 queued or running"):
        await submit(store, alice, limits=limits)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.finish_task(claim, outcome())
    await submit(store, alice, limits=limits)


async def test_concurrent_submits_never_pass_the_active_limit(store: Store) -> None:
    alice = await account(store, "alice")
    limits = SubmitLimits(concurrent=3)
    results = await asyncio.gather(
        *(submit(store, alice, limits=limits) for _ in range(10)), return_exceptions=True
    )
    assert sum(isinstance(r, Task) for r in results) == 3
    assert all(isinstance(r, (Task, RateLimited)) for r in results)


async def submit_together(
    store: Store, who: Account, count: int, *, price: int = 0, limits: SubmitLimits | None = None
) -> list[Task]:
    now = time.time()
    key_id = "key_" + who.account_id.removeprefix("acct_")
    new_tasks = [
        NewTask(new_task_id(), key_id, who.account_id, "flux-2-pro", INPUT, None, now, price=price)
        for _ in range(count)
    ]
    return await store.create_tasks(new_tasks, limits=limits)


async def test_tasks_submitted_together_are_refused_whole_when_credits_cover_some(
    store: Store,
) -> None:
    alice = await account(store, "alice", credits=12)
    with pytest.raises(InsufficientCredits, match=r"3 tasks cost 15 credits.*12 available"):
        await submit_together(store, alice, 3, price=5)
    assert await balance(store, alice) == (12, 0)
    assert await store.queue_depths() == {}
    together = await submit_together(store, alice, 2, price=5)
    assert await balance(store, alice) == (12, 10)
    assert await store.queue_depths() == {"flux-2-pro": 2}
    for task in together:
        stored = await store.get_task(task.task_id)
        assert stored is not None and stored.price == 5


async def test_tasks_submitted_together_need_room_for_all_in_the_minute(store: Store) -> None:
    alice = await account(store, "alice")
    limits = SubmitLimits(per_minute=4)
    await submit(store, alice, limits=limits)
    await submit(store, alice, limits=limits)
    with pytest.raises(RateLimited, match=r"4 submits per minute.*no room for 3 more") as refused:
        await submit_together(store, alice, 3, limits=limits)
    # Room for three opens as the first of the two leaves the minute.
    assert 55 <= int(refused.value.headers["Retry-After"]) <= 60
    # The refusal queued nothing, so it spent none of the minute's submits.
    assert len(await submit_together(store, alice, 2, limits=limits)) == 2
    assert await store.queue_depths() == {"flux-2-pro": 4}


async def test_tasks_submitted_together_need_room_for_all_at_once(store: Store) -> None:
    alice = await account(store, "alice")
    limits = SubmitLimits(per_minute=10, concurrent=3)
    await submit(store, alice, limits=limits)
    with pytest.raises(RateLimited, match=r"at most 3 queued or running.*no room for 3 more"):
        await submit_together(store, alice, 3, limits=limits)
    assert len(await submit_together(store, alice, 2, limits=limits)) == 2
    assert await store.queue_depths() == {"flux-2-pro": 3}


# --- the fair queue -----------------------------------------------------------------


async def claim_order(store: Store) -> list[str]:
    """Claim and finish every queued task; the accounts they belonged to, in order."""
    order = []
    while (claim := await store.claim_task(["flux-2-pro"], "w1", 30)) is not None:
        assert claim.task.account_id is not None
        order.append(claim.task.account_id.removeprefix("acct_"))
        await store.finish_task(claim, outcome())
    return order


async def test_a_backlog_does_not_hold_back_another_accounts_task(store: Store) -> None:
    alice, bob = await account(store, "alice"), await account(store, "bob")
    for _ in range(6):
        await submit(store, alice)
    running = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert running is not None
    bobs = await submit(store, bob)
    # Next in line, ahead of the five of alice's still queued.
    assert await queue_position(store, bobs.task_id) == 1
    await store.finish_task(running, outcome())
    assert await claim_order(store) == ["bob"] + ["alice"] * 5


async def test_accounts_with_backlogs_take_turns(store: Store) -> None:
    alice, bob, carol = [await account(store, n) for n in ("alice", "bob", "carol")]
    for _ in range(4):
        await submit(store, alice)
    for _ in range(3):
        await submit(store, bob)
    await submit(store, carol)
    # Round robin, in the order the accounts arrived, whatever their backlogs.
    assert await claim_order(store) == [
        "alice", "bob", "carol", "alice", "bob", "alice", "bob", "alice"
    ]  # fmt: skip


async def test_queue_position_follows_the_claim_order(store: Store) -> None:
    alice, bob = await account(store, "alice"), await account(store, "bob")
    submitted = [await submit(store, who) for who in (alice, alice, alice, bob, alice, bob)]
    positions = {t.task_id: await queue_position(store, t.task_id) for t in submitted}
    claimed = []
    while (claim := await store.claim_task(["flux-2-pro"], "w1", 30)) is not None:
        claimed.append(claim.task.task_id)
    assert [positions[task_id] for task_id in claimed] == [1, 2, 3, 4, 5, 6]


async def test_one_account_alone_is_served_in_submit_order(store: Store) -> None:
    alice = await account(store, "alice")
    ids = [(await submit(store, alice)).task_id for _ in range(5)]
    claimed = []
    while (claim := await store.claim_task(["flux-2-pro"], "w1", 30)) is not None:
        claimed.append(claim.task.task_id)
    assert claimed == ids


# --- history ------------------------------------------------------------------------


async def test_history_pages_newest_first_and_only_the_accounts_own(store: Store) -> None:
    alice, bob = await account(store, "alice"), await account(store, "bob")
    mine = [
        (await submit(store, alice, model=m)).task_id for m in ["flux-2-pro", "flux-2-flex"] * 3
    ]
    await submit(store, bob)
    first = await store.list_tasks(alice.account_id, status=None, model=None, limit=4, before=None)
    assert [t.task_id for t in first.tasks] == mine[::-1][:4]
    assert first.next_cursor is not None
    rest = await store.list_tasks(
        alice.account_id, status=None, model=None, limit=4, before=first.next_cursor
    )
    assert [t.task_id for t in rest.tasks] == mine[::-1][4:]
    assert rest.next_cursor is None
    flex = await store.list_tasks(
        alice.account_id, status="not_started", model="flux-2-flex", limit=10, before=None
    )
    assert [t.task_id for t in flex.tasks] == mine[1::2][::-1]
    claim = await store.claim_task(["flux-2-flex"], "w1", 30)
    assert claim is not None
    running = await store.list_tasks(
        alice.account_id, status="running", model=None, limit=10, before=None
    )
    assert [t.task_id for t in running.tasks] == [claim.task.task_id]


async def test_result_files_survive_in_history(store: Store) -> None:
    alice = await account(store, "alice")
    await submit(store, alice)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.finish_task(claim, outcome())
    page = await store.list_tasks(alice.account_id, status=None, model=None, limit=1, before=None)
    assert page.tasks[0].files == (ResultFile("results/x/image.png", "image.png", "image/png", 10),)
