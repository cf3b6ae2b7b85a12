"""Hot reads run on the database driver itself, without SQLAlchemy's per-call work.

A statement is built once with SQLAlchemy Core, compiled once for the store's
dialect, and then run as plain SQL on sqlite3 or asyncpg: a few microseconds of
Python per call instead of about a millisecond (statement caching, greenlet and
thread hand-offs, transaction bookkeeping). Rows come back with the same
attribute names and values as SQLAlchemy's, so one row-to-object function serves
both paths. Only for statements whose parameters the driver takes as they are
(strings and numbers).
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa


@dataclass(frozen=True)
class CompiledRead:
    """A SELECT as a positional-parameter driver (sqlite3, asyncpg) runs it."""

    sql: str
    names: tuple[str, ...]  # bound parameters, in the order the SQL takes them
    fixed: Mapping[str, Any]  # values bound when the statement was built
    row: Any  # namedtuple class with the result's column names
    json_columns: tuple[int, ...]  # positions of JSON columns, which arrive as text

    @classmethod
    def of(cls, statement: sa.Select[Any], dialect: sa.Dialect) -> CompiledRead:
        compiled = statement.compile(dialect=dialect)
        columns = list(statement.selected_columns)
        return cls(
            sql=compiled.string,
            names=tuple(compiled.positiontup or ()),
            fixed=dict(compiled.params),
            row=namedtuple("Row", [column.key for column in columns]),  # type: ignore[misc]
            json_columns=tuple(i for i, c in enumerate(columns) if isinstance(c.type, sa.JSON)),
        )

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for `params` (by bound-parameter name)."""
        return [params[name] if name in params else self.fixed[name] for name in self.names]

    def shape(self, values: Sequence[Any]) -> Any:
        """One driver row as a row with attribute access and decoded JSON."""
        decoded = list(values)
        for i in self.json_columns:
            if isinstance(decoded[i], str):
                decoded[i] = json.loads(decoded[i])
        return self.row._make(decoded)
