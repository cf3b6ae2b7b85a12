"""The tables, in SQLAlchemy Core; migrations in `migrations/` create them."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

tasks = sa.Table(
    "tasks",
    metadata,
    # seq orders the queue: oldest first.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(64), nullable=False, unique=True),
    sa.Column("owner", sa.String(32), nullable=False),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("progress", sa.Integer, nullable=False, default=0),
    sa.Column("input", sa.JSON, nullable=False),
    sa.Column("callback_url", sa.Text),
    sa.Column("engine", sa.String(32)),
    sa.Column("seed", sa.BigInteger),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("error_message", sa.Text),
    sa.Column("files", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker_id", sa.String(64)),
    sa.Column("lease_token", sa.String(32)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    # The events its callback_url is told of; NULL (tasks from before 0002) = terminal.
    sa.Column("callback_events", sa.JSON),
    sa.Index("ix_tasks_queue", "status", "model", "seq"),
    sa.Index("ix_tasks_owner", "owner", "seq"),
)

callbacks = sa.Table(
    "callbacks",
    metadata,
    sa.Column("callback_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(64), nullable=False, unique=True),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    # pending -> sending (held by one dispatcher) -> delivered | failed | pending again.
    sa.Column("state", sa.String(16), nullable=False),
    # Attempts since the event was (re)queued: the retry schedule's position.
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float),
    sa.Column("event_type", sa.String(16), nullable=False),
    # scheme://host:port of the url: a dispatcher caps its deliveries per receiver.
    sa.Column("origin", sa.Text, nullable=False),
    sa.Index("ix_callbacks_due", "state", "next_attempt_at"),
    sa.Index("ix_callbacks_task", "task_id", "callback_id"),
)

# Every POST of every callback event: the log GET /api/generate/callbacks shows.
callback_attempts = sa.Table(
    "callback_attempts",
    metadata,
    sa.Column("attempt_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("callback_id", sa.Integer, nullable=False),
    sa.Column("attempted_at", sa.Float, nullable=False),
    sa.Column("duration", sa.Float, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Index("ix_callback_attempts_callback", "callback_id", "attempt_id"),
)

# Each API key's callback signing secret. Kept as it is, not hashed: the server
# signs with it. The previous secret signs too until previous_expires_at.
webhook_secrets = sa.Table(
    "webhook_secrets",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("secret", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("previous_secret", sa.String(128)),
    sa.Column("previous_expires_at", sa.Float),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("worker_id", sa.String(64), primary_key=True),
    sa.Column("models", sa.JSON, nullable=False),
    sa.Column("engine", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Index("ix_workers_last_seen", "last_seen"),
)
