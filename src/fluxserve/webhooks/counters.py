"""The delivery metrics: attempts and their outcomes and durations, deliveries,
failures, drops, and the outbox's backlog."""

from __future__ import annotations

from fluxserve.metrics import Metrics
from fluxserve.store.ports import Outbox
from fluxserve.tasks import CALLBACK_EVENTS, TERMINAL_EVENTS
from fluxserve.webhooks.sender import Sent

# Up to the default callback_timeout (10 s) and a little past it.
ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)


class WebhookMetrics:
    """Counters and timings of this process's deliveries, and the store-wide pending gauge."""

    def __init__(self, metrics: Metrics, store: Outbox) -> None:
        by_event = ("event",)
        self.attempts = metrics.counter(
            "fluxserve_webhook_attempts_total", "Callback POSTs tried.", by_event
        )
        self.attempt_seconds = metrics.histogram(
            "fluxserve_webhook_attempt_seconds",
            "How long each callback POST took, by event type and outcome: the receiver's "
            "answer class (2xx to 5xx), or timeout, refused (by the net guard) or error.",
            ("event", "outcome"),
            ATTEMPT_BUCKETS,
        )
        self.delivered = metrics.counter(
            "fluxserve_webhook_delivered_total",
            "Callback events a receiver accepted with a 2xx.",
            by_event,
        )
        self.failed = metrics.counter(
            "fluxserve_webhook_failed_total",
            "Callback events given up on: a final answer or refusal, the retry schedule "
            "spent, or the one failed try of a best-effort event.",
            by_event,
        )
        self.dropped = metrics.counter(
            "fluxserve_webhook_dropped_total",
            "Best-effort events not sent: the task's previous one was still in flight, "
            "or callback_concurrency of them were.",
            by_event,
        )
        # Each label set shows as 0 before it first counts, so rate() has a start.
        for counter in (self.attempts, self.delivered, self.failed):
            for event in CALLBACK_EVENTS:
                counter.labels(event=event)
        for event in CALLBACK_EVENTS:
            if event not in TERMINAL_EVENTS:
                self.dropped.labels(event=event)

        async def pending() -> float:
            return await store.pending_callbacks()

        metrics.gauge(
            "fluxserve_webhook_pending",
            "Callback events in the outbox not yet delivered or given up (all processes).",
            pending,
        )

    def observe(self, event_type: str, sent: Sent, *, final: bool) -> None:
        """Count an attempt; `final` when no other attempt of its event will follow."""
        attempt = sent.attempt
        self.attempts.labels(event=event_type).inc()
        self.attempt_seconds.labels(event=event_type, outcome=sent.outcome).observe(
            attempt.duration
        )
        if attempt.delivered:
            self.delivered.labels(event=event_type).inc()
        elif final:
            self.failed.labels(event=event_type).inc()
