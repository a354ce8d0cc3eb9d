"""Named API tokens with scopes, and the rate limit per token, at the HTTP layer: aiohttp's
test client against the real routes and middlewares, with fake services and the tokens'
table in memory. (Adding and revoking through maskbridge-admin, against Postgres and the
running bridge: tests/live/test_api_tokens.py.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from bridge.api.http import make_app
from bridge.api.ratelimit import RateLimiter
from bridge.errors import InvalidInput
from bridge.requester import request_token
from bridge.requests import OpenSession
from bridge.store.sessions import SessionRow
from bridge.tokens import ENV_SCOPES, SCOPES, TOUCH_RETRY, parse_scopes
from test_http_handlers import COURIER, CLIENT, TOKEN, FakeRecordings, Services
from token_fake import FakeTokenRepo, tokens_with

OPEN = {"order_id": "o-1", "courier_number": COURIER, "client_number": CLIENT}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self) -> None:
        self.services = Services()
        self.repo = FakeTokenRepo()
        self.clock = Clock()
        self.limiter = RateLimiter(rate=1, burst=3, clock=self.clock)
        self.opened_by: list[str | None] = []
        opened = self.services.sessions.open

        async def open_noting_the_token(request: OpenSession) -> tuple[SessionRow, bool]:
            self.opened_by.append(request_token())  # what the audits the service writes would name
            return await opened(request)

        self.services.sessions.open = open_noting_the_token  # type: ignore[method-assign]

    def bearer(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {SECRETS[name]}"}


SECRETS: dict[str, str] = {}


@pytest.fixture
async def harness() -> AsyncIterator[tuple[Harness, TestClient[web.Request, web.Application]]]:
    h = Harness()
    SECRETS.clear()
    SECRETS["env"] = TOKEN
    SECRETS["dispatch"] = h.repo.add("dispatch", ["sessions:read", "sessions:write"])
    SECRETS["reports"] = h.repo.add("reports", ["sessions:read", "pools:read"])
    SECRETS["old"] = h.repo.add("old", list(SCOPES), revoked=True)
    SECRETS["late"] = h.repo.add("late", list(SCOPES), expired=True)
    SECRETS["fast"] = h.repo.add("fast", ["sessions:read"], rate=10)

    async def health() -> dict[str, Any]:
        return {"ari": True, "database": True}

    app = make_app(h.services.sessions, h.services.pools, h.services.blocklist,  # type: ignore[arg-type]
                   tokens_with(h.repo, TOKEN), health, FakeRecordings(), limiter=h.limiter)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        yield h, client


# --- scopes --------------------------------------------------------------------------------


async def test_a_token_reaches_the_operations_of_its_scopes_and_gets_403_elsewhere(harness):
    h, client = harness
    resp = await client.post("/v1/sessions", json=OPEN, headers=h.bearer("dispatch"))
    assert resp.status == 201
    resp = await client.post("/v1/sessions", json=OPEN, headers=h.bearer("reports"))
    assert resp.status == 403
    assert await resp.json() == {"error": {
        "code": "insufficient_scope", "message": "the token 'reports' lacks the scope sessions:write",
        "details": {"required_scope": "sessions:write"},
    }}
    assert (await client.get("/v1/pool-numbers", headers=h.bearer("reports"))).status == 200
    assert (await client.get("/v1/pool-numbers", headers=h.bearer("dispatch"))).status == 403
    assert (await client.post("/v1/blocklist", json={"number": COURIER}, headers=h.bearer("dispatch"))).status == 403
    assert h.services.blocklist.added == []
    # Only the allowed open reached the service, and it ran under the token's name.
    assert h.opened_by == ["dispatch"]
    assert request_token() is None  # (nothing of the request is left in this context)


async def test_the_env_token_keeps_every_scope_but_the_recordings(harness):
    h, client = harness
    assert (await client.post("/v1/sessions", json=OPEN, headers=h.bearer("env"))).status == 201
    assert (await client.post("/v1/blocklist", json={"number": COURIER}, headers=h.bearer("env"))).status == 201
    assert (await client.get("/v1/pool-numbers", headers=h.bearer("env"))).status == 200
    assert h.opened_by == ["env"]
    assert ENV_SCOPES == set(SCOPES) - {"recordings:read", "audit:read"}


@pytest.mark.parametrize(("name", "message"), [("old", "the token was revoked"), ("late", "the token expired")])
async def test_a_revoked_or_expired_token_is_401_and_says_so(harness, name, message):
    h, client = harness
    resp = await client.get("/v1/sessions", headers=h.bearer(name))
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="maskbridge"'
    assert await resp.json() == {"error": {"code": "unauthorized", "message": message}}


async def test_two_authorization_headers_are_refused_whichever_comes_first(harness):
    """Which of two would count is a guess a proxy in front may make the other way (it lets
    a read token through, the bridge takes the write one): neither counts."""
    h, client = harness
    for first, second in (("reports", "dispatch"), ("dispatch", "reports"), ("dispatch", "dispatch")):
        headers = [("Authorization", h.bearer(first)["Authorization"]),
                   ("Authorization", h.bearer(second)["Authorization"])]
        resp = await client.post("/v1/sessions", json=OPEN, headers=headers)
        assert resp.status == 401, (first, second)
        assert await resp.json() == {"error": {"code": "unauthorized",
                                               "message": "give one Authorization header, not several"}}
    assert h.opened_by == []


async def test_a_secret_of_the_right_shape_with_a_wrong_rest_or_a_made_up_key_is_just_a_wrong_token(harness):
    h, client = harness
    real = SECRETS["dispatch"]
    made_up_key = "mbt_" + "a" * 12 + real[16:]
    for wrong in (real[:-1] + ("A" if real[-1] != "A" else "B"), made_up_key, real + "x", "mbt_", real.upper()):
        resp = await client.get("/v1/sessions", headers={"Authorization": f"Bearer {wrong}"})
        assert resp.status == 401, wrong
        assert (await resp.json())["error"]["message"] == "missing or wrong bearer token"


async def test_a_token_is_noted_as_used_once_a_minute_at_most(harness):
    h, client = harness
    for _ in range(3):
        assert (await client.get("/v1/sessions", headers=h.bearer("reports"))).status == 200
    assert h.repo.touched == ["reports"]


# --- the rate limit ----------------------------------------------------------------------------


async def test_over_its_rate_a_token_gets_429_with_retry_after_and_others_are_not_slowed(harness):
    h, client = harness
    for _ in range(3):  # the burst
        assert (await client.get("/v1/sessions", headers=h.bearer("reports"))).status == 200
    resp = await client.get("/v1/sessions", headers=h.bearer("reports"))
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    assert await resp.json() == {"error": {
        "code": "rate_limited", "message": "too many requests with this token; try again in 1 s",
        "details": {"retry_after_seconds": 1},
    }}
    # Another token has its own bucket.
    assert (await client.get("/v1/sessions", headers=h.bearer("dispatch"))).status == 200
    # A second later, one more request is let through.
    h.clock.now += 1.0
    assert (await client.get("/v1/sessions", headers=h.bearer("reports"))).status == 200
    assert (await client.get("/v1/sessions", headers=h.bearer("reports"))).status == 429


async def test_a_token_with_a_rate_of_its_own_refills_at_that_rate(harness):
    h, client = harness
    for _ in range(3):
        assert (await client.get("/v1/sessions", headers=h.bearer("fast"))).status == 200
    assert (await client.get("/v1/sessions", headers=h.bearer("fast"))).status == 429
    h.clock.now += 0.1  # 10 a second: one more
    assert (await client.get("/v1/sessions", headers=h.bearer("fast"))).status == 200


async def test_a_request_refused_as_unauthorized_or_forbidden_does_not_reach_the_rate_limit_of_others(harness):
    h, client = harness
    for _ in range(10):
        assert (await client.get("/v1/sessions")).status == 401
    assert (await client.get("/v1/sessions", headers=h.bearer("reports"))).status == 200


def test_the_bucket_waits_whole_seconds_and_no_rate_is_no_limit():
    clock = Clock()
    slow = RateLimiter(rate=0.25, burst=1, clock=clock)
    assert slow.take("a") == 0
    assert slow.take("a") == 4
    clock.now += 3.5
    assert slow.take("a") == 1
    clock.now += 0.5
    assert slow.take("a") == 0
    unlimited = RateLimiter(rate=0, burst=1, clock=clock)
    assert all(unlimited.take("a") == 0 for _ in range(1000))


# --- logs ----------------------------------------------------------------------------------------


async def test_every_request_is_logged_with_its_token_name_and_never_its_secret(harness):
    h, client = harness
    h.services.sessions.rows.clear()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logged:
        await client.post("/v1/sessions", json=OPEN, headers=h.bearer("dispatch"))
        await client.get("/v1/pool-numbers", headers=h.bearer("dispatch"))
        await client.get("/v1/sessions", headers={"Authorization": "Bearer not-a-token-at-all"})
        await client.get(f"/v1/sessions/{uuid.UUID(int=1)}/events", headers=h.bearer("reports"))  # fails: logged
    requests = [(e["route"], e["status"], e.get("token")) for e in logged if e["event"] == "api.request"]
    assert requests == [("/v1/sessions", 201, "dispatch"), ("/v1/pool-numbers", 403, "dispatch"),
                        ("/v1/sessions", 401, None), ("/v1/sessions/{session_id}/events", 500, "reports")]
    [failure] = [e for e in logged if e["event"] == "api.failed"]
    assert failure["token"] == "reports"
    text = json.dumps(logged, default=str)
    assert not any(secret in text for secret in SECRETS.values())
    assert "not-a-token-at-all" not in text


# --- scopes as maskbridge-admin takes them ---------------------------------------------------------


def test_scopes_are_taken_repeated_or_comma_separated_and_all_is_every_one():
    assert parse_scopes(["sessions:write", "sessions:read,pools:read"]) == ["sessions:read", "sessions:write",
                                                                            "pools:read"]
    assert parse_scopes(["all"]) == list(SCOPES)
    with pytest.raises(InvalidInput, match="unknown scope sessions:admin"):
        parse_scopes(["sessions:admin"])
    with pytest.raises(InvalidInput, match="at least one"):
        parse_scopes([" , "])


async def test_a_route_whose_operation_declares_no_scope_is_refused_to_every_token():
    async def health() -> dict[str, Any]:
        return {"ari": True, "database": True}

    async def undeclared(request: web.Request) -> web.Response:
        return web.json_response({"reached": True})

    services = Services()
    app = make_app(services.sessions, services.pools, services.blocklist,  # type: ignore[arg-type]
                   tokens_with(FakeTokenRepo(), TOKEN), health, FakeRecordings())  # type: ignore[arg-type]
    app.router.add_route("GET", "/v1/undeclared", undeclared)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/v1/undeclared", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "insufficient_scope"


async def test_a_last_use_that_cannot_be_written_leaves_the_request_answered_and_is_tried_again_later():
    """The database refusing the write (read-only, a lock waited for too long, gone): the
    request was answered already; the write is tried again by a request TOUCH_RETRY seconds
    later, not by every request meanwhile."""
    repo = FakeTokenRepo()
    secret = repo.add("dispatch", ["sessions:read"])
    tries: list[list[str]] = []

    async def refused(names: list[str]) -> set[str]:
        tries.append(names)
        raise RuntimeError("cannot execute UPDATE in a read-only transaction")

    repo.touch = refused  # type: ignore[method-assign]
    tokens = tokens_with(repo)
    for _ in range(3):
        assert (await tokens.caller(f"Bearer {secret}")).kind == "token"
        await tokens.touches_written()
    assert tries == [["dispatch"]]
    tokens._touched["dispatch"] -= TOUCH_RETRY  # (as if that long went by)
    assert (await tokens.caller(f"Bearer {secret}")).kind == "token"
    await tokens.touches_written()
    assert tries == [["dispatch"], ["dispatch"]]
