"""The named tokens' table in memory, for the HTTP layer's tests."""

from __future__ import annotations

from datetime import UTC, datetime

from bridge.store.tokens import TokenRow
from bridge.tokens import Tokens, new_secret, secret_hash


class FakeTokenRepo:
    def __init__(self) -> None:
        self.rows: dict[str, TokenRow] = {}
        self.touched: list[str] = []
        self.lookups = 0  # by_key_id calls: what would each be a database query

    async def by_key_id(self, key_id: str) -> TokenRow | None:
        self.lookups += 1
        return next((r for r in self.rows.values() if r.key_id == key_id), None)

    async def touch(self, names: list[str]) -> set[str]:
        self.touched += names
        return set(names)

    def add(self, name: str, scopes: list[str], *, revoked: bool = False, expired: bool = False,
            rate: float | None = None) -> str:
        """A token straight into the table; its secret."""
        key_id, secret = new_secret()
        self.rows[name] = TokenRow(name, key_id, secret_hash(secret), scopes, rate, datetime.now(UTC), None,
                                   datetime.now(UTC) if revoked else None, None, expired)
        return secret


def tokens_with(repo: FakeTokenRepo, api_token: str = "", recording_token: str = "") -> Tokens:
    return Tokens(repo, api_token, recording_token)  # type: ignore[arg-type]
