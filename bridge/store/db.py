"""Connection pool and migrations (sql/NNN_name.sql, applied once each, in order)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import asyncpg.pool
import structlog

from bridge import metrics
from bridge.crypto import NumberVault
from bridge.languages import LANGUAGES
from bridge.store.errors import CONNECTION_LOST

log = structlog.get_logger(__name__)

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
_MIGRATION_LOCK = 0x6D61736B  # advisory lock key: one migrator at a time

# A database that hangs (a black-holed network, a stopped server) must not hang calls and
# requests with it: every statement of the bridge has COMMAND_TIMEOUT seconds, a new
# connection CONNECT_TIMEOUT, and a wait for a free connection of the pool ACQUIRE_TIMEOUT
# (then asyncio's TimeoutError: a caller hears "service unavailable", a request gets 503).
# Migrations and retention, which may run long on big tables, say LONG_STATEMENT themselves.
COMMAND_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
ACQUIRE_TIMEOUT = 10.0
LONG_STATEMENT = 3600.0


# asyncpg takes every connection back into its pool with a reset query (advisory locks,
# cursors, LISTEN, settings): a round trip more for every statement run through the pool,
# half of a session open's (issue 14). The bridge leaves none of that on a pool connection
# but the session advisory locks of Store.exclusive and migrate (which unlock them
# themselves): those connections are marked, and get asyncpg's reset query as before. (A
# transaction left open is rolled back by asyncpg whatever the reset; listeners are on
# connections of their own.)
_SESSION_STATE: set[int] = set()  # server pids of pool connections marked


def keeps_session_state(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    """Mark a pool connection that takes session state (a session advisory lock): asyncpg's
    reset query runs when it goes back to the pool."""
    _SESSION_STATE.add(conn.get_server_pid())


async def _reset(conn: asyncpg.Connection) -> None:
    pid = conn.get_server_pid()
    if pid in _SESSION_STATE:
        _SESSION_STATE.discard(pid)
        await conn.execute(conn.get_reset_query())


def refused_unsent(exc: BaseException) -> bool:
    """Whether asyncpg refused a statement before sending it: the connection was still busy
    with an earlier operation's end (a backend the server killed while the connection sat
    idle in the pool, whose error came in but not yet its close). Nothing reached the
    database: the statement may be sent again on another connection."""
    return isinstance(exc, asyncpg.InternalClientError) and str(exc).startswith("cannot switch to state")


async def once_more_if_refused_unsent(op: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    """op(*args, **kwargs), and once more if asyncpg refused it unsent (refused_unsent): the
    first connection is closed by then (_Acquired), and the second try takes another."""
    try:
        return await op(*args, **kwargs)
    except asyncpg.InternalClientError as exc:
        if not refused_unsent(exc):
            raise
        log.warning("db.statement_sent_again", error=str(exc))
        return await op(*args, **kwargs)


# A statement that failed because its connection broke (errors.CONNECTION_LOST: the server
# terminated the backend or shut down, the socket closed) can leave asyncpg's connection
# still reading the error as it goes back to the pool; the reset query would have found out,
# but the bridge skips it (_reset): the next statement on it failed with asyncpg's "cannot
# switch to state 12; another operation (2) is in progress", a 500 (adversary, issue 14).
# Such a connection is closed as it goes back instead, and the pool opens a new one when it
# needs it.
class _Acquired(asyncpg.pool.PoolAcquireContext):
    """`async with pool.acquire()` (and pool.fetch() and the others, which use it): a
    connection whose statement failed as one of CONNECTION_LOST is closed, not reused."""

    __slots__ = ()

    async def __aexit__(self, *exc: Any) -> None:
        if isinstance(exc[1], CONNECTION_LOST) and self.connection is not None:
            # (A connection whose server end went away may be back in the pool already,
            # released by asyncpg as it saw it go: nothing of it is left to close then.)
            with contextlib.suppress(asyncpg.InterfaceError):
                self.connection.terminate()
        await super().__aexit__(*exc)


class MeasuredPool(asyncpg.pool.Pool):
    """asyncpg's pool, timing each wait for a connection (bridge.metrics). asyncpg has no hook
    for it; `_acquire` is what every acquire() and every pool.fetch() goes through."""

    name = "calls"  # the pool's label in the metrics (connect's `name`)

    def acquire(self, *, timeout: float | None = None) -> _Acquired:
        return _Acquired(self, timeout)

    # The pool's one-statement shortcuts (most of the bridge's statements, the route lookup's
    # among them) send a statement refused unsent again, once; a statement in a transaction
    # of its own (`async with pool.acquire()`) is not: its caller sees the error (503).
    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        return await once_more_if_refused_unsent(super().execute, query, *args, timeout=timeout)  # type: ignore[no-any-return]

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        await once_more_if_refused_unsent(super().executemany, command, args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> list[Any]:
        return await once_more_if_refused_unsent(  # type: ignore[no-any-return]
            super().fetch, query, *args, timeout=timeout, record_class=record_class)

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        return await once_more_if_refused_unsent(super().fetchval, query, *args, column=column, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> Any:
        return await once_more_if_refused_unsent(
            super().fetchrow, query, *args, timeout=timeout, record_class=record_class)

    async def _acquire(self, timeout: float | None) -> Any:
        timeout = ACQUIRE_TIMEOUT if timeout is None else timeout
        # (Every connection is in use: asyncpg's queue of free ones, which holds one entry per
        # connection the pool may have, connected or not, is empty. get_idle_size() and
        # get_size() look at every connection, on every acquire.)
        free = not self._queue.empty()
        if not free:
            metrics.DB_WAITS.labels(self.name).inc()
        began = time.perf_counter()
        try:
            if not free:
                return await super()._acquire(timeout)  # type: ignore[misc]
            # A free one is taken at once: no timeout, which spares the task and the timer
            # asyncio's wait_for makes on every acquire (3 % of a session open's CPU). Its
            # connecting, when it has no connection yet, has the connect timeout; its release
            # keeps the time limit an acquire gives it (asyncpg reads it from the holder).
            proxy = await super()._acquire(None)  # type: ignore[misc]
            proxy._holder._timeout = timeout
            return proxy
        finally:
            metrics.DB_ACQUIRE.labels(self.name).observe(time.perf_counter() - began)


async def connect(dsn: str, *, min_size: int = 1, max_size: int = 10,
                  command_timeout: float | None = COMMAND_TIMEOUT, name: str = "calls") -> asyncpg.Pool:
    """A pool of the bridge (command_timeout=None: the admin tool's, whose commands may run
    long), measured in the metrics as `name`: "calls" for the process's own work (calls,
    housekeeping), "api" for the HTTP API's (bridge.app)."""
    # (asyncpg.create_pool, with its defaults, but of the measured class.)
    pool = MeasuredPool(
        dsn, min_size=min_size, max_size=max_size, max_queries=50000, max_inactive_connection_lifetime=300.0,
        connect=None, setup=None, init=None, reset=_reset, loop=None,
        connection_class=asyncpg.connection.Connection, record_class=asyncpg.Record,
        command_timeout=command_timeout, timeout=CONNECT_TIMEOUT,
    )
    pool.name = name
    await pool
    metrics.DATABASE_POOLS.pools[name] = pool
    metrics.DB_WAITS.labels(name)  # (both families at 0 from the start, not from their first sample)
    metrics.DB_ACQUIRE.labels(name)
    return pool


async def _seal_plaintext_numbers(conn: asyncpg.Connection, vault: NumberVault) -> None:
    """After 002: seal every real number stored in plaintext by 001, then empty it (in
    format 1: sql/023's step re-seals it)."""
    rows = await conn.fetch("SELECT id, real_number FROM participants WHERE real_number IS NOT NULL",
                            timeout=LONG_STATEMENT)
    await conn.executemany(
        "UPDATE participants SET number_idx = $2, number_enc = $3, real_number = NULL WHERE id = $1",
        [(r["id"], vault.index(r["real_number"]), vault.masters.seal_legacy(r["real_number"])) for r in rows],
        timeout=LONG_STATEMENT,
    )
    if rows:
        log.info("db.sealed_plaintext_numbers", participants=len(rows))


async def _seal_with_data_keys(conn: asyncpg.Connection, vault: NumberVault) -> None:
    """After 023: the active master version, the blind index key (the one the numbers are
    indexed with), and every number of format 1 re-sealed with today's data key, bound to its
    row. (A bridge older than 023 still running may seal some more: retention re-seals them.)"""
    from bridge.number_keys import NumberKeys  # (these two need this module: imported late)
    from bridge.store.number_keys import NumberKeyRepo

    repo = NumberKeyRepo(conn)
    await repo.start_versions(vault.masters.newest)
    bound = vault.bound_to(repo)
    await bound.start()
    resealed = await NumberKeys(repo, bound).reseal([], True, None)
    if resealed:
        log.info("db.resealed_numbers", numbers=resealed)


# Data steps that need what the database must not hold (the number key); each runs in the
# transaction of the SQL file it is named after, right after it.
_PYTHON_STEPS: dict[str, Callable[[asyncpg.Connection, NumberVault], Awaitable[None]]] = {
    "002_pools_sessions_sealed_numbers.sql": _seal_plaintext_numbers,
    "023_number_data_keys.sql": _seal_with_data_keys,
}


def _migrations(sql_dir: Path) -> list[Path]:
    return sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql"))


async def pending(pool: asyncpg.Pool, sql_dir: Path = SQL_DIR) -> list[str]:
    """The migrations this database has not had yet."""
    exists = await pool.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = {r["name"] for r in await pool.fetch("SELECT name FROM schema_migrations")} if exists else set()
    return [p.name for p in _migrations(sql_dir) if p.name not in done]


async def migrate(pool: asyncpg.Pool, vault: NumberVault, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the migrations not applied yet, all in one transaction (a bridge of the old
    version never sees a schema half way); returns their names."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        keeps_session_state(conn)
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK, timeout=LONG_STATEMENT)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            async with conn.transaction():
                for path in _migrations(sql_dir):
                    if path.name in done:
                        continue
                    await conn.execute(path.read_text(), timeout=LONG_STATEMENT)
                    step = _PYTHON_STEPS.get(path.name)
                    if step is not None:
                        await step(conn, vault)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
                    applied.append(path.name)
            for name in applied:
                log.info("db.migrated", migration=name)
            # The languages are the bridge's (bridge.languages): the database learns them
            # (once it has the table: a database migrated only part of the way has not).
            if await conn.fetchval("SELECT to_regclass('languages') IS NOT NULL"):
                await conn.execute("INSERT INTO languages (code) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                                   list(LANGUAGES))
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied
