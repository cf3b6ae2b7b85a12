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
    # NULL only for rows written before 0004 filled it.
    sa.Column("account_id", sa.String(32)),
    sa.Index("ix_api_keys_account", "account_id"),
)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("account_id", sa.String(32), primary_key=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    # Granted minus charged; `held` of it is promised to queued and running tasks.
    sa.Column("balance", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("held", sa.BigInteger, nullable=False, server_default="0"),
    # The fair queue's clock for this account: its next task's vtime at the least.
    sa.Column("next_vtime", sa.BigInteger, nullable=False, server_default="0"),
)

# Every credit movement. A task has at most one row of each kind, so a retried
# or restarted worker can never charge (or release) twice.
credit_ledger = sa.Table(
    "credit_ledger",
    metadata,
    sa.Column("entry_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("account_id", sa.String(32), nullable=False),
    sa.Column("task_id", sa.String(64)),
    sa.Column("kind", sa.String(16), nullable=False),  # grant | hold | charge | release
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("task_id", "kind", name="uq_credit_ledger_task_kind"),
    sa.Index("ix_credit_ledger_account", "account_id", "entry_id"),
)

uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("file_id", sa.String(32), primary_key=True),
    sa.Column("account_id", sa.String(32), nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("file_name", sa.String(255), nullable=False),
    sa.Column("original_name", sa.String(255)),
    sa.Column("file_size", sa.Integer, nullable=False),
    sa.Column("mime_type", sa.String(64), nullable=False),
    sa.Column("upload_path", sa.String(255)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("ix_uploads_expires", "expires_at"),
)

# A submit's Idempotency-Key, per account, for 24 hours: the task it made and
# a hash of its body, so a retry answers that task and another body a 409.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("account_id", sa.String(32), primary_key=True),
    sa.Column("idempotency_key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_idempotency_keys_created", "created_at"),
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
    # The submitting key's account: history, credits and the fair queue go by it.
    sa.Column("account_id", sa.String(32)),
    # Credits held at submit; charged when finished, released when failed.
    sa.Column("price", sa.BigInteger, nullable=False, server_default="0"),
    # The fair queue: claimed in (vtime, seq) order; see SqlStore.create_task.
    sa.Column("vtime", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cancelled_at", sa.Float),  # when a cancel was asked for
    sa.Column("files_expired_at", sa.Float),  # when retention removed its files
    # The task at Black Forest Labs' API that runs it ({"id", "polling_url", ...}),
    # written as soon as it exists, so that a restarted worker follows it, not a new one.
    sa.Column("upstream", sa.JSON),
    sa.Index("ix_tasks_queue", "status", "model", "vtime", "seq"),
    sa.Index("ix_tasks_account", "account_id", "seq"),
    sa.Index("ix_tasks_owner_created", "owner", "created_at"),
    sa.Index("ix_tasks_owner_status", "owner", "status"),
    sa.Index("ix_tasks_finished", "status", "finished_at"),
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
