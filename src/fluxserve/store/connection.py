"""The one road to the database: statements built with SQLAlchemy Core, compiled once
for the database's dialect, and run as plain SQL on its driver (sqlite3 or asyncpg).

A store operation is written against `Connection` (one row, all rows, execute),
inside a `Database.transaction()` or, for a statement of its own, on the
`Database` itself. The adapters are `sqlite.py` and `postgres.py`; the driver
errors they meet become fluxserve's own in `driver_errors.py`.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol
from weakref import WeakKeyDictionary

import sqlalchemy as sa


class Connection(Protocol):
    """Runs statements: module-level ones with named bound parameters given as
    `params`, or ones built per call with their values in them."""

    async def one(self, statement: Any, **params: Any) -> Any:
        """The first row (attributes named as the columns, JSON decoded), or None."""

    async def all(self, statement: Any, **params: Any) -> list[Any]: ...

    async def execute(self, statement: Any, **params: Any) -> int:
        """Run a write; how many rows it changed."""


class Database(Connection, Protocol):
    """A database: `one`, `all` and `execute` run a statement of its own (a write
    commits at once; on a lost connection it may run twice, so it must refuse to
    repeat: a unique key), `transaction()` several as one."""

    name: str  # the dialect: "sqlite" or "postgresql"
    max_seq: int  # the largest `seq` the tasks table can hold

    async def start(self) -> None:
        """Connect, and bring the schema to the newest migration; StoreOpenFailed (see
        `driver_errors.opening`) if it cannot."""

    async def close(self) -> None: ...

    def transaction(
        self, wake: Sequence[str] = (), changes: list[str] | None = None
    ) -> AbstractAsyncContextManager[Connection]:
        """A transaction; once it commits, whoever waits on the `wake` channels is
        woken, in every process, and the tasks whose ids the body put in
        `changes` (their status or progress changed) are announced."""

    async def notify(self, *channels: str) -> None:
        """Wake whoever waits on `channels`, in every process, now."""

    async def wait(self, channel: str, at_most: float) -> None:
        """Return when `channel` may have been woken, or after `at_most` seconds."""

    async def task_changes(self, at_most: float) -> frozenset[str] | None:
        """See `ports.Tasks.task_changes`."""


@dataclass(frozen=True)
class Compiled:
    """A statement as a positional-parameter driver (sqlite3, asyncpg) runs it."""

    sql: str
    names: tuple[str, ...]  # bound parameters, in the order the SQL takes them
    fixed: Mapping[str, Any]  # values bound when the statement was built
    json_names: frozenset[str]  # bound parameters of JSON type, sent as text
    row: Any  # namedtuple class with the result's column names (None: no rows)
    json_columns: tuple[int, ...]  # positions of JSON columns, which arrive as text

    @classmethod
    def of(cls, statement: Any, dialect: sa.Dialect, column_keys: Sequence[str]) -> Compiled:
        """`column_keys`: the columns a bare INSERT is given, each bound by its own name."""
        keys = list(column_keys) or None
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        if "__[POSTCOMPILE_" in compiled.string:  # IN (...) of a list: one parameter each
            compiled = statement.compile(
                dialect=dialect, column_keys=keys, compile_kwargs={"render_postcompile": True}
            )
        if compiled.insert_prefetch or compiled.update_prefetch:
            # SQLAlchemy would compute these defaults per call; the driver cannot.
            raise ValueError(f"give every column with a default a value: {compiled.string}")
        columns = list(getattr(statement, "exported_columns", ()))
        return cls(
            sql=compiled.string,
            names=tuple(compiled.positiontup or ()),
            fixed=dict(compiled.params),
            json_names=frozenset(
                name for name, bind in compiled.binds.items() if isinstance(bind.type, sa.JSON)
            ),
            # An unnamed column (a count, say) is named by its position: _0, _1...
            row=namedtuple("Row", [str(c.key) for c in columns], rename=True) if columns else None,
            json_columns=tuple(i for i, c in enumerate(columns) if isinstance(c.type, sa.JSON)),
        )

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for `params` (by bound-parameter name)."""
        values = []
        for name in self.names:
            value = params[name] if name in params else self.fixed[name]
            if name in self.json_names and value is not None:
                value = json.dumps(value)
            values.append(value)
        return values

    def shape(self, values: Sequence[Any]) -> Any:
        """One driver row as a row with attribute access and decoded JSON."""
        decoded = list(values)
        for i in self.json_columns:
            if isinstance(decoded[i], str):
                decoded[i] = json.loads(decoded[i])
        return self.row._make(decoded)


class Statements:
    """Statements compiled for one dialect: each statement object once, so one built
    at import is compiled once, and one built per call (with its values in it) each
    time it is run."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self._dialect = dialect
        self._compiled: WeakKeyDictionary[Any, dict[tuple[str, ...], Compiled]] = (
            WeakKeyDictionary()
        )

    def compiled(self, statement: Any, params: Mapping[str, Any]) -> Compiled:
        # A bare INSERT is given its whole row as `params`; any other statement binds by name.
        keys = tuple(params) if isinstance(statement, sa.Insert) else ()
        by_keys = self._compiled.get(statement)
        if by_keys is None:
            by_keys = self._compiled[statement] = {}
        found = by_keys.get(keys)
        if found is None:
            found = by_keys[keys] = Compiled.of(statement, self._dialect, keys)
        return found
