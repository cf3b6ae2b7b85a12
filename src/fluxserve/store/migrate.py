"""The schema's migrations (`migrations/`), run by alembic when a store starts."""

from __future__ import annotations

from functools import cache
from importlib import resources

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

VERSION = sa.select(sa.table("alembic_version", sa.column("version_num")).c.version_num)
"""The migration the database is at."""


def _config() -> Config:
    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("fluxserve.store") / "migrations")
    )
    return config


@cache
def head() -> str | None:
    """The newest migration this version of the code has: read from its files once."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def upgrade(connection: sa.Connection) -> None:
    """Bring the schema to `head()`, in the caller's transaction."""
    config = _config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
