"""Hot statements run on the database driver itself, without SQLAlchemy's per-call work.

A statement is built once with SQLAlchemy Core, compiled once for the store's
dialect, and then run as plain SQL on sqlite3 or asyncpg: a few microseconds of
Python per call instead of about a millisecond (statement caching, greenlet and
thread hand-offs, transaction bookkeeping). Rows come back with the same
attribute names and values as SQLAlchemy's, so one row-to-object function serves
both paths.

A transaction of several statements is written once, as a program: a generator
that yields each `Step` and is sent back the step's first row (or None). The
program holds the logic; a runner on SQLAlchemy, sqlite3 or asyncpg runs it, so
the same checks hold whichever way a store reaches its database.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Awaitable, Callable, Collection, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """One statement of a program, with its parameters by bound-parameter name.

    An INSERT is the bare `table.insert()`, given the whole row as `params`. Each
    statement is compiled once per object: build it once, at import.
    """

    statement: Any
    params: Mapping[str, Any] = field(default_factory=dict)


Program = Generator[Step, Any, T]
"""A transaction's logic: yields steps, is sent each one's first row, returns its answer."""


async def run(program: Program[T], execute: Callable[[Step], Awaitable[Any]]) -> T:
    """Run `program`'s steps in order through `execute`; its answer.

    A step that `execute` answers without waiting (sqlite3) gives the event loop
    no turn, so such a program runs whole, as one piece of the loop's work."""
    row = None
    while True:
        try:
            step = program.send(row)
        except StopIteration as done:
            return done.value
        row = await execute(step)


@dataclass(frozen=True)
class CompiledStatement:
    """A statement as a positional-parameter driver (sqlite3, asyncpg) runs it."""

    sql: str
    names: tuple[str, ...]  # bound parameters, in the order the SQL takes them
    fixed: Mapping[str, Any]  # values bound when the statement was built
    json_names: frozenset[str]  # bound parameters of JSON type, sent as text
    row: Any  # namedtuple class with the result's column names (None: no rows)
    json_columns: tuple[int, ...]  # positions of JSON columns, which arrive as text

    @classmethod
    def of(
        cls, statement: Any, dialect: sa.Dialect, column_keys: Collection[str] = ()
    ) -> CompiledStatement:
        """`column_keys`: the columns an INSERT is given, each bound by its own name."""
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) or None)
        if compiled.insert_prefetch or compiled.update_prefetch:
            # SQLAlchemy would compute these defaults per call; the driver cannot.
            raise ValueError(f"give every column with a default a value: {compiled.string}")
        columns = list(statement.exported_columns)
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

    def shape(self, values: Sequence[Any] | None) -> Any:
        """One driver row as a row with attribute access and decoded JSON; None stays None."""
        if values is None or self.row is None:
            return None
        decoded = list(values)
        for i in self.json_columns:
            if isinstance(decoded[i], str):
                decoded[i] = json.loads(decoded[i])
        return self.row._make(decoded)
