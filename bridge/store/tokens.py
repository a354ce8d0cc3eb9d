"""The named API tokens (their secrets' hashes, never the secrets)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from bridge import metrics


@dataclass(frozen=True)
class TokenRow:
    name: str
    key_id: str
    secret_hash: bytes
    scopes: list[str]
    rate_per_second: float | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    expired: bool  # past its expiry, by the database's clock


_COLUMNS = """name, key_id, secret_hash, scopes, rate_per_second, created_at, expires_at, revoked_at, last_used_at,
              coalesce(expires_at <= now(), false) AS expired"""


TOUCH_LOCK_WAIT_MS = 100  # the most a write of tokens' last use waits for a lock on the table


class _Lookups:
    """Tokens looked up by key id, several in one statement: a lookup goes at once when no
    statement of them runs, else it waits for the next one, which asks for every key id
    asked meanwhile. So every request still looks its token up (a statement that began after
    it arrived answers it: a token revoked before a request came is revoked for it; README,
    "API tokens"), and the lookups of requests that come together take one statement and one
    of the API's database connections, not one each (issue 14: each took a round trip and a
    connection from the session opens)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.waiting: dict[str, list[asyncio.Future[TokenRow | None]]] = {}
        self.running: asyncio.Task[None] | None = None

    async def get(self, key_id: str) -> TokenRow | None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[TokenRow | None] = loop.create_future()
        self.waiting.setdefault(key_id, []).append(done)
        if self.running is None or self.running.done():  # (done: cancelled before it ran, as a loop closed)
            self.running = loop.create_task(self._run(), name="token-lookups")
        return await done

    async def _run(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, {}
                metrics.TOKEN_LOOKUPS_PER_STATEMENT.observe(sum(len(waiting) for waiting in batch.values()))
                try:
                    rows = await self.pool.fetch(
                        f"SELECT {_COLUMNS} FROM api_tokens WHERE key_id = ANY($1::text[])", list(batch))
                except Exception as exc:  # noqa: BLE001 - passed on: every lookup of the statement gets its error
                    for done in _unanswered(batch):
                        done.set_exception(exc)
                    continue
                except BaseException:  # (cancelled: the loop is closing)
                    for done in _unanswered(batch):
                        done.cancel()
                    raise
                found = {row["key_id"]: TokenRow(**dict(row)) for row in rows}
                for key_id, waiting in batch.items():
                    for done in waiting:
                        if not done.done():  # (its request went away meanwhile)
                            done.set_result(found.get(key_id))
        finally:
            self.running = None
            # (cancelled, as the loop closes: none is left waiting for a statement that will not come)
            for done in _unanswered(self.waiting):
                done.cancel()
            self.waiting = {}


def _unanswered(batch: dict[str, list[asyncio.Future[TokenRow | None]]]) -> list[asyncio.Future[TokenRow | None]]:
    """The lookups of a batch not answered yet (nor gone with their requests)."""
    return [done for waiting in batch.values() for done in waiting if not done.done()]


class TokenRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._lookups = _Lookups(pool)

    async def by_key_id(self, key_id: str) -> TokenRow | None:
        return await self._lookups.get(key_id)

    async def insert(
        self, name: str, key_id: str, digest: bytes, scopes: list[str], expires_at: datetime | None,
        rate: float | None,
    ) -> TokenRow | None:
        """The new token; None when the name is taken (now or in the past)."""
        row = await self.pool.fetchrow(
            f"""INSERT INTO api_tokens (name, key_id, secret_hash, scopes, expires_at, rate_per_second)
                VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING RETURNING {_COLUMNS}""",
            name, key_id, digest, scopes, expires_at, rate,
        )
        return TokenRow(**dict(row)) if row is not None else None

    async def revoke(self, name: str) -> TokenRow | None:
        """The token, revoked now (or when it was revoked already); None: no such token."""
        row = await self.pool.fetchrow(
            f"""UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE name = $1
                RETURNING {_COLUMNS}""",
            name,
        )
        return TokenRow(**dict(row)) if row is not None else None

    async def all(self) -> list[TokenRow]:
        return [TokenRow(**dict(r)) for r in await self.pool.fetch(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY name")]

    async def touch(self, names: list[str]) -> set[str]:
        """The tokens' last use is now; the names written. A row another transaction holds is
        skipped, and a lock on the table is waited for 100 ms at most (then the error): the
        write is never worth a wait."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{TOUCH_LOCK_WAIT_MS}ms'")
            rows = await conn.fetch(
                """
                WITH free AS (SELECT name FROM api_tokens WHERE name = ANY($1::text[])
                              FOR NO KEY UPDATE SKIP LOCKED)
                UPDATE api_tokens SET last_used_at = now() FROM free WHERE api_tokens.name = free.name
                RETURNING api_tokens.name
                """, names)
        return {row["name"] for row in rows}
