"""The plain logic behind callbacks: the retry schedule, Retry-After, the progress
throttle and the per-receiver bounds."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from fluxserve.settings import Settings
from fluxserve.tasks import Task, TaskInput, TaskStatus
from fluxserve.webhooks.progress import ProgressEvents
from fluxserve.webhooks.receivers import MAX_REST, Receivers
from fluxserve.webhooks.retry import RetrySchedule, is_retryable, parse_retry_after

HOUR = 3600.0


def test_the_default_schedule_starts_as_the_hosted_api_and_lasts_about_a_day() -> None:
    delays = Settings().callback_retry_delays
    assert delays[:3] == [1, 2, 4]
    assert delays == sorted(delays) and max(delays) <= 12 * HOUR
    assert 20 * HOUR <= sum(delays) <= 26 * HOUR
    assert 20 * HOUR <= sum(delays) * (1 + Settings().callback_retry_jitter) <= 28 * HOUR


def test_the_schedule_without_jitter_is_exact_and_ends() -> None:
    schedule = RetrySchedule([1, 2, 4])
    assert [schedule.delay_after(n) for n in range(5)] == [None, 1, 2, 4, None]


def test_jitter_only_lengthens_and_is_bounded() -> None:
    assert RetrySchedule([10], jitter=0.5, uniform=lambda: 1.0).delay_after(1) == 15
    assert RetrySchedule([10], jitter=0.5, uniform=lambda: 0.0).delay_after(1) == 10
    rng = random.Random(7)
    schedule = RetrySchedule([10], jitter=0.1, uniform=rng.random)
    draws = [schedule.delay_after(1) for _ in range(1000)]
    assert all(d is not None and 10 <= d <= 11 for d in draws)
    assert len(set(draws)) > 900


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [(None, 2), (1, 2), (30, 30), (10_000, 60)],  # capped at the longest delay
)
def test_retry_after_lengthens_a_wait_up_to_the_longest_delay(
    retry_after: float | None, delay: float
) -> None:
    assert RetrySchedule([2, 60]).delay_after(1, retry_after) == delay


def test_retry_after_does_not_extend_the_schedule() -> None:
    assert RetrySchedule([2, 60]).delay_after(3, 30) is None


def test_retry_after_values() -> None:
    now = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    later = format_datetime(datetime(2026, 5, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    earlier = format_datetime(datetime(2026, 5, 1, 11, 0, 0, tzinfo=UTC), usegmt=True)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(" 5 ", now) == 5
    assert parse_retry_after(later, now) == 30
    assert parse_retry_after(earlier, now) == 0
    for unusable in (None, "", "soon", "-1", "1.5", "Fri, 01 May 2026 12:00:30"):
        assert parse_retry_after(unusable, now) is None


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (408, True),
        (429, True),
        (500, True),
        (503, True),
        (400, False),
        (301, False),
        (404, False),
        (410, False),
    ],
)
def test_which_answers_are_retried(status: int, retry: bool) -> None:
    assert is_retryable(status) is retry


class Emitted(ProgressEvents):
    """The throttle's view of ProgressEvents: a clock, and what it was asked to send."""

    def __init__(self) -> None:
        self.now = 0.0
        self.clock = lambda: self.now
        self.sent: list[tuple[str, int]] = []
        self.accept = True

    def emit(self, task: Task, event_type: str) -> bool:
        if self.accept:
            self.sent.append((event_type, task.progress))
        return self.accept


def running_task(events: tuple[str, ...]) -> Task:
    return Task(
        task_id="task-unified-1-abcdefgh",
        owner="key_a",
        model="flux-2-pro",
        input=TaskInput(prompt="a quiet harbour", size="1:1", resolution="1K"),
        callback_url="https://example.com/hook",
        status=TaskStatus.RUNNING,
        progress=0,
        created_at=0.0,
        callback_events=events,
    )


def test_progress_is_sent_at_most_once_a_second_and_only_when_it_rose() -> None:
    events = Emitted()
    watch = events.watch(running_task(("running", "progress", "finished")))
    watch.running()
    for now, value in [(0.0, 10), (0.5, 20), (1.0, 30), (1.2, 40), (2.5, 30), (2.6, 50)]:
        events.now = now
        watch.progress(value)
    assert events.sent == [("running", 0), ("progress", 10), ("progress", 30), ("progress", 50)]


def test_a_skipped_send_does_not_start_the_interval() -> None:
    events = Emitted()
    watch = events.watch(running_task(("progress",)))
    events.accept = False
    watch.progress(10)
    events.accept = True
    events.now = 0.1
    watch.progress(20)
    assert events.sent == [("progress", 20)]


def test_only_the_events_asked_for_are_sent() -> None:
    events = Emitted()
    watch = events.watch(running_task(("finished", "failed")))
    watch.running()
    watch.progress(50)
    assert events.sent == []


def test_a_receiver_is_busy_when_full_or_resting() -> None:
    now = [0.0]
    receivers = Receivers(per_origin=2, clock=lambda: now[0])
    receivers.take("https://a:443")
    assert receivers.has_room("https://a:443") and receivers.busy() == []
    receivers.take("https://a:443")
    assert not receivers.has_room("https://a:443") and receivers.busy() == ["https://a:443"]
    receivers.give_back("https://a:443")
    receivers.rest("http://b:80", 60)  # capped
    receivers.rest("http://b:80", 0.2)  # never shortened
    assert receivers.busy() == ["http://b:80"]
    assert receivers.next_rest_end() == MAX_REST
    now[0] = MAX_REST
    assert receivers.busy() == [] and receivers.next_rest_end() is None
