"""The store contract: written once, run on every backend."""

from __future__ import annotations

import asyncio
import time

import pytest

from fluxserve.store import Store
from fluxserve.store.base import Attempt, CallbackState, LeaseState, Outcome
from fluxserve.tasks import NewTask, ResultFile, Task, TaskStatus, new_task_id

from conftest import QUEUED_INPUT, queue_position, queue_task


def outcome() -> Outcome:
    return Outcome(
        "tiny", 7, 1024, 1024, [ResultFile("results/x/image.png", "image.png", "image/png", 10)]
    )


async def test_round_trip(store: Store) -> None:
    task_id = await queue_task(store, callback="https://example.com/hook")
    task = await store.get_task(task_id)
    assert task is not None
    assert task.status is TaskStatus.NOT_STARTED
    assert task.input == QUEUED_INPUT and task.callback_url == "https://example.com/hook"
    assert await store.get_task("task-unified-0-missing0") is None


async def test_claims_oldest_first_and_only_served_models(store: Store) -> None:
    first = await queue_task(store, "flux-2-flex")
    second = await queue_task(store, "flux-2-pro")
    third = await queue_task(store, "flux-2-pro")
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == second
    assert claim.task.status is TaskStatus.RUNNING and claim.task.attempts == 1
    claim = await store.claim_task(["flux-2-pro", "flux-2-flex"], "w1", 30)
    assert claim is not None and claim.task.task_id == first
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == third
    assert await store.claim_task(["flux-2-pro", "flux-2-flex"], "w1", 30) is None


async def test_concurrent_claims_never_share_a_task(store: Store) -> None:
    ids = {await queue_task(store) for _ in range(20)}
    claims = await asyncio.gather(
        *(store.claim_task(["flux-2-pro"], f"w{i}", 30) for i in range(30))
    )
    claimed = [c.task.task_id for c in claims if c is not None]
    assert sorted(claimed) == sorted(ids)


async def test_finish_is_one_write_and_happens_once(store: Store) -> None:
    task_id = await queue_task(store, callback="https://example.com/hook")
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    assert await store.finish_task(claim, outcome())
    assert not await store.finish_task(claim, outcome())
    assert not await store.fail_task(claim, "too late")
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.FINISHED and task.progress == 100
    assert task.files == tuple(outcome().files) and task.seed == 7
    callbacks = await store.claim_callbacks(10, 30)
    assert [c.task_id for c in callbacks] == [task_id]


async def test_no_callback_row_without_a_callback_url(store: Store) -> None:
    await queue_task(store)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.fail_task(claim, "boom")
    assert await store.claim_callbacks(10, 30) == []
    assert await store.next_callback_at() is None


async def test_progress_only_rises_and_needs_the_lease(store: Store) -> None:
    task_id = await queue_task(store)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    assert await store.report_progress(claim, 40, 30) is LeaseState.HELD
    assert await store.report_progress(claim, 20, 30) is LeaseState.HELD
    task = await store.get_task(task_id)
    assert task is not None and task.progress == 40
    await store.release_task(claim)
    assert await store.report_progress(claim, 60, 30) is LeaseState.LOST


async def test_expired_leases_are_requeued_then_failed(store: Store) -> None:
    task_id = await queue_task(store, callback="https://example.com/hook")
    for attempt in range(1, 3):
        claim = await store.claim_task(["flux-2-pro"], "w1", 0.01)
        assert claim is not None and claim.task.attempts == attempt
        await asyncio.sleep(0.02)
        assert await store.requeue_expired(max_attempts=2) == ((1, 0) if attempt < 2 else (0, 1))
        # The lost worker's late result is discarded.
        assert not await store.finish_task(claim, outcome())
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.FAILED
    assert task.error_message and "worker running this task was lost" in task.error_message
    assert [c.task_id for c in await store.claim_callbacks(10, 30)] == [task_id]


async def test_release_hands_back_without_spending_an_attempt(store: Store) -> None:
    task_id = await queue_task(store)
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.release_task(claim)
    again = await store.claim_task(["flux-2-pro"], "w2", 30)
    assert again is not None and again.task.task_id == task_id and again.task.attempts == 1


async def test_callback_attempts_are_recorded(store: Store) -> None:
    await queue_task(store, callback="https://example.com/hook")
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.finish_task(claim, outcome())
    [record] = await store.claim_callbacks(10, 30)
    assert await store.claim_callbacks(10, 30) == []  # held while in flight
    retry_at = time.time() + 0.05
    await store.record_attempt(
        record.callback_id, Attempt(time.time(), 0.01, 500, "HTTP 500"), retry_at=retry_at
    )
    assert await store.next_callback_at() == pytest.approx(retry_at)
    await asyncio.sleep(0.06)
    [again] = await store.claim_callbacks(10, 30)
    assert again.event_id == record.event_id and again.attempts == 1
    await store.record_attempt(
        again.callback_id, Attempt(time.time(), 0.01, 200, None), retry_at=None
    )
    assert await store.next_callback_at() is None


async def test_keys(store: Store) -> None:
    await store.create_key("key_1", "alice", "h" * 64, "fsk_abcdef", "acct_1")
    record = await store.key_for_hash("h" * 64)
    assert record is not None and record.name == "alice" and record.revoked_at is None
    assert record.account_id == "acct_1"
    revoked = await store.revoke_key("key_1")
    assert revoked is not None and revoked.key_id == "key_1" and revoked.revoked_at is not None
    assert await store.key_for_hash("h" * 64) == revoked
    assert [k.key_id for k in await store.list_keys()] == ["key_1"]


async def test_revoking_a_key_again_answers_as_the_first_revoke_did(store: Store) -> None:
    """Run again (a try whose commit reply was lost), a revoke finds the key revoked:
    it answers the same key, revoked at the first revoke's time, not "no such key"."""
    await store.create_key("key_1", "alice", "h" * 64, "fsk_abcdef", "acct_1")
    first = await store.revoke_key("key_1")
    assert first is not None and first.revoked_at is not None
    assert await store.revoke_key("key_1") == first
    assert await store.key_for_hash("h" * 64) == first
    assert await store.revoke_key("key_missing") is None


async def test_queue_position_counts_the_queued_tasks_of_the_model_ahead(store: Store) -> None:
    first = await queue_task(store)
    await queue_task(store, "flux-2-flex")
    third = await queue_task(store)
    assert await queue_position(store, first) == 1
    assert await queue_position(store, third) == 2
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == first
    assert await queue_position(store, first) is None
    assert await queue_position(store, third) == 1


HOOK = "https://example.com/hook"


async def ended(store: Store, events: tuple[str, ...] = ("finished", "failed")) -> Task:
    """A task with a callback, run to `finished` by a claim."""
    await store.create_task(
        NewTask(new_task_id(), "key_a", "acct_a", "flux-2-pro", QUEUED_INPUT, HOOK, 0.0, events)
    )
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.finish_task(claim, outcome())
    task = await store.get_task(claim.task.task_id)
    assert task is not None and task.callback_events == events
    return task


async def test_every_attempt_and_best_effort_event_is_logged(store: Store) -> None:
    task = await ended(store, ("progress", "finished"))
    [record] = await store.claim_callbacks(10, 30)
    assert record.event_type == "finished"
    [event] = await store.callback_events(task.task_id)
    assert event.state is CallbackState.SENDING and event.attempts == ()
    failed = Attempt(1000.0, 0.25, 503, "HTTP 503")
    await store.record_attempt(record.callback_id, failed, retry_at=time.time() + 60)
    progress = Attempt(900.0, 0.5, None, "timed out after 10s")
    await store.record_event(task.task_id, "evt_progress", "progress", HOOK, progress)
    assert await store.pending_callbacks() == 1
    finished, sent = await store.callback_events(task.task_id)
    assert (finished.event_id, finished.state, finished.attempts) == (
        record.event_id,
        CallbackState.PENDING,
        (failed,),
    )
    assert finished.next_attempt_at is not None and finished.delivered_at is None
    assert (sent.event_type, sent.state, sent.attempts) == (
        "progress",
        CallbackState.FAILED,
        (progress,),
    )
    assert sent.next_attempt_at is None
    assert await store.callback_events("task-unified-0-missing0") == []


async def test_a_filtered_out_terminal_event_is_not_queued(store: Store) -> None:
    task = await ended(store, ("running", "progress"))
    assert not task.wants("finished") and task.wants("progress")
    assert await store.claim_callbacks(10, 30) == []
    assert await store.pending_callbacks() == 0


async def test_redelivery_reopens_an_ended_event_on_a_fresh_schedule(store: Store) -> None:
    task = await ended(store)
    [record] = await store.claim_callbacks(10, 30)
    # While it is being sent, redelivery leaves it alone: that attempt is the one.
    assert await store.redeliver_callback(task) == record.event_id
    assert await store.claim_callbacks(10, 30) == []
    await store.record_attempt(
        record.callback_id, Attempt(1.0, 0.1, 410, "HTTP 410"), retry_at=None
    )
    assert await store.pending_callbacks() == 0
    assert await store.redeliver_callback(task) == record.event_id
    [again] = await store.claim_callbacks(10, 30)
    assert (again.event_id, again.attempts) == (record.event_id, 0)
    await store.record_attempt(again.callback_id, Attempt(2.0, 0.1, 200, None), retry_at=None)
    [event] = await store.callback_events(task.task_id)
    assert event.state is CallbackState.DELIVERED and len(event.attempts) == 2
    assert event.delivered_at == pytest.approx(2.1)


async def test_redelivery_brings_a_waiting_retry_forward(store: Store) -> None:
    task = await ended(store)
    [record] = await store.claim_callbacks(10, 30)
    later = time.time() + 3600
    await store.record_attempt(
        record.callback_id, Attempt(1.0, 0.1, 503, "HTTP 503"), retry_at=later
    )
    assert await store.claim_callbacks(10, 30) == []
    await store.redeliver_callback(task)
    [again] = await store.claim_callbacks(10, 30)
    assert (again.event_id, again.attempts) == (record.event_id, 0)


async def test_redelivery_queues_a_terminal_event_that_was_filtered_out(store: Store) -> None:
    task = await ended(store, ("progress",))
    event_id = await store.redeliver_callback(task)
    [record] = await store.claim_callbacks(10, 30)
    assert (record.event_id, record.event_type, record.url) == (event_id, "finished", HOOK)


async def test_webhook_secrets_are_made_once_and_rotated(store: Store) -> None:
    made = await store.webhook_secret("key_a", "whsec_one")
    assert (made.secret, made.previous_secret, made.previous_expires_at) == (
        "whsec_one",
        None,
        None,
    )
    assert (await store.webhook_secret("key_a", "whsec_other")).secret == "whsec_one"
    rotated = await store.rotate_webhook_secret("key_a", "whsec_two", 500.0)
    assert (rotated.secret, rotated.previous_secret) == ("whsec_two", "whsec_one")
    assert rotated.previous_signs(499.0) and not rotated.previous_signs(500.0)
    assert (await store.webhook_secret("key_a", "whsec_other")) == rotated
    again = await store.rotate_webhook_secret("key_a", "whsec_three", 600.0)
    assert (again.secret, again.previous_secret) == ("whsec_three", "whsec_two")
    first = await store.rotate_webhook_secret("key_b", "whsec_b", 700.0)
    assert (first.secret, first.previous_secret) == ("whsec_b", None)


@pytest.mark.parametrize("secret_before", ["whsec_old", None])
async def test_a_rotation_run_again_leaves_what_it_made_once(
    store: Store, secret_before: str | None
) -> None:
    """Run again with the same new secret (a try whose commit reply was lost), a rotation
    answers what the first made: the secret from before it stays the previous one, and a
    key that had none has no previous secret still."""
    if secret_before is not None:
        await store.webhook_secret("key_a", secret_before)
    once = await store.rotate_webhook_secret("key_a", "whsec_new", 500.0)
    assert (once.secret, once.previous_secret) == ("whsec_new", secret_before)
    again = await store.rotate_webhook_secret("key_a", "whsec_new", 600.0)
    assert again == once
    assert await store.webhook_secret("key_a", "whsec_other") == once


async def test_concurrent_first_uses_agree_on_one_secret(store: Store) -> None:
    made = await asyncio.gather(*(store.webhook_secret("key_c", f"whsec_{i}") for i in range(8)))
    assert len({record.secret for record in made}) == 1


async def test_claims_skip_busy_receivers_and_release_hands_back(store: Store) -> None:
    await ended(store)
    await store.create_task(
        NewTask(
            new_task_id(),
            "key_a",
            "acct_a",
            "flux-2-pro",
            QUEUED_INPUT,
            "http://Other.example:8080/x",
            0.0,
        )
    )
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and await store.finish_task(claim, outcome())
    busy = ["https://example.com:443"]
    assert await store.next_callback_at([*busy, "http://other.example:8080"]) is None
    assert await store.next_callback_at(busy) is not None
    [other] = await store.claim_callbacks(10, 30, busy)
    assert other.origin == "http://other.example:8080"
    assert await store.claim_callbacks(10, 30, busy) == []
    [first] = await store.claim_callbacks(10, 30)
    assert first.origin == "https://example.com:443"
    await store.release_callbacks([first.callback_id, other.callback_id])
    again = await store.claim_callbacks(10, 30)
    assert sorted(r.event_id for r in again) == sorted([first.event_id, other.event_id])
    assert all(r.attempts == 0 for r in again)


async def test_queue_depths_and_worker_heartbeats(store: Store) -> None:
    await queue_task(store)
    await queue_task(store)
    await queue_task(store, "flux-2-flex")
    assert await store.queue_depths() == {"flux-2-pro": 2, "flux-2-flex": 1}
    await store.record_heartbeat("w1", ["flux-2-pro"], "tiny", "starting")
    await store.record_heartbeat("w1", ["flux-2-pro"], "tiny", "ready")
    await store.record_heartbeat("w2", ["flux-2-flex"], "diffusers", "ready")
    live = await store.live_workers(seen_within=30)
    assert [(w.worker_id, w.state, w.models) for w in live] == [
        ("w1", "ready", ("flux-2-pro",)),
        ("w2", "ready", ("flux-2-flex",)),
    ]
    await asyncio.sleep(0.05)
    assert await store.live_workers(seen_within=0.01) == []
    await store.forget_worker("w1")
    assert [w.worker_id for w in await store.live_workers(seen_within=30)] == ["w2"]
