"""Callback event types and filters, the attempt log, and webhook signing secrets.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _origin(url: str) -> str:
    # As fluxserve.store.sql.callback_origin was at this revision.
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{parts.hostname or ''}:{port}"


def upgrade() -> None:
    op.add_column("tasks", sa.Column("callback_events", sa.JSON))
    op.add_column("callbacks", sa.Column("event_type", sa.String(16)))
    op.add_column("callbacks", sa.Column("origin", sa.Text))
    callbacks = sa.table(
        "callbacks",
        sa.column("callback_id"),
        sa.column("task_id"),
        sa.column("url"),
        sa.column("event_type"),
        sa.column("origin"),
    )
    tasks = sa.table("tasks", sa.column("task_id"), sa.column("status"))
    # Every callback so far is a terminal one, of its task's final status.
    final_status = (
        sa.select(tasks.c.status).where(tasks.c.task_id == callbacks.c.task_id).scalar_subquery()
    )
    op.execute(callbacks.update().values(event_type=sa.func.coalesce(final_status, "failed")))
    connection = op.get_bind()
    rows = connection.execute(sa.select(callbacks.c.callback_id, callbacks.c.url)).all()
    for callback_id, url in rows:
        connection.execute(
            callbacks.update()
            .where(callbacks.c.callback_id == callback_id)
            .values(origin=_origin(url))
        )
    with op.batch_alter_table("callbacks") as batch:
        batch.alter_column("event_type", existing_type=sa.String(16), nullable=False)
        batch.alter_column("origin", existing_type=sa.Text, nullable=False)
    op.create_index("ix_callbacks_task", "callbacks", ["task_id", "callback_id"])
    op.create_table(
        "callback_attempts",
        sa.Column("attempt_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("callback_id", sa.Integer, nullable=False),
        sa.Column("attempted_at", sa.Float, nullable=False),
        sa.Column("duration", sa.Float, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.Text),
    )
    op.create_index(
        "ix_callback_attempts_callback", "callback_attempts", ["callback_id", "attempt_id"]
    )
    op.create_table(
        "webhook_secrets",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("previous_secret", sa.String(128)),
        sa.Column("previous_expires_at", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("webhook_secrets")
    op.drop_table("callback_attempts")
    op.drop_index("ix_callbacks_task", "callbacks")
    with op.batch_alter_table("callbacks") as batch:
        batch.drop_column("origin")
        batch.drop_column("event_type")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("callback_events")
