"""The delivery metrics: attempts, deliveries, failures, drops, and the outbox's backlog."""

from __future__ import annotations

from fluxserve.metrics import Registry
from fluxserve.store import Store
from fluxserve.store.base import Attempt
from fluxserve.tasks import CALLBACK_EVENTS, TERMINAL_EVENTS


class WebhookMetrics:
    """Counters for this process's deliveries, and the store-wide pending gauge."""

    def __init__(self, registry: Registry, store: Store) -> None:
        by_event = ("event",)
        self.attempts = registry.counter(
            "fluxserve_webhook_attempts_total", "Callback POSTs tried.", by_event
        )
        self.delivered = registry.counter(
            "fluxserve_webhook_delivered_total",
            "Callback events a receiver accepted with a 2xx.",
            by_event,
        )
        self.failed = registry.counter(
            "fluxserve_webhook_failed_total",
            "Callback events given up on: a final answer or refusal, the retry schedule "
            "spent, or the one failed try of a best-effort event.",
            by_event,
        )
        self.dropped = registry.counter(
            "fluxserve_webhook_dropped_total",
            "Best-effort events not sent: the task's previous one was still in flight, "
            "or callback_concurrency of them were.",
            by_event,
        )
        for counter in (self.attempts, self.delivered, self.failed):
            for event in CALLBACK_EVENTS:
                counter.declare(event=event)
        for event in CALLBACK_EVENTS:
            if event not in TERMINAL_EVENTS:
                self.dropped.declare(event=event)

        async def pending() -> float:
            return await store.pending_callbacks()

        registry.gauge(
            "fluxserve_webhook_pending",
            "Callback events in the outbox not yet delivered or given up (all processes).",
            pending,
        )

    def observe(self, event_type: str, attempt: Attempt, *, final: bool) -> None:
        """Count an attempt; `final` when no other attempt of its event will follow."""
        self.attempts.inc(event=event_type)
        if attempt.delivered:
            self.delivered.inc(event=event_type)
        elif final:
            self.failed.inc(event=event_type)
