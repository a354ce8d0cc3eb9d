"""The HTTP layer alone: aiohttp's test client against the real routes and middlewares, with
fake services behind them. What is checked is what the HTTP layer owns: authentication,
error answers, body limits and parsing, pagination cursors, status codes and masking. The
services themselves are tested against Postgres in tests/live."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from bridge.api.http import make_app
from bridge.errors import OrderHasOpenSession, PoolExhausted, SessionNotFound
from bridge.limits import IMPORT_BODY_LIMIT, JSON_BODY_LIMIT, MAX_PAGE
from bridge.requests import OpenSession
from bridge.store.blocklist import BlockedRow
from bridge.store.pools import PoolNumberRow
from bridge.store.sessions import ParticipantRow, SessionRow
from bridge.terms import Terms
from bridge.tokens import Tokens

TOKEN = "unit-test-token-unit-test-token-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
COURIER, CLIENT = "+79161234567", "+79161234568"


def session_row(n: int = 0, **changes: Any) -> SessionRow:
    sid = uuid.UUID(int=n + 1)
    participants = tuple(
        ParticipantRow(uuid.UUID(int=100 + 2 * n + i), role, f"sealed:{real}".encode(), "+74950000001",
                       NOW, None, None)
        for i, (role, real) in enumerate((("courier", COURIER), ("client", CLIENT)))
    )
    row = SessionRow(
        id=sid, order_id=f"o-{n}", pool_number="+74950000001", status="open", region=None,
        created_at=NOW - timedelta(minutes=n), expires_at=NOW + timedelta(days=1), idle_timeout_seconds=None,
        last_activity_at=NOW, grace_seconds=0, grace_until=None, closed_at=None, end_reason=None, mode="direct",
        order_code=None, terms=Terms(), participants=participants,
    )
    return SessionRow(**{**row.__dict__, **changes})


class FakeStore:
    def __init__(self) -> None:
        self.calls_asked: list[tuple[Any, ...]] = []

    async def session_calls(self, session_ids: list[uuid.UUID], after: Any, limit: int) -> list[dict[str, Any]]:
        self.calls_asked.append((session_ids, after, limit))
        return [{"id": uuid.UUID(int=900 + i), "started_at": NOW - timedelta(seconds=i)} for i in range(limit)]

    async def order_calls(self, order_id: str, after: Any, limit: int) -> list[dict[str, Any]]:
        self.calls_asked.append((order_id, after, limit))
        return []


class FakeSessions:
    """Answers from a dict of rows; records what the handlers asked."""

    def __init__(self) -> None:
        self.rows = {r.id: r for r in (session_row(i) for i in range(3))}
        self.opened: list[OpenSession] = []
        self.found: list[dict[str, Any]] = []
        self.closed: list[tuple[uuid.UUID, int | None]] = []
        self.open_answer: Exception | tuple[SessionRow, bool] = (session_row(0), True)
        self.store = FakeStore()

    def reveal(self, participant: ParticipantRow) -> str | None:
        sealed = participant.number_enc
        return sealed.decode().removeprefix("sealed:") if sealed else None

    async def open(self, request: OpenSession) -> tuple[SessionRow, bool]:
        self.opened.append(request)
        if isinstance(self.open_answer, Exception):
            raise self.open_answer
        return self.open_answer

    async def get(self, session_id: uuid.UUID) -> SessionRow:
        if session_id not in self.rows:
            raise SessionNotFound()
        return self.rows[session_id]

    async def find(self, **query: Any) -> list[SessionRow]:
        self.found.append(query)
        rows = sorted(self.rows.values(), key=lambda r: (r.created_at, r.id), reverse=True)
        if query["after"] is not None:
            rows = [r for r in rows if (r.created_at, r.id) < query["after"]]
        return rows[: query["limit"]]

    async def close(self, session_id: uuid.UUID, grace: int | None) -> SessionRow:
        self.closed.append((session_id, grace))
        return session_row(0, status="closed", closed_at=NOW, end_reason="closed")

    async def events(self, session_id: uuid.UUID) -> list[dict[str, Any]]:
        raise RuntimeError("the database went away at 10.0.0.5 with +79161234567 in the message")


class FakePools:
    def __init__(self) -> None:
        self.csv: list[str] = []
        self.find_asked: list[dict[str, Any]] = []

    async def import_csv(self, text: str) -> dict[str, int]:
        self.csv.append(text)
        return {"added": 1, "updated": 0, "reactivated": 0, "unchanged": 0}

    async def import_numbers(self, entries: list[Any]) -> dict[str, int]:
        return {"added": 0, "updated": 0, "reactivated": 0, "unchanged": len(entries)}

    async def find(self, **query: Any) -> list[PoolNumberRow]:
        self.find_asked.append(query)
        return [PoolNumberRow(f"+7495000000{i}", None, "active", NOW, NOW, None, None, "direct", 0, 0)
                for i in range(query["limit"])]


class FakeBlocklist:
    def __init__(self) -> None:
        self.added: list[tuple[str, str | None, int | None]] = []

    def number_of(self, entry: BlockedRow) -> str:
        return entry.number_enc.decode()

    async def add(self, number: str, reason: str | None, ttl_seconds: int | None) -> tuple[BlockedRow, bool]:
        self.added.append((number, reason, ttl_seconds))
        expires = NOW + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        return BlockedRow(uuid.UUID(int=7), b"+79161234567", reason, NOW, expires), True


class FakeRecordings:
    pass


class Services:
    def __init__(self) -> None:
        self.sessions = FakeSessions()
        self.pools = FakePools()
        self.blocklist = FakeBlocklist()
        self.health = {"ari": True, "database": True}


@pytest.fixture
def services() -> Services:
    return Services()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async def health() -> dict[str, Any]:
        return services.health

    app = make_app(services.sessions, services.pools, services.blocklist, Tokens(None, TOKEN),  # type: ignore[arg-type]
                   health, FakeRecordings())  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def answer(resp: Any) -> tuple[int, Any]:
    return resp.status, await resp.json()


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer \udcff"])
async def test_no_token_or_a_wrong_one_is_refused_before_any_service(client, services, header):
    headers = {} if header is None else {"Authorization": header.encode("utf-8", "surrogateescape").decode("latin-1")}
    resp = await client.post("/v1/sessions", json={"order_id": "o"}, headers=headers)
    status, body = await answer(resp)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="maskbridge"'
    assert services.sessions.opened == []


async def test_health_and_the_document_need_no_token(client, services):
    assert (await client.get("/healthz")).status == 200
    services.health["ari"] = False
    status, body = await answer(await client.get("/healthz"))
    assert status == 503 and body == {"ari": False, "database": True}
    status, doc = await answer(await client.get("/v1/openapi.json"))
    assert status == 200 and "/v1/sessions" in doc["paths"]


# --- error answers -----------------------------------------------------------------------------


async def test_a_service_error_is_answered_with_its_status_code_and_details(client, services):
    services.sessions.open_answer = OrderHasOpenSession(session_id=str(uuid.UUID(int=1)))
    body = {"order_id": "o-1", "courier_number": COURIER, "client_number": CLIENT}
    status, answer_body = await answer(await client.post("/v1/sessions", json=body, headers=AUTH))
    assert status == 409
    assert answer_body == {"error": {"code": "order_has_open_session", "message": OrderHasOpenSession.message,
                                     "details": {"session_id": str(uuid.UUID(int=1))}}}
    services.sessions.open_answer = PoolExhausted()
    status, answer_body = await answer(await client.post("/v1/sessions", json=body, headers=AUTH))
    assert status == 409 and answer_body == {"error": {"code": "pool_exhausted", "message": PoolExhausted.message}}


async def test_an_unexpected_failure_is_a_500_that_says_nothing_of_it_and_is_logged(client):
    with capture_logs() as logged:
        resp = await client.get(f"/v1/sessions/{uuid.UUID(int=1)}/events", headers=AUTH)
    status, body = await answer(resp)
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert "10.0.0.5" not in json.dumps(body) and "9161234567" not in json.dumps(body)
    [failure] = [e for e in logged if e["event"] == "api.failed"]
    assert failure["log_level"] == "error" and failure["path"].endswith("/events") and failure["exc_info"]


async def test_unknown_routes_and_methods_answer_in_the_error_shape(client):
    status, body = await answer(await client.get("/v1/nothing-here", headers=AUTH))
    assert status == 404 and body["error"]["code"] == "not_found"
    resp = await client.delete("/v1/sessions", headers=AUTH)
    status, body = await answer(resp)
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert set(resp.headers["Allow"].split(",")) == {"GET", "POST"}


async def test_a_session_id_that_is_not_a_uuid_is_not_found(client):
    status, body = await answer(await client.get("/v1/sessions/not-a-uuid", headers=AUTH))
    assert status == 404 and body["error"]["code"] == "session_not_found"


# --- bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'"text"', 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b"[" * 100_000, 413, "body_too_large"),
        (b"[" * 20_000 + b"]" * 20_000, 400, "invalid_json"),  # deeper than the parser goes
        (b"{}", 422, "invalid_input"),
        (b'{"order_id": "o", "courier_number": "+79161234567", "client_number": "+79161234568", "x": 1}',
         422, "invalid_input"),
    ],
)
async def test_a_bad_body_gets_its_error_and_never_reaches_the_service(client, services, raw, status, code):
    resp = await client.post("/v1/sessions", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    got, body = await answer(resp)
    assert (got, body["error"]["code"]) == (status, code)
    assert services.sessions.opened == []


async def test_an_unknown_field_is_named_and_a_key_that_is_not_a_name_is_not_repeated(client):
    base = {"order_id": "o", "courier_number": COURIER, "client_number": CLIENT}
    _, body = await answer(await client.post("/v1/sessions", json={**base, "surprise": 1}, headers=AUTH))
    assert body["error"]["details"] == {"field": "surprise"}
    _, body = await answer(await client.post("/v1/sessions", json={**base, "+79161234569": 1}, headers=AUTH))
    assert body["error"]["code"] == "invalid_input" and "details" not in body["error"]
    assert "9161234569" not in json.dumps(body)


async def test_the_body_limit_is_checked_from_the_declared_length_and_from_what_arrives(client, services):
    declared = await client.post("/v1/sessions", data=b"{" + b" " * JSON_BODY_LIMIT + b"}",
                                 headers={**AUTH, "Content-Type": "application/json"})
    assert declared.status == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(JSON_BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    streamed = await client.post("/v1/sessions", data=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    status, body = await answer(streamed)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert services.sessions.opened == []


async def test_a_good_body_reaches_the_service_as_its_model(client, services):
    body = {"order_id": "o-9", "courier_number": "8 (916) 123-45-67", "client_number": CLIENT, "ttl_seconds": 600.0}
    status, answer_body = await answer(await client.post("/v1/sessions", json=body, headers=AUTH))
    assert status == 201
    [request] = services.sessions.opened
    assert isinstance(request, OpenSession) and request.ttl_seconds == 600 and type(request.ttl_seconds) is int
    services.sessions.open_answer = (session_row(0), False)
    assert (await client.post("/v1/sessions", json=body, headers=AUTH)).status == 200


async def test_real_numbers_are_answered_masked(client):
    status, body = await answer(await client.get(f"/v1/sessions/{uuid.UUID(int=1)}", headers=AUTH))
    assert status == 200
    assert body["participants"]["courier"]["number"] == "+***67"
    assert body["participants"]["client"]["number"] == "+***68"
    assert COURIER not in json.dumps(body) and CLIENT not in json.dumps(body)


async def test_a_block_takes_a_ttl_and_answers_its_expiry(client, services):
    status, body = await answer(await client.post(
        "/v1/blocklist", json={"number": "+79161234567", "ttl_seconds": 3600}, headers=AUTH))
    assert status == 201 and body["number"] == "+***67"
    assert datetime.fromisoformat(body["expires_at"]) == NOW + timedelta(hours=1)
    status, body = await answer(await client.post("/v1/blocklist", json={"number": "+79161234567"}, headers=AUTH))
    assert status == 201 and body["expires_at"] is None, "no ttl: until unblocked"
    for bad in (0, -5, "60", 1.5, True):
        status, body = await answer(await client.post(
            "/v1/blocklist", json={"number": "+79161234567", "ttl_seconds": bad}, headers=AUTH))
        assert (status, body["error"]["details"]["field"]) == (422, "ttl_seconds"), bad
    assert [ttl for _n, _r, ttl in services.blocklist.added] == [3600, None]


async def test_an_empty_close_body_closes_with_the_grace_set_at_open(client, services):
    sid = uuid.UUID(int=1)
    assert (await client.post(f"/v1/sessions/{sid}/close", headers=AUTH)).status == 200
    assert (await client.post(f"/v1/sessions/{sid}/close", json={"grace_seconds": 30}, headers=AUTH)).status == 200
    assert services.sessions.closed == [(sid, None), (sid, 30)]


async def test_csv_import_reads_utf8_with_or_without_a_bom_and_refuses_anything_else(client, services):
    headers = {**AUTH, "Content-Type": "text/csv"}
    assert (await client.post("/v1/pool-numbers", data="\ufeff+74950000001\n".encode(), headers=headers)).status == 201
    assert services.pools.csv == ["+74950000001\n"]
    status, body = await answer(await client.post("/v1/pool-numbers", data=b"\xff+7495\n", headers=headers))
    assert status == 422 and body["error"]["code"] == "invalid_input"
    too_big = b"+74950000001\n" * (IMPORT_BODY_LIMIT // 13 + 1)
    assert (await client.post("/v1/pool-numbers", data=too_big, headers=headers)).status == 413


# --- pagination --------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", str(MAX_PAGE + 1), "abc", "-1", "1.5", "00000001", ""])
async def test_a_limit_out_of_range_is_refused(client, services, limit):
    status, body = await answer(await client.get(f"/v1/sessions?limit={limit}", headers=AUTH))
    assert status == 422 and body["error"]["details"] == {"field": "limit"}
    assert services.sessions.found == []


async def test_a_full_page_gives_a_cursor_that_continues_after_its_last_item(client, services):
    status, first = await answer(await client.get("/v1/sessions?limit=2", headers=AUTH))
    assert status == 200 and len(first["items"]) == 2 and first["next_cursor"]
    status, second = await answer(await client.get(f"/v1/sessions?limit=2&cursor={first['next_cursor']}",
                                                   headers=AUTH))
    assert status == 200 and second["next_cursor"] is None
    seen = [s["id"] for s in first["items"] + second["items"]]
    assert sorted(seen) == sorted(str(r.id) for r in services.sessions.rows.values())
    last = first["items"][-1]
    assert services.sessions.found[1]["after"] == (datetime.fromisoformat(last["created_at"]), uuid.UUID(last["id"]))


@pytest.mark.parametrize("cursor", [
    "!!!", "bm90IGpzb24", "WzFd",  # not base64; not JSON; [1]
    "WyIyMDI2LTExLTI5VDEyOjAwOjAwIiwgIjAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMSJd",  # naive time
    "WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwgIngiXQ",  # year 1, not a uuid
])
async def test_a_cursor_the_api_did_not_give_out_is_refused(client, services, cursor):
    status, body = await answer(await client.get(f"/v1/sessions?cursor={cursor}", headers=AUTH))
    assert status == 422 and body["error"]["details"] == {"field": "cursor"}
    assert services.sessions.found == []


async def test_pool_number_pages_continue_after_a_number_and_take_only_a_number_as_cursor(client, services):
    status, page = await answer(await client.get("/v1/pool-numbers?limit=3", headers=AUTH))
    assert status == 200 and page["next_cursor"]
    assert (await client.get(f"/v1/pool-numbers?cursor={page['next_cursor']}", headers=AUTH)).status == 200
    assert services.pools.find_asked[1]["after"] == page["items"][-1]["number"]
    status, _ = await answer(await client.get("/v1/pool-numbers?cursor=WyJ4Il0", headers=AUTH))  # ["x"]
    assert status == 422


async def test_session_calls_are_paged_by_start_time_and_id(client, services):
    sid = uuid.UUID(int=1)
    status, page = await answer(await client.get(f"/v1/sessions/{sid}/calls?limit=4", headers=AUTH))
    assert status == 200 and page["session_id"] == str(sid) and len(page["items"]) == 4 and page["next_cursor"]
    await client.get(f"/v1/sessions/{sid}/calls?limit=4&cursor={page['next_cursor']}", headers=AUTH)
    last = page["items"][-1]
    assert services.sessions.store.calls_asked[1] == (
        [sid], (datetime.fromisoformat(last["started_at"]), uuid.UUID(last["id"])), 4)


async def test_order_calls_need_a_valid_order_id(client):
    for query, status in (("", 422), ("?order_id=has%20space", 422), ("?order_id=o-1", 200)):
        assert (await client.get(f"/v1/calls{query}", headers=AUTH)).status == status


async def test_a_body_that_does_not_arrive_in_time_is_a_408(client, services, monkeypatch):
    from bridge.api import http

    monkeypatch.setattr(http, "BODY_TIMEOUT", 0.3)
    stalled = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b'{"order_id": '
        await stalled.wait()  # ... and the rest never comes while the test runs
        yield b"}"

    resp = await client.post("/v1/sessions", data=slow(), headers={**AUTH, "Content-Type": "application/json"})
    status, body = await answer(resp)
    stalled.set()
    assert (status, body["error"]["code"]) == (408, "request_timeout")
    assert services.sessions.opened == []


@pytest.mark.parametrize("lost", [
    "ConnectionDoesNotExistError: connection was closed in the middle",
    # A restart of Postgres: the statements it ends, the connections it refuses meanwhile
    # (these answered 500 before: adversary, issue 14).
    "AdminShutdownError: terminating connection due to administrator command",
    "CannotConnectNowError: the database system is shutting down",
    "CannotConnectNowError: the database system is starting up",
    "CrashShutdownError: terminating connection because of crash of another server process",
    # asyncpg's connection left mid-operation by a backend killed meanwhile (adversary, issue 14)
    "InternalClientError: cannot switch to state 12; another operation (2) is in progress",
    # The server gave up on the statement: a statement_timeout or lock_timeout on the role, an
    # operator's pg_cancel_backend (adversary, issue 14: a call's end was not written again)
    "QueryCanceledError: canceling statement due to statement timeout",
    "QueryCanceledError: canceling statement due to user request",
    "LockNotAvailableError: canceling statement due to lock timeout",
])
async def test_a_lost_database_connection_is_a_503_to_retry_not_a_500(client, services, lost):
    import asyncpg

    kind, message = lost.split(": ", 1)
    services.sessions.open_answer = getattr(asyncpg, kind)(message)
    body = {"order_id": "o-1", "courier_number": COURIER, "client_number": CLIENT}
    resp = await client.post("/v1/sessions", json=body, headers=AUTH)
    status, answer_body = await answer(resp)
    assert (status, answer_body["error"]["code"]) == (503, "database_unavailable")
    assert resp.headers["Retry-After"] == "1"
