"""The one place where the database drivers' errors become fluxserve's own.

Every statement the store runs, on sqlite3, asyncpg or SQLAlchemy, runs inside
`driver_errors()`: a unique key already taken becomes `AlreadyStored`, and a
database that cannot be reached (or a connection it dropped, or a statement it
did not finish within the statement timeout) `StoreUnavailable`. Anything else
is a fault in the store itself and stays as it is. A store's start runs inside
`opening()` too: whatever stops it from opening its database becomes
`StoreOpenFailed`, one line for the command to print.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

import sqlalchemy as sa
from alembic.util import CommandError

from fluxserve.errors import AlreadyStored, StoreOpenFailed, StoreUnavailable

Errors = tuple[type[BaseException], ...]
ASYNCPG_DUPLICATE: Errors = ()
ASYNCPG_UNAVAILABLE: Errors = ()
ASYNCPG_BUSY: Errors = ()
ASYNCPG_TIMED_OUT: Errors = ()
ASYNCPG_ANY: Errors = ()
try:
    import asyncpg
except ImportError:  # pragma: no cover - PostgreSQL is an extra
    pass
else:
    ASYNCPG_DUPLICATE = (asyncpg.IntegrityConstraintViolationError,)
    ASYNCPG_ANY = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
    # What a statement on a connection the server dropped (a restart,
    # pg_terminate_backend) raises, depending on how far the news of it got.
    # A database that refuses new connections (ALLOW_CONNECTIONS false) answers a
    # connect with "object not in prerequisite state": an outage, not a fault.
    # So is one out of resources: no connection slot left (max_connections, a
    # role's limit), a full disk, no memory. A transaction it rolled back to break
    # a deadlock (two transactions locking an account's and a task's rows in turn)
    # is worth a try later, as an outage is. In these two the connections are sound.
    ASYNCPG_BUSY = (
        asyncpg.exceptions.InsufficientResourcesError,
        asyncpg.exceptions.TransactionRollbackError,
    )
    # A statement the server ended at its statement_timeout (or an operator's
    # pg_cancel_backend): the connection is sound, and the same statement would
    # most likely wait as long again.
    ASYNCPG_TIMED_OUT = (asyncpg.exceptions.QueryCanceledError,)
    ASYNCPG_UNAVAILABLE = (
        *ASYNCPG_BUSY,
        asyncpg.PostgresConnectionError,
        asyncpg.exceptions.OperatorInterventionError,
        asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    )

TIMED_OUT: Errors = (TimeoutError, *ASYNCPG_TIMED_OUT)
"""A statement not finished in time: ended by the server, or given up on by the client
(asyncpg's command_timeout raises TimeoutError, asyncio's too since Python 3.11)."""
DUPLICATE: Errors = (sqlite3.IntegrityError, sa.exc.IntegrityError, *ASYNCPG_DUPLICATE)
UNAVAILABLE: Errors = (
    OSError,
    sqlite3.OperationalError,  # locked, a full disk, an I/O error
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    *ASYNCPG_UNAVAILABLE,
)


@contextlib.contextmanager
def driver_errors() -> Iterator[None]:
    """Translate the driver errors raised inside into `AlreadyStored` or `StoreUnavailable`."""
    try:
        yield
    except DUPLICATE as exc:
        raise AlreadyStored(str(exc)) from exc
    except TIMED_OUT as exc:
        raise StoreUnavailable(f"database statement timed out: {exc or 'no answer'}") from exc
    except UNAVAILABLE as exc:
        raise StoreUnavailable(f"database unavailable: {exc}") from exc
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(f"database connection lost: {exc}") from exc
        raise


# What may stop a database from opening: the file system, either driver, SQLAlchemy
# and alembic (a database at a migration this version does not know).
NOT_OPENED: Errors = (
    OSError,
    sqlite3.Error,
    sa.exc.SQLAlchemyError,
    CommandError,
    StoreUnavailable,
    *ASYNCPG_ANY,
)


@contextlib.contextmanager
def opening(where: str) -> Iterator[None]:
    """Around a store's start: an error that keeps the database at `where` (a file,
    a URL) from opening becomes `StoreOpenFailed`, which names it and says why."""
    try:
        yield
    except NOT_OPENED as exc:
        raise StoreOpenFailed(f"cannot open the database at {where}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The driver's or the system's own words, without the wrappers around them."""
    if isinstance(exc, StoreUnavailable) and exc.__cause__ is not None:
        return _reason(exc.__cause__)
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        return _reason(exc.orig)
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__
