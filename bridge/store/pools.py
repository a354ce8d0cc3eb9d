"""Pool numbers: import, list with their load, retire, and per-region utilisation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from bridge.store.errors import NumbersInUse

log = structlog.get_logger(__name__)

# An import that changes at least this many numbers refreshes the table's statistics at once
# (autovacuum's own base threshold; it would do so only within a minute or so).
ANALYZE_AFTER = 50
ANALYZE_LOCK_WAIT_MS = 100


@dataclass(frozen=True)
class PoolNumberRow:
    number: str
    region: str | None
    state: str
    created_at: datetime
    state_changed_at: datetime
    cooling_until: datetime | None
    language: str | None
    mode: str  # direct | order_code
    live_sessions: int  # live participants holding it, i.e. live sessions it serves
    cooling_pairs: int  # (real number, this number) pairs in cool-off
    holders: int = 0  # the allocator's load: direct holds of the number, live or cooling (sql/027)


_LOAD = """
    (SELECT count(DISTINCT h.session_id) FROM participants h
     WHERE h.holds AND h.pool_number = p.number AND h.left_at IS NULL)
        AS live_sessions,
    (SELECT count(*) FROM participants h WHERE h.holds AND h.pool_number = p.number AND h.left_at IS NOT NULL
        AND h.held_until > now()) AS cooling_pairs
"""


# Somebody still holds the number: a live participant, or a pair in cool-off. (Participants
# reached by order code are never routed by their pair: their cool-off does not count.)
_HELD = """EXISTS (SELECT 1 FROM participants h WHERE h.pool_number = p.number AND h.holds
                   AND (h.held_until IS NULL OR (h.held_until > now() AND NOT h.by_code)))"""


class PoolRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def import_numbers(self, rows: list[tuple[str, str | None, str | None, str | None]]) -> dict[str, int]:
        """Add numbers, or update the region, language and mode of known ones (mode None:
        a known number keeps its mode, a new one is direct); a cooling or retired number is
        made active again. Atomic, in a few statements whatever the size; returns counts.
        Raises NumbersInUse, importing nothing, when the mode of a number someone holds
        would change."""
        async with self.pool.acquire() as conn, conn.transaction():
            old = {
                r["number"]: r
                for r in await conn.fetch(
                    f"""SELECT p.number, p.region, p.language, p.state, p.mode, {_HELD} AS held FROM pool_numbers p
                        WHERE p.number = ANY($1::text[]) FOR UPDATE""",
                    [number for number, *_ in rows],
                )
            }
            wanted = {
                number: (region, language, mode or (old[number]["mode"] if number in old else "direct"))
                for number, region, language, mode in rows
            }
            in_use = sorted(n for n, r in old.items() if r["held"] and r["mode"] != wanted[n][2])
            if in_use:
                raise NumbersInUse(in_use)
            new = [n for n in wanted if n not in old]
            reactivate = [n for n, r in old.items() if r["state"] != "active"]
            moved = [n for n, r in old.items()
                     if r["state"] == "active" and (r["region"], r["language"], r["mode"]) != wanted[n]]

            def columns(numbers: list[str]) -> tuple[list[str], list[str | None], list[str | None], list[str]]:
                return (numbers, [wanted[n][0] for n in numbers], [wanted[n][1] for n in numbers],
                        [wanted[n][2] for n in numbers])

            added = await conn.fetch(
                """INSERT INTO pool_numbers (number, region, language, mode)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                   ON CONFLICT (number) DO NOTHING RETURNING number""",
                *columns(new),
            )
            await conn.execute(
                """UPDATE pool_numbers p SET state = 'active', region = i.region, language = i.language,
                          mode = i.mode, cooling_until = NULL, state_changed_at = now()
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS i(number, region, language, mode)
                   WHERE p.number = i.number""",
                *columns(reactivate),
            )
            await conn.execute(
                """UPDATE pool_numbers p SET region = i.region, language = i.language, mode = i.mode
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS i(number, region, language, mode)
                   WHERE p.number = i.number""",
                *columns(moved),
            )
        if len(added) + len(reactivate) + len(moved) >= ANALYZE_AFTER:
            # The session opens' plans are generic and kept per connection (sql/027,
            # plan_cache_mode): planned on the statistics of a pool that was empty or a tenth of
            # its size, an open locked its number by reading every active number's index entry
            # (measured: 10,000 numbers just imported, Postgres 2.5-3.4 ms of CPU per open against
            # 1.1-2.0 once analyzed). ANALYZE makes every connection plan them again.
            # It waits for no lock: a VACUUM or an ANALYZE running on the table (which refresh the
            # statistics themselves) would hold this import, and the imports queued behind it,
            # for as long as they run.
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{ANALYZE_LOCK_WAIT_MS}ms'")
                    await conn.execute("ANALYZE pool_numbers")
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                # (the import itself committed: it stands, and autovacuum analyzes in time)
                log.warning("pool.analyze_failed", error=str(exc) or type(exc).__name__)
        return {
            "added": len(added),
            "updated": len(moved),
            "reactivated": len(reactivate),
            "unchanged": len(wanted) - len(added) - len(moved) - len(reactivate),
        }

    async def get(self, number: str) -> PoolNumberRow | None:
        row = await self.pool.fetchrow(f"SELECT p.*, {_LOAD} FROM pool_numbers p WHERE p.number = $1", number)
        return PoolNumberRow(**dict(row)) if row is not None else None

    async def page(
        self, *, region: str | None, state: str | None, after: str | None, limit: int
    ) -> list[PoolNumberRow]:
        rows = await self.pool.fetch(
            f"""
            SELECT p.*, {_LOAD} FROM pool_numbers p
            WHERE ($1::text IS NULL OR p.region = $1) AND ($2::text IS NULL OR p.state = $2)
              AND ($3::text IS NULL OR p.number > $3)
            ORDER BY p.number LIMIT $4
            """,
            region, state, after, limit,
        )
        return [PoolNumberRow(**dict(r)) for r in rows]

    async def retire(self, number: str, cooling_seconds: int) -> PoolNumberRow | None:
        """Stop handing the number out. It cools (live sessions keep it, former participants
        still hear that their order finished) and is retired once the cooling ends."""
        await self.pool.execute(
            """
            UPDATE pool_numbers SET state = 'cooling', state_changed_at = now(),
                   cooling_until = now() + make_interval(secs => $2)
            WHERE number = $1 AND state = 'active'
            """,
            number, cooling_seconds,
        )
        return await self.get(number)

    async def finish_cooling(self) -> int:
        """Cooling numbers whose time is up and which no live session uses become retired."""
        result = await self.pool.execute(
            """
            UPDATE pool_numbers p SET state = 'retired', cooling_until = NULL, state_changed_at = now()
            WHERE p.state = 'cooling' AND p.cooling_until <= now()
              AND NOT EXISTS (SELECT 1 FROM participants h WHERE h.holds AND h.pool_number = p.number
                              AND h.left_at IS NULL)
            """
        )
        return int(result.split()[-1])

    async def set_mode(self, number: str, mode: str) -> PoolNumberRow | None:
        """Make the number direct or order_code. Raises NumbersInUse when someone holds it
        (live or cooling off): their calls are routed by the mode they got it in. Opens wait
        for this (and this for them): the row is locked FOR UPDATE, and they lock it too
        (sql/027)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT p.mode, {_HELD} AS held FROM pool_numbers p WHERE p.number = $1 FOR UPDATE", number
            )
            if row is None:
                return None
            if row["mode"] != mode:
                if row["held"]:
                    raise NumbersInUse([number])
                await conn.execute("UPDATE pool_numbers SET mode = $2 WHERE number = $1", number, mode)
        return await self.get(number)

    async def routing_facts(self, number: str) -> tuple[bool, str | None, str]:
        """(whether it is one of our pool numbers, its announcement language, its mode): one
        indexed read, for every call that no pair routes."""
        row = await self.pool.fetchrow("SELECT language, mode FROM pool_numbers WHERE number = $1", number)
        if row is None:
            return False, None, "direct"
        return True, row["language"], row["mode"]

    async def known_region(self, region: str) -> bool:
        return bool(await self.pool.fetchval("SELECT EXISTS (SELECT 1 FROM pool_numbers WHERE region = $1)", region))

    async def usage(self) -> list[dict[str, Any]]:
        """Per region: numbers by state, live sessions and cooling pairs, busiest number."""
        rows = await self.pool.fetch(
            f"""
            WITH per_number AS (SELECT p.number, p.region, p.state, {_LOAD} FROM pool_numbers p)
            SELECT region,
                   count(*) FILTER (WHERE state = 'active') AS active,
                   count(*) FILTER (WHERE state = 'cooling') AS cooling,
                   count(*) FILTER (WHERE state = 'retired') AS retired,
                   coalesce(sum(live_sessions), 0)::bigint AS live_sessions,
                   coalesce(sum(cooling_pairs), 0)::bigint AS cooling_pairs,
                   coalesce(max(live_sessions), 0)::bigint AS busiest_number_sessions
            FROM per_number GROUP BY region ORDER BY region NULLS FIRST
            """
        )
        return [dict(r) for r in rows]
