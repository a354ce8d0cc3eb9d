"""How named tokens' lookups go together (bridge.store.tokens._Lookups), with a pool that
answers from memory and holds each statement until told: a lookup is answered by a
statement sent after it was asked (a token revoked before a request came is revoked for
it), never by one that was running already; a request that goes away leaves the others'
answers alone. The real database's side: tests/live/test_token_lookups.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.store.tokens import TokenRepo


def _row(key_id: str, revoked: bool) -> dict[str, Any]:
    return {"name": f"t-{key_id}", "key_id": key_id, "secret_hash": b"h", "scopes": ["sessions:read"],
            "rate_per_second": None, "created_at": datetime.now(UTC), "expires_at": None,
            "revoked_at": datetime.now(UTC) if revoked else None, "last_used_at": None, "expired": False}


class HeldPool:
    """fetch() answers from `table` as it is when the statement is sent, once released."""

    def __init__(self) -> None:
        self.table: dict[str, bool] = {}  # key id -> revoked
        self.sent: list[list[str]] = []  # the key ids of each statement, in order sent
        self.release: list[asyncio.Event] = []
        self.fail: list[BaseException | None] = []
        self.changed = asyncio.Condition()

    async def until_sent(self, count: int) -> None:
        """Wait (5 s at most) until `count` statements have been sent."""
        async with asyncio.timeout(5), self.changed:
            await self.changed.wait_for(lambda: len(self.sent) >= count)
        assert len(self.sent) == count, self.sent

    async def fetch(self, query: str, key_ids: list[str]) -> list[dict[str, Any]]:
        assert "key_id = ANY($1::text[])" in query
        snapshot = [_row(k, self.table[k]) for k in key_ids if k in self.table]
        self.sent.append(list(key_ids))
        go = asyncio.Event()
        self.release.append(go)
        self.fail.append(None)
        async with self.changed:
            self.changed.notify_all()
        await go.wait()
        failure = self.fail[len(self.sent) - 1]
        if failure is not None:
            raise failure
        return snapshot


async def first_lookup_held(table: dict[str, bool]) -> tuple[HeldPool, TokenRepo, asyncio.Future[Any]]:
    """A repository over a HeldPool holding `table`, and a lookup of "aaaa" whose statement
    was sent and is held."""
    pool = HeldPool()
    pool.table.update(table)
    repo = TokenRepo(pool)  # type: ignore[arg-type]
    first = asyncio.ensure_future(repo.by_key_id("aaaa"))
    await pool.until_sent(1)
    return pool, repo, first


async def test_a_lookup_is_answered_by_a_statement_sent_after_it_was_asked() -> None:
    pool, repo, first = await first_lookup_held({"aaaa": False})
    # The token is revoked after the first statement was sent, and before the second request.
    pool.table["aaaa"] = True
    second = asyncio.ensure_future(repo.by_key_id("aaaa"))
    other = asyncio.ensure_future(repo.by_key_id("bbbb"))
    await asyncio.sleep(0)  # wait-ok: one turn of the loop, in which each lookup just asked registers (no timing)
    assert len(pool.sent) == 1, "a later lookup went while one ran"
    pool.release[0].set()
    await pool.until_sent(2)
    assert sorted(pool.sent[1]) == ["aaaa", "bbbb"]
    pool.release[1].set()
    async with asyncio.timeout(5):
        one, two, nobody = await asyncio.gather(first, second, other)
    assert one is not None and one.revoked_at is None  # (its statement began before the revoke)
    assert two is not None and two.revoked_at is not None
    assert nobody is None


async def test_an_error_reaches_its_statements_lookups_and_the_next_go_on() -> None:
    pool, repo, first = await first_lookup_held({"aaaa": False, "bbbb": False})
    later = [asyncio.ensure_future(repo.by_key_id(k)) for k in ("aaaa", "bbbb")]
    pool.fail[0] = ConnectionResetError("connection lost")
    pool.release[0].set()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(5):
            await first
    await pool.until_sent(2)
    pool.release[1].set()
    async with asyncio.timeout(5):
        rows = await asyncio.gather(*later)
    assert [r.key_id if r else None for r in rows] == ["aaaa", "bbbb"]


async def test_a_request_that_goes_away_leaves_the_others_answered() -> None:
    pool, repo, first = await first_lookup_held({"aaaa": False, "bbbb": False})
    gone, stays = (asyncio.ensure_future(repo.by_key_id(k)) for k in ("aaaa", "bbbb"))
    await asyncio.sleep(0)  # wait-ok: one turn of the loop, in which both lookups register (no timing)
    gone.cancel()  # (its request went away while it waited for the next statement)
    first.cancel()  # (and this one while its statement ran)
    pool.release[0].set()
    await pool.until_sent(2)
    pool.release[1].set()
    async with asyncio.timeout(5):
        row = await stays
    assert row is not None and row.key_id == "bbbb"
    assert gone.cancelled() and first.cancelled()
    # And the next lookup, alone, goes at once.
    third = asyncio.ensure_future(repo.by_key_id("aaaa"))
    await pool.until_sent(3)
    pool.release[2].set()
    async with asyncio.timeout(5):
        assert (await third) is not None
