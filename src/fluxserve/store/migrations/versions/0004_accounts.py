"""Accounts and their credit ledger, uploads, idempotent submits, cancel, the fair queue.

Every existing key gets an account of its own (`<key_id>@localhost`), and every
existing task its key's account. Queued tasks keep their order: a task's place
in the fair queue (`vtime`) starts as its `seq`.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(32), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("balance", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("held", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("next_vtime", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "credit_ledger",
        sa.Column("entry_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("task_id", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("task_id", "kind", name="uq_credit_ledger_task_kind"),
    )
    op.create_index("ix_credit_ledger_account", "credit_ledger", ["account_id", "entry_id"])
    op.create_table(
        "uploads",
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
    )
    op.create_index("ix_uploads_expires", "uploads", ["expires_at"])
    op.create_table(
        "idempotency_keys",
        sa.Column("account_id", sa.String(32), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_idempotency_keys_created", "idempotency_keys", ["created_at"])

    op.add_column("api_keys", sa.Column("account_id", sa.String(32)))
    op.drop_index("ix_tasks_queue", "tasks")
    op.drop_index("ix_tasks_owner", "tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("account_id", sa.String(32)))
        batch.add_column(sa.Column("price", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("vtime", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("cancelled_at", sa.Float))
        batch.add_column(sa.Column("files_expired_at", sa.Float))

    api_keys = sa.table(
        "api_keys", sa.column("key_id"), sa.column("created_at"), sa.column("account_id")
    )
    accounts = sa.table(
        "accounts", sa.column("account_id"), sa.column("email"), sa.column("created_at")
    )
    tasks = sa.table(
        "tasks", sa.column("owner"), sa.column("account_id"), sa.column("vtime"), sa.column("seq")
    )
    account_of_key = sa.literal("acct_") + sa.func.substr(api_keys.c.key_id, 5)
    op.execute(
        accounts.insert().from_select(
            ["account_id", "email", "created_at"],
            sa.select(
                account_of_key, api_keys.c.key_id + sa.literal("@localhost"), api_keys.c.created_at
            ),
        )
    )
    op.execute(api_keys.update().values(account_id=account_of_key))
    owner_account = (
        sa.select(api_keys.c.account_id).where(api_keys.c.key_id == tasks.c.owner).scalar_subquery()
    )
    op.execute(tasks.update().values(account_id=owner_account, vtime=tasks.c.seq))

    op.create_index("ix_api_keys_account", "api_keys", ["account_id"])
    # The claim and queue_position walk the fair queue: (vtime, seq) per model.
    op.create_index("ix_tasks_queue", "tasks", ["status", "model", "vtime", "seq"])
    op.create_index("ix_tasks_account", "tasks", ["account_id", "seq"])
    # Per-key limits: recent submits, and tasks queued or running.
    op.create_index("ix_tasks_owner_created", "tasks", ["owner", "created_at"])
    op.create_index("ix_tasks_owner_status", "tasks", ["owner", "status"])
    op.create_index("ix_tasks_finished", "tasks", ["status", "finished_at"])


def downgrade() -> None:
    for index in (
        "ix_tasks_finished",
        "ix_tasks_owner_status",
        "ix_tasks_owner_created",
        "ix_tasks_account",
        "ix_tasks_queue",
    ):
        op.drop_index(index, "tasks")
    op.drop_index("ix_api_keys_account", "api_keys")
    with op.batch_alter_table("tasks") as batch:
        for column in ("files_expired_at", "cancelled_at", "vtime", "price", "account_id"):
            batch.drop_column(column)
    op.create_index("ix_tasks_queue", "tasks", ["status", "model", "seq"])
    op.create_index("ix_tasks_owner", "tasks", ["owner", "seq"])
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("account_id")
    for table in ("idempotency_keys", "uploads", "credit_ledger", "accounts"):
        op.drop_table(table)
