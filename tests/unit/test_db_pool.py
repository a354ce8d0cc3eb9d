"""The bridge's pool (bridge.store.db): a connection whose statement failed because the
connection broke is closed as it goes back, never handed to the next statement (the pool
skips asyncpg's reset query, which would have found it out); one whose statement failed
for any other reason goes back as it is."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from bridge.store.db import MeasuredPool, _Acquired


class Connection:
    def __init__(self) -> None:
        self.terminated = False

    def terminate(self) -> None:
        self.terminated = True


class Pool:
    def __init__(self) -> None:
        self.connection = Connection()
        self.released: list[Any] = []

    async def _acquire(self, timeout: float | None) -> Connection:
        return self.connection

    async def release(self, connection: Connection) -> None:
        self.released.append(connection)


BROKEN = [
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is shutting down"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    ConnectionResetError(),
]


@pytest.mark.parametrize("error", BROKEN, ids=lambda e: type(e).__name__)
async def test_a_connection_broken_under_its_statement_is_closed_as_it_goes_back(error):
    pool = Pool()
    with pytest.raises(type(error)):
        async with _Acquired(pool, None):  # type: ignore[arg-type]
            raise error
    assert pool.connection.terminated
    assert pool.released == [pool.connection], "and released to the pool, which drops it"


@pytest.mark.parametrize("error", [
    asyncpg.UniqueViolationError("duplicate key"), asyncpg.QueryCanceledError("statement timeout"),
    asyncpg.SerializationError("could not serialize"), ValueError("the caller's own"),
], ids=lambda e: type(e).__name__)
async def test_a_connection_whose_statement_failed_otherwise_goes_back_as_it_is(error):
    pool = Pool()
    with pytest.raises(type(error)):
        async with _Acquired(pool, None):  # type: ignore[arg-type]
            raise error
    assert not pool.connection.terminated
    assert pool.released == [pool.connection]


async def test_a_connection_whose_statements_went_well_goes_back_as_it_is():
    pool = Pool()
    async with _Acquired(pool, None) as conn:  # type: ignore[arg-type]
        assert conn is pool.connection
    assert not pool.connection.terminated and pool.released == [pool.connection]


REFUSED = "cannot switch to state 12; another operation (2) is in progress"


@pytest.mark.parametrize("method", ["execute", "fetch", "fetchval", "fetchrow"])
async def test_a_statement_refused_unsent_is_sent_once_more(monkeypatch, method):
    """asyncpg refuses a statement before sending it when the connection still ends an
    operation that died (a backend killed while idle in the pool): the pool's shortcuts send
    it again on another connection, once."""
    sent: list[tuple[Any, ...]] = []

    async def flaky(self: Any, query: str, *args: Any, **kwargs: Any) -> str:
        sent.append((query, *args))
        if len(sent) == 1:
            raise asyncpg.InternalClientError(REFUSED)
        return "answer"

    monkeypatch.setattr(asyncpg.pool.Pool, method, flaky)
    pool = MeasuredPool.__new__(MeasuredPool)
    assert await getattr(pool, method)("SELECT $1", 1) == "answer"
    assert sent == [("SELECT $1", 1)] * 2


async def test_a_statement_refused_twice_or_failing_otherwise_is_not_sent_again(monkeypatch):
    sent: list[str] = []

    async def refused(self: Any, query: str, *args: Any, **kwargs: Any) -> str:
        sent.append(query)
        raise asyncpg.InternalClientError(REFUSED)

    async def other(self: Any, query: str, *args: Any, **kwargs: Any) -> str:
        sent.append(query)
        raise asyncpg.InternalClientError("unexpected message")

    pool = MeasuredPool.__new__(MeasuredPool)
    monkeypatch.setattr(asyncpg.pool.Pool, "fetchrow", refused)
    with pytest.raises(asyncpg.InternalClientError):
        await pool.fetchrow("SELECT 1")
    assert len(sent) == 2, "once more, not more"
    sent.clear()
    monkeypatch.setattr(asyncpg.pool.Pool, "fetchrow", other)
    with pytest.raises(asyncpg.InternalClientError):
        await pool.fetchrow("SELECT 1")
    assert len(sent) == 1, "what may have reached the database is not sent again"
