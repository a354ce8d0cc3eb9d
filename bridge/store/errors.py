"""What the store reports besides the database's own errors: one base class, so that a
caller can tell "the data says no" (a StoreError) from "the database failed"."""

from __future__ import annotations

import asyncpg


class StoreError(Exception):
    """A change the data does not allow, or that lost a race: the caller decides."""


class PairTaken(StoreError):
    """A participant holds this pool number already (live, or in cool-off)."""


class OrderRace(StoreError):
    """Another open for the same order won the race."""


class SessionGone(StoreError):
    """The session does not exist, or is not in a state that allows the change."""


class CodeTaken(StoreError):
    """A live session on this pool number has this order code already."""


class NumbersInUse(StoreError):
    """The mode of these pool numbers cannot change: someone holds them (live or cooling off)."""

    def __init__(self, numbers: list[str]) -> None:
        super().__init__(", ".join(numbers))
        self.numbers = numbers


class Contended(StoreError):
    """The database gave up on the transaction (a deadlock, or a serialization failure against
    a concurrent one): nothing was written, and trying again is safe."""


# The connection is gone, or no longer usable: store.db closes a pool connection whose
# statement failed so, rather than hand it to the next statement.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # connection failures
    asyncpg.CannotConnectNowError,  # the server is starting up or shutting down
    asyncpg.AdminShutdownError,  # the server shut down, or terminated the backend, under the statement
    asyncpg.CrashShutdownError,  # another backend crashed: the server restarts
    asyncpg.ConnectionDoesNotExistError,  # the connection died under the statement
    asyncpg.InternalClientError,  # asyncpg's connection was left mid-operation by one that died (store.db)
    asyncpg.InterfaceError,  # the connection (or the pool) is closed
    ConnectionError,  # the pool could not open a connection (refused, reset)
)
_UNREACHABLE = (
    *CONNECTION_LOST,
    asyncpg.TooManyConnectionsError,
    TimeoutError,  # the database did not answer in time (store.db: COMMAND_TIMEOUT and the others)
    # The server gave up on the statement (a statement_timeout or lock_timeout set on the role,
    # an operator's pg_cancel_backend of a stuck query): nothing of it was written.
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or the connection was lost (the
    request may be retried), rather than that a statement failed."""
    return isinstance(exc, _UNREACHABLE)
