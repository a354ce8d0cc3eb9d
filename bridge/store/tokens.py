"""The named API tokens (their secrets' hashes, never the secrets)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg


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


class TokenRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def by_key_id(self, key_id: str) -> TokenRow | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM api_tokens WHERE key_id = $1", key_id)
        return TokenRow(**dict(row)) if row is not None else None

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

    async def touch(self, name: str) -> None:
        await self.pool.execute("UPDATE api_tokens SET last_used_at = now() WHERE name = $1", name)
