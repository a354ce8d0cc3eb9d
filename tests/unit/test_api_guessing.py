"""Answers that confirm a guess are expensive, and requests without a valid token are cheap to
refuse: the conflict budget per token and the bucket per remote address, at the HTTP layer
(aiohttp's test client against the real routes and middlewares, fake services, a fake clock).

The attack they stop: a token with sessions:read and sessions:write reads a masked client
number (+7926***7788), then opens the order again with each candidate client number: the right
one answers 200 (the idempotent re-open), every other 409 order_has_open_session."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from bridge.api.http import make_app
from bridge.api.ratelimit import RateLimiter
from bridge.errors import CourierIsClient, OrderHasOpenSession
from bridge.recordings import Recordings
from bridge.requests import OpenSession
from bridge.store.sessions import SessionRow
from test_http_handlers import TOKEN, Services, session_row
from test_recordings import FakeRepo
from test_api_tokens import Clock
from token_fake import FakeTokenRepo, tokens_with

CLIENT = "+79261237788"  # what the attacker sees: +7926***7788
COURIER = "+79160000001"
CANDIDATES = [f"+7926{n:03d}7788" for n in range(1000)]


class GuardedSessions:
    """One open order whose client is CLIENT: opening it again answers as Sessions does (the
    same people: the session, 200; others: 409). Reassigning to the client's number: 422."""

    def __init__(self) -> None:
        self.session = session_row(0)
        self.opens = 0  # opens that reached the service
        self.entered = asyncio.Event()  # (the concurrency test holds opens here)
        self.hold: asyncio.Event | None = None

    def reveal(self, participant: Any) -> str | None:
        return None

    async def open(self, request: OpenSession) -> tuple[SessionRow, bool]:
        self.opens += 1
        if self.hold is not None:
            await self.hold.wait()
        if request.client_number != CLIENT:
            raise OrderHasOpenSession(session_id=str(self.session.id))
        return self.session, False

    async def get(self, session_id: uuid.UUID) -> SessionRow:
        return self.session

    async def reassign_courier(self, session_id: uuid.UUID, number: object, field: str) -> tuple[SessionRow, bool]:
        if number == CLIENT:
            raise CourierIsClient("the new courier's number is the client's number", field=field)
        return self.session, True


class Stack:
    def __init__(self) -> None:
        self.clock = Clock()
        self.sessions = GuardedSessions()
        self.tokens = FakeTokenRepo()
        self.audit = FakeRepo()
        self.dispatch = self.tokens.add("dispatch", ["sessions:read", "sessions:write"])
        self.other = self.tokens.add("other", ["sessions:read", "sessions:write"])


@pytest.fixture
async def stack() -> AsyncIterator[tuple[Stack, TestClient[web.Request, web.Application]]]:
    s = Stack()

    async def health() -> dict[str, Any]:
        return {"ari": True, "database": True}

    recordings = Recordings(SimpleNamespace(recordings=s.audit), None, "")  # type: ignore[arg-type]
    services = Services()
    app = make_app(
        s.sessions, services.pools, services.blocklist, tokens_with(s.tokens, TOKEN), health,  # type: ignore[arg-type]
        recordings, limiter=RateLimiter(0, 1),  # (no limit per token: the budgets below are what is tested)
        conflicts=RateLimiter(10 / 60, 20, clock=s.clock),  # the defaults: 10 a minute, 20 at once
        addresses=RateLimiter(20, 40, clock=s.clock),
    )
    async with TestClient(TestServer(app)) as client:
        yield s, client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def reopen(client_number: str) -> dict[str, str]:
    return {"order_id": "o-0", "courier_number": COURIER, "client_number": client_number}


# --- the conflict budget -----------------------------------------------------------------------


async def test_a_guessing_loop_gets_429_after_the_burst_and_never_learns_the_number(stack):
    s, client = stack
    answers = []
    for candidate in CANDIDATES:  # the right one (index 123) comes after the burst
        resp = await client.post("/v1/sessions", json=reopen(candidate), headers=bearer(s.dispatch))
        answers.append(resp.status)
        if resp.status == 429:
            assert resp.headers["Retry-After"] == "6"  # 10 a minute
            assert (await resp.json())["error"]["code"] == "rate_limited"
    assert answers == [409] * 20 + [429] * 980  # the right guess too: refused before it ran
    assert s.sessions.opens == 20
    # Another token has a budget of its own.
    assert (await client.post("/v1/sessions", json=reopen(CLIENT), headers=bearer(s.other))).status == 200
    # One more guess every 6 seconds.
    s.clock.now += 6
    assert (await client.post("/v1/sessions", json=reopen(CANDIDATES[20]), headers=bearer(s.dispatch))).status == 409
    assert (await client.post("/v1/sessions", json=reopen(CLIENT), headers=bearer(s.dispatch))).status == 429


async def test_opens_that_do_not_conflict_cost_nothing_of_the_budget(stack):
    s, client = stack
    for _ in range(200):  # the order system asking again and again for its open session
        assert (await client.post("/v1/sessions", json=reopen(CLIENT), headers=bearer(s.dispatch))).status == 200
    for _ in range(20):
        assert (await client.post("/v1/sessions", json=reopen(CANDIDATES[0]),
                                  headers=bearer(s.dispatch))).status == 409


async def test_guesses_sent_at_once_do_not_all_pass_before_the_first_is_counted(stack):
    s, client = stack
    s.sessions.hold = asyncio.Event()
    tasks = [asyncio.create_task(client.post("/v1/sessions", json=reopen(c), headers=bearer(s.dispatch)))
             for c in CANDIDATES[:50]]
    async with asyncio.timeout(20):
        # The 30 beyond the budget are answered while the first 20 are still held in the service.
        while sum(t.done() for t in tasks) < 30:
            await asyncio.wait([t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED)
        assert s.sessions.opens == 20
        s.sessions.hold.set()
        statuses = sorted([(await t).status for t in tasks])
    assert statuses == [409] * 20 + [429] * 30


async def test_a_reassignment_to_the_clients_number_costs_the_token_its_budget(stack):
    s, client = stack
    for _ in range(20):  # (each on a session of its own: the token's budget is what runs out)
        resp = await client.post(f"/v1/sessions/{uuid.uuid4()}/participants", json={"role": "courier", "number": CLIENT},
                                 headers=bearer(s.dispatch))
        assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_input"
    # The budget is shared with the opens, and both are refused now.
    resp = await client.post(f"/v1/sessions/{uuid.uuid4()}/participants",
                             json={"role": "courier", "number": CANDIDATES[0]}, headers=bearer(s.dispatch))
    assert resp.status == 429
    assert (await client.post("/v1/sessions", json=reopen(CLIENT), headers=bearer(s.dispatch))).status == 429
    # Reads are not guessable operations: they go on.
    assert (await client.get(f"/v1/sessions/{s.sessions.session.id}", headers=bearer(s.dispatch))).status == 200


async def test_a_reassignment_loop_with_candidate_numbers_learns_nothing_past_the_sessions_burst(stack):
    """Every wrong candidate would succeed (201) and the client's number alone be refused: so
    each change of a session's courier costs the session's budget (20 at once, 10 a minute),
    whoever asks, and past it every reassignment of the session is refused before it runs."""
    s, client = stack
    path = f"/v1/sessions/{s.sessions.session.id}/participants"
    statuses = []
    for candidate in [*CANDIDATES[:100], CLIENT]:
        resp = await client.post(path, json={"role": "courier", "number": candidate}, headers=bearer(s.dispatch))
        statuses.append(resp.status)
    assert statuses == [201] * 20 + [429] * 81
    assert (await resp.json())["error"]["message"] == "too many changes of this session's courier; try again in 6 s"
    # Another token gets no more of this session; other sessions are not held up.
    resp = await client.post(path, json={"role": "courier", "number": CLIENT}, headers=bearer(s.other))
    assert resp.status == 429
    resp = await client.post(f"/v1/sessions/{uuid.uuid4()}/participants", json={"role": "courier",
                             "number": CANDIDATES[0]}, headers=bearer(s.dispatch))
    assert resp.status == 201
    # The token's own budget was not touched by the changes: it still opens.
    assert (await client.post("/v1/sessions", json=reopen(CLIENT), headers=bearer(s.dispatch))).status == 200


# --- requests without a valid token, per address --------------------------------------------------


async def test_tokenless_requests_beyond_the_address_rate_get_429_without_an_audit_row_or_a_lookup(stack):
    s, client = stack
    call = f"/v1/calls/{uuid.uuid4()}/recording"
    made_up = "mbt_" + "a" * 12 + "_" + "b" * 43
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logged:
        statuses = [(await client.get(call)).status for _ in range(100)]
        resp = await client.get(call, headers=bearer(made_up))
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["message"] == (
            "too many requests without a valid token from this address; try again in 1 s")
    assert statuses == [401] * 40 + [429] * 60
    assert len(s.audit.audit_rows) == 40  # the ones answered 401; none of the 429s
    assert s.tokens.lookups == 0  # the made-up token was refused before the database was asked
    # One log line for the address's window, none per request held back.
    assert [e["requests_held"] for e in logged if e["event"] == "api.address_limited"] == [1]
    assert sum(e["event"] == "api.request" for e in logged) == 40
    # A second later: 20 more.
    s.clock.now += 1
    assert [(await client.get(call)).status for _ in range(21)] == [401] * 20 + [429]
    # The next window's first one held back logs how many were held back since the last line.
    s.clock.now += 60
    with capture_logs() as logged:
        [await client.get(call, headers=bearer(made_up)) for _ in range(41)]
    assert [e["requests_held"] for e in logged if e["event"] == "api.address_limited"] == [62]


async def test_valid_tokens_go_on_while_their_address_floods_with_bad_ones(stack):
    s, client = stack
    assert (await client.get("/v1/sessions/" + str(s.sessions.session.id), headers=bearer(s.dispatch))).status == 200
    for _ in range(50):
        await client.get("/v1/sessions", headers=bearer("mbt_" + "c" * 12 + "_" + "d" * 43))
    lookups = s.tokens.lookups
    assert lookups == 1 + 40  # the good one once, then the bad ones up to the burst
    session = f"/v1/sessions/{s.sessions.session.id}"
    assert (await client.get(session, headers=bearer(s.dispatch))).status == 200  # seen valid: looked up
    assert (await client.get(session, headers=bearer(TOKEN))).status == 200  # the settings' token: no lookup
    # A named token this process has not seen valid waits with its address (it would cost a lookup).
    assert (await client.get(session, headers=bearer(s.other))).status == 429
    assert s.tokens.lookups == lookups + 1
