"""Callbacks that never lose an event, prove where they came from, and block nothing.

    signing    Standard Webhooks signatures; each API key's secret and its rotation
    retry      the retry schedule, its jitter, and Retry-After
    sender     one signed POST through the net guard, and what came of it
    outbox     terminal events (finished, failed): durable, retried on the schedule
    progress   running and progress events: throttled, bounded, sent once
    counters   the delivery metrics

`Webhooks` wires them together for one process.
"""

from __future__ import annotations

from typing import Any

from fluxserve.bfl_wire import webhook_body
from fluxserve.metrics import Metrics
from fluxserve.net_policy import NetPolicy
from fluxserve.netguard import guarded_client
from fluxserve.settings import Settings
from fluxserve.storage import Storage
from fluxserve.store import Store
from fluxserve.tasks import Task
from fluxserve.webhooks.counters import WebhookMetrics
from fluxserve.webhooks.outbox import CallbackDispatcher
from fluxserve.webhooks.progress import ProgressEvents, TaskEvents
from fluxserve.webhooks.retry import RetrySchedule
from fluxserve.webhooks.sender import Sender
from fluxserve.webhooks.signing import WebhookSecrets
from fluxserve.wire import status_body


def callback_policy(settings: Settings) -> NetPolicy:
    """Where callbacks may go: https only, unless private networks (development) or
    `allow_http_callbacks` let plain http through too."""
    http = settings.allow_http_callbacks or settings.allow_private_networks
    return NetPolicy(
        allow_private_networks=settings.allow_private_networks,
        allowed_schemes=frozenset({"https", "http"} if http else {"https"}),
    )


class Webhooks:
    """One process's callback machinery: secrets, the outbox dispatcher, progress events."""

    def __init__(
        self, settings: Settings, store: Store, storage: Storage, metrics: Metrics
    ) -> None:
        self.policy = callback_policy(settings)
        self.secrets = WebhookSecrets(store, grace_seconds=settings.webhook_secret_grace)
        self._client = guarded_client(self.policy, timeout=settings.callback_timeout)
        sender = Sender(self._client, self.secrets, timeout=settings.callback_timeout)
        delivery = WebhookMetrics(metrics, store)

        def render(task: Task) -> dict[str, Any]:
            # Each task's callbacks speak the wire it was submitted through.
            if task.input.bfl is not None:
                return webhook_body(task, storage)
            return status_body(task, storage)

        self.outbox = CallbackDispatcher(
            store,
            sender,
            render,
            delivery,
            schedule=RetrySchedule(
                settings.callback_retry_delays, jitter=settings.callback_retry_jitter
            ),
            concurrency=settings.callback_concurrency,
            per_origin=settings.callback_concurrency_per_receiver,
            poll_interval=settings.poll_interval,
        )
        self.progress = ProgressEvents(
            store, sender, render, delivery, concurrency=settings.callback_concurrency
        )

    async def run(self) -> None:
        """Deliver the outbox until cancelled."""
        await self.outbox.run()

    async def aclose(self) -> None:
        """Stop the best-effort sends and close the HTTP client (cancel `run` first)."""
        await self.progress.aclose()
        await self._client.aclose()


__all__ = ["CallbackDispatcher", "ProgressEvents", "TaskEvents", "Webhooks", "callback_policy"]
