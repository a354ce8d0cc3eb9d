"""The keys of the real numbers (sql/023): the active master key version, the data keys (one
per UTC day, wrapped), the blind index key (wrapped); and the sealed numbers as retention and
rotation see them: which rows a period's key opens, re-sealing them, destroying the key.

No key reaches this module unwrapped, nor any number in plaintext (bridge.crypto)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from bridge.crypto import WrappedKey
from bridge.store.db import LONG_STATEMENT
from bridge.store.errors import StoreError

# NOTIFY when data keys are destroyed: their periods, ISO dates, comma-separated. Every bridge
# forgets them (bridge.app's listener).
CHANNEL = "maskbridge_number_keys"

# Every column that holds sealed numbers, with the rows' "left" time when they have one
# (bridge.number_keys re-seals a left participant with the key of the day it left).
SEALED_COLUMNS: dict[str, str] = {
    "participants": "left_at",
    "blocked_numbers": "NULL::timestamptz",
}

_SEALED_WITH = """
    number_enc IS NOT NULL AND (substring(number_enc FROM 1 FOR 5) = ANY($1::bytea[])
                                OR ($2 AND get_byte(number_enc, 0) = 1))
"""


@dataclass(frozen=True)
class SealedRow:
    id: uuid.UUID
    number_enc: bytes
    left_at: datetime | None


def _key(r: asyncpg.Record) -> WrappedKey:
    return WrappedKey(r["period"], r["master_version"], r["wrapped"])


class NumberKeyRepo:
    """Over the bridge's pool, or over one connection (a migration's, in its transaction)."""

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        self.db = db

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        if isinstance(self.db, asyncpg.Connection):
            async with self.db.transaction():  # (a savepoint inside the migration's transaction)
                yield self.db
        else:
            async with self.db.acquire() as conn, conn.transaction():
                yield conn

    # --- keys ------------------------------------------------------------------------------

    async def active_version(self) -> int | None:
        """The master key version new keys are wrapped with (every bridge the same)."""
        return await self.db.fetchval("SELECT version FROM number_master")

    async def _add(self, conn: asyncpg.Connection, sql: str, wrap: Callable[[int], bytes], *args: Any) -> None:
        # FOR SHARE: a rotation (set_active_version) waits for keys being made with the old
        # version, and rewraps them after; none made with it are left behind.
        version = await conn.fetchval("SELECT version FROM number_master FOR SHARE")
        if version is None:
            raise StoreError("the database has no active master key version (sql/023 not applied?)")
        await conn.execute(sql, version, wrap(version), *args)

    async def add_data_key(self, period: date, wrap: Callable[[int], bytes]) -> None:
        async with self._transaction() as conn:
            await self._add(conn, """INSERT INTO number_data_keys (period, master_version, wrapped)
                                     VALUES ($3, $1, $2) ON CONFLICT (period) DO NOTHING""", wrap, period)

    async def data_keys(self, periods: Sequence[date]) -> list[WrappedKey]:
        rows = await self.db.fetch(
            "SELECT period, master_version, wrapped FROM number_data_keys WHERE period = ANY($1::date[])",
            list(periods),
        )
        return [_key(r) for r in rows]

    async def periods(self) -> list[date]:
        return [r["period"] for r in await self.db.fetch("SELECT period FROM number_data_keys ORDER BY period")]

    async def index_key(self) -> WrappedKey | None:
        r = await self.db.fetchrow("SELECT NULL::date AS period, master_version, wrapped FROM number_index_key")
        return _key(r) if r is not None else None

    async def add_index_key(self, wrap: Callable[[int], bytes]) -> None:
        async with self._transaction() as conn:
            await self._add(conn, """INSERT INTO number_index_key (master_version, wrapped) VALUES ($1, $2)
                                     ON CONFLICT DO NOTHING""", wrap)

    async def start_versions(self, version: int) -> None:
        """A new database's active master version (sql/023's step)."""
        await self.db.execute("INSERT INTO number_master (version) VALUES ($1) ON CONFLICT DO NOTHING", version)

    # --- rotation --------------------------------------------------------------------------

    async def set_active_version(self, version: int) -> int | None:
        """Wrap new keys with `version` from now on; returns the version before."""
        async with self._transaction() as conn:
            before = await conn.fetchval("SELECT version FROM number_master FOR UPDATE")
            await conn.execute("UPDATE number_master SET version = $1, changed_at = now()", version)
            return before  # type: ignore[no-any-return]

    async def keys_not_wrapped_by(self, version: int) -> list[WrappedKey]:
        rows = await self.db.fetch(
            """SELECT period, master_version, wrapped FROM number_data_keys WHERE master_version <> $1
               UNION ALL
               SELECT NULL, master_version, wrapped FROM number_index_key WHERE master_version <> $1""",
            version,
        )
        return [_key(r) for r in rows]

    async def rewrap(self, key: WrappedKey, version: int, wrapped: bytes) -> bool:
        """Store `key` wrapped anew by `version`, unless it changed meanwhile (or was destroyed)."""
        if key.period is None:
            status = await self.db.execute(
                """UPDATE number_index_key SET master_version = $1, wrapped = $2, wrapped_at = now()
                   WHERE master_version = $3 AND wrapped = $4""",
                version, wrapped, key.master_version, key.wrapped)
        else:
            status = await self.db.execute(
                """UPDATE number_data_keys SET master_version = $1, wrapped = $2, wrapped_at = now()
                   WHERE master_version = $3 AND wrapped = $4 AND period = $5""",
                version, wrapped, key.master_version, key.wrapped, key.period)
        return bool(status == "UPDATE 1")

    async def status(self) -> dict[str, Any]:
        row = await self.db.fetchrow(
            """SELECT (SELECT version FROM number_master) AS active_version,
                      (SELECT changed_at FROM number_master) AS active_since,
                      (SELECT master_version FROM number_index_key) AS index_key_version,
                      (SELECT count(*) FROM number_data_keys) AS data_keys,
                      (SELECT min(period) FROM number_data_keys) AS oldest_period,
                      (SELECT max(period) FROM number_data_keys) AS newest_period,
                      (SELECT coalesce(jsonb_object_agg(master_version, n), '{}')::text FROM (
                          SELECT master_version, count(*) AS n FROM number_data_keys GROUP BY master_version) v
                      ) AS data_keys_by_version"""
        )
        return dict(row) if row is not None else {}

    async def legacy_numbers(self) -> int:
        """Numbers still in format 1 (sealed by a bridge older than sql/023)."""
        total = 0
        for table in SEALED_COLUMNS:
            total += int(await self.db.fetchval(
                f"SELECT count(*) FROM {table} WHERE number_enc IS NOT NULL AND get_byte(number_enc, 0) = 1",
                timeout=LONG_STATEMENT))
        return total

    # --- retention -------------------------------------------------------------------------

    async def sealed_with(self, table: str, headers: list[bytes], legacy: bool) -> list[SealedRow]:
        """Rows of `table` whose number is sealed with one of these periods' keys (their
        headers, bridge.crypto.period_header), or in format 1 when `legacy`."""
        rows = await self.db.fetch(
            f"SELECT id, number_enc, {SEALED_COLUMNS[table]} AS left_at FROM {table} WHERE {_SEALED_WITH}",
            headers, legacy, timeout=LONG_STATEMENT,
        )
        return [SealedRow(**dict(r)) for r in rows]

    async def reseal(self, table: str, changes: list[tuple[uuid.UUID, bytes, bytes]]) -> None:
        """(id, old, new): each row's number replaced, unless it changed meanwhile (a purge)."""
        await self.db.executemany(
            f"UPDATE {table} SET number_enc = $3 WHERE id = $1 AND number_enc = $2", changes,
            timeout=LONG_STATEMENT,
        )

    async def destroy(self, periods: list[date], headers: list[bytes], ignore: Sequence[uuid.UUID] = ()) -> list[date]:
        """Delete these periods' data keys, each only if no row is sealed with it any more
        (but the rows `ignore`: numbers that do not open); every bridge is told to forget
        them. Returns the periods destroyed."""
        in_use = " OR ".join(
            f"EXISTS (SELECT 1 FROM {table} WHERE number_enc IS NOT NULL "
            "AND substring(number_enc FROM 1 FOR 5) = h.header AND id <> ALL($3::uuid[]))"
            for table in SEALED_COLUMNS
        )
        async with self._transaction() as conn:
            rows = await conn.fetch(
                f"""
                WITH due AS (SELECT * FROM unnest($1::date[], $2::bytea[]) AS h(period, header)),
                gone AS (
                    DELETE FROM number_data_keys k USING due h
                    WHERE k.period = h.period AND NOT ({in_use})
                    RETURNING k.period
                )
                SELECT period FROM gone ORDER BY period
                """,
                periods, headers, list(ignore), timeout=LONG_STATEMENT,
            )
            destroyed = [r["period"] for r in rows]
            if destroyed:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, ",".join(p.isoformat() for p in destroyed))
        return destroyed
