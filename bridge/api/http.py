"""REST under /v1 for the order system and engineers.

Bearer-token auth, each operation needing one scope of the token (bridge.tokens), and a rate
limit per token; JSON errors {"error": {"code", "message", "details"?}} with a stable
code; lists paginated by an opaque cursor ({"items": [...], "next_cursor": ...}); real
numbers only ever masked. The OpenAPI document is served at /v1/openapi.json.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from bridge import metrics
from bridge.api.errors import error_body, status_code
from bridge.api.openapi import document
from bridge.api.ratelimit import RateLimiter
from bridge.api.server import UNMET_EXPECTATION, ConnectionGuard
from bridge.blocklist import Blocklist
from bridge.errors import (
    BlockNotFound, DatabaseUnavailable, ExpectationFailed, InsufficientScope, InternalError, InvalidInput, InvalidJson,
    RateLimited, RequestTimeout, ServiceError, SessionNotFound, TooLarge, Unauthorized, UnreadableBody,
)
from bridge.limits import (
    DEFAULT_PAGE, IMPORT_BODY_LIMIT, JSON_BODY_LIMIT, MAX_AUDIT_CURSOR, MAX_PAGE, ORDER_ID, REGION_FORM,
)
from bridge.phone import mask
from bridge.pools import Pools
from bridge.recordings import Recordings, render_recording
from bridge.requester import REQUEST_TOKEN
from bridge.requests import (
    AddParticipant, BlockNumber, CloseSession, ExtendSession, ImportPoolNumbers, OpenSession, UpdatePoolNumber, parse,
)
from bridge.sessions import Sessions
from bridge.store.blocklist import BlockedRow
from bridge.store.errors import database_unreachable
from bridge.store.pools import PoolNumberRow
from bridge.store.sessions import ParticipantRow, SessionRow
from bridge.tokens import NO_TOKEN, TWO_TOKENS, Caller, Tokens

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HealthCheck = Callable[[], Awaitable[dict[str, Any]]]
SESSIONS = web.AppKey("sessions", Sessions)
POOLS = web.AppKey("pools", Pools)
BLOCKLIST = web.AppKey("blocklist", Blocklist)
RECORDINGS = web.AppKey("recordings", Recordings)
HEALTH: web.AppKey[HealthCheck] = web.AppKey("health")
GUARD = web.AppKey("guard", ConnectionGuard)
CALLER = web.RequestKey("caller", Caller)  # who the request is from
REFUSAL: web.RequestKey[ServiceError | None] = web.RequestKey("refusal")  # on recording routes: what its token gets
BODY: web.RequestKey[dict[str, Any]] = web.RequestKey("body")  # the JSON body, once parsed (see _body)
BODY_TIMEOUT = 30.0  # seconds a request's body may take to arrive (a 4 MB import, slowly)

PUBLIC_PATHS = ("/healthz", "/v1/openapi.json", "/metrics")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(type(value).__name__)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=_default))


def _error(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    return _json(error_body(code, message, details), status)


# --- rendering ---------------------------------------------------------------------------


def render_participant(sessions: Sessions, p: ParticipantRow) -> dict[str, Any]:
    real = sessions.reveal(p)
    return {
        "id": p.id,
        "role": p.role,
        "number": mask(real) if real else None,  # None once purged by the retention job
        "proxy_number": p.pool_number,  # what this participant dials, and sees the other side as
        "joined_at": p.joined_at,
        "left_at": p.left_at,
        "cooling_until": p.held_until,
    }


def render_session(sessions: Sessions, s: SessionRow) -> dict[str, Any]:
    """The order system gets pool numbers in full; real numbers only masked (it gave them
    to us, and never needs them back)."""
    latest: dict[str, ParticipantRow] = {}
    for p in s.participants:  # in joining order: the last one of each role wins
        latest[p.role] = p
    return {
        "id": s.id,
        "order_id": s.order_id,
        "status": s.status,
        "pool_number": s.pool_number,
        "region": s.region,
        "participants": {role: render_participant(sessions, p) for role, p in latest.items()},
        "created_at": s.created_at,
        "expires_at": s.expires_at,
        "idle_timeout_seconds": s.idle_timeout_seconds,
        "last_activity_at": s.last_activity_at,
        "grace_seconds": s.grace_seconds,
        "grace_until": s.grace_until,
        "closed_at": s.closed_at,
        "end_reason": s.end_reason,
        # The session's terms as stored; null: the bridge's default applies (bridge.terms).
        **s.terms.to_api(),
        "mode": s.mode,
        # The code callers of the shared number key in (mode order_code); the order system
        # tells its people. Never logged.
        "order_code": s.order_code,
    }


def render_pool_number(row: PoolNumberRow) -> dict[str, Any]:
    return {
        "number": row.number,
        "region": row.region,
        "language": row.language,
        "mode": row.mode,
        "state": row.state,
        "live_sessions": row.live_sessions,
        "cooling_pairs": row.cooling_pairs,
        "cooling_until": row.cooling_until,
        "state_changed_at": row.state_changed_at,
        "created_at": row.created_at,
    }


def render_block(blocklist: Blocklist, entry: BlockedRow) -> dict[str, Any]:
    number = blocklist.number_of(entry)
    return {"id": entry.id, "number": mask(number) if number else None, "reason": entry.reason,
            "created_at": entry.created_at, "expires_at": entry.expires_at}


# --- middlewares ---------------------------------------------------------------------------


def _route(request: web.Request) -> str | None:
    """The template of the request's route (never the path: it can hold a pool number)."""
    resource = getattr(request.match_info.route, "resource", None)
    return resource.canonical if resource is not None else None


def _recording_route(request: web.Request) -> bool:
    """Whether the request is for a recording route (whose service audits every attempt,
    refused ones too)."""
    return _route(request) in RECORDING_PATHS


def route_scopes() -> dict[tuple[str, str], str]:
    """(method, route) -> the scope its operation needs: from the OpenAPI document, where each
    operation declares it as its security requirement (so what is enforced is what is
    documented)."""
    scopes: dict[tuple[str, str], str] = {}
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            for requirement in operation.get("security", []) if isinstance(operation, dict) else []:
                for needed in requirement.values():
                    scopes[(method.upper(), path)] = needed[0]
    return scopes


UNDECLARED = "(undeclared)"  # the scope of a route whose operation declares none: no token has it
# The operations whose refusals can confirm a guessed number (an open naming other people, a
# courier who is the client): each refusal costs the token one of its conflict budget, and
# with none left they are refused (429) before they run, right guesses included.
GUESSABLE = frozenset({("POST", "/v1/sessions"), ("POST", "/v1/sessions/{session_id}/participants")})
HELD_BACK = web.RequestKey("held_back", bool)  # refused by its address's bucket: logged per window only
HELD_BACK_WINDOW = 60.0  # seconds between two log lines of one address's held-back requests


def _refusal(who: Caller, scope: str | None, limiter: RateLimiter) -> ServiceError | None:
    """Why the request may not go on, if it may not: no valid token (401), over its token's
    rate (429), or a token without the operation's scope (403)."""
    if who.kind != "token" or who.token is None:
        return Unauthorized(who.why)
    wait = limiter.take(who.token, who.rate)
    if wait:
        return RateLimited(wait)
    if scope is not None and not who.may(scope):
        return InsufficientScope(scope, who.token)
    return None


class AddressGate:
    """The requests without a valid token, per remote address: a bucket each, consulted
    before the database is asked about a named token and before any audit is written.
    Beyond it the request is refused (429) with one log line per address and minute."""

    def __init__(self, limiter: RateLimiter, tokens: Tokens) -> None:
        self.limiter = limiter
        self.tokens = tokens
        self._held: dict[str, tuple[float, int]] = {}  # address -> (its window's start, requests held)

    def before_lookup(self, request: web.Request) -> Callable[[str], None]:
        """For Tokens.caller: a named token this process has not seen valid waits for its
        address's bucket before it costs a lookup (one it knows goes on: a flood of wrong ones
        from a proxy's address must not lock out the tokens behind it)."""
        def check(key_id: str) -> None:
            if not self.tokens.known(key_id):
                self._raise_if(request, self.limiter.wait(_address(request)))
        return check

    def count(self, request: web.Request) -> None:
        """A request without a valid token: counted; refused beyond the address's rate."""
        self._raise_if(request, self.limiter.take(_address(request)))

    def _raise_if(self, request: web.Request, wait: int) -> None:
        if not wait:
            return
        request[HELD_BACK] = True
        address, now = _address(request), self.limiter.clock()
        # (each line counts the requests held back since the line before, this one included)
        last = self._held.get(address)
        if last is None or now - last[0] >= HELD_BACK_WINDOW:
            log.warning("api.address_limited", remote=address, requests_held=(last[1] if last else 0) + 1)
            self._held[address] = (now, 0)
        else:
            self._held[address] = (last[0], last[1] + 1)
        if len(self._held) > 10_000:  # (a flood of addresses: the oldest windows go)
            for stale in sorted(self._held, key=lambda a: self._held[a][0])[:5_000]:
                del self._held[stale]
        raise RateLimited(wait, "requests without a valid token from this address")


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


def _auth_middleware(
    tokens: Tokens, limiter: RateLimiter, conflicts: RateLimiter, addresses: RateLimiter
) -> Middleware:
    scopes = route_scopes()
    gate = AddressGate(addresses, tokens)
    serial = _Serial()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        given = request.headers.getall("Authorization", [])
        # (Two: which one counts is a guess that a proxy in front may make the other way.)
        who = (await tokens.caller(given[0] if given else "", gate.before_lookup(request)) if len(given) < 2
               else TWO_TOKENS)
        if who.kind != "token":
            gate.count(request)  # (over its address's rate: 429 here, before any audit)
        request[CALLER] = who
        if who.kind == "token":
            # Every log line of the request, and every audit row it writes, names its token.
            REQUEST_TOKEN.set(who.token)
        if who.token is not None:  # (a revoked or expired one is named in the log too)
            structlog.contextvars.bind_contextvars(token=who.token)
        route = _route(request)
        # (a route no operation declares a scope for is refused to every token: closed by default)
        needed = scopes.get((request.method, route), UNDECLARED) if route else None
        refusal = _refusal(who, needed, limiter)
        if _recording_route(request):
            request[REFUSAL] = refusal  # the Recordings service audits it, then answers it
        elif refusal is not None:
            raise refusal
        if who.token is not None and (request.method, route) in GUESSABLE:
            return await _within_conflict_budget(request, handler, who.token, conflicts, serial)
        return await handler(request)

    return auth


class _Serial:
    """One guessable request at a time per key (a token and the order, or the session, it
    names), in this process: a conflict is counted before the next guess at the same order
    runs, so guesses sent at once cannot all pass; requests for different orders run
    side by side (an order system opens many at once)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def one_at_a_time(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


async def _guessed_at(request: web.Request) -> str:
    """What a guess is about: the session a reassignment names, or the order an open names
    (the body is read here once; aiohttp keeps it for the handler)."""
    if "session_id" in request.match_info:
        return f"session {request.match_info['session_id']}"
    # (a body that is no JSON object, too large or too slow is refused here as the handler would)
    return f"order {(await _body(request)).get('order_id')!r}"[:200]


async def _within_conflict_budget(
    request: web.Request, handler: Handler, token: str, conflicts: RateLimiter, serial: _Serial
) -> web.StreamResponse:
    """Run a guessable operation while the token has conflict budget left: each refusal that
    confirms or denies a guess (an open naming other people, a courier who is the client)
    costs one; with none left these operations are refused (429) before they run, right
    guesses included. Guesses at one order or session run one at a time (see _Serial). A
    reassignment also costs its session one of its own budget when the courier changed: a
    loop of reassignments with candidate numbers would otherwise tell the client's number by
    the one refused, every other one succeeding."""
    about = await _guessed_at(request)
    keys = [token] + ([about] if about.startswith("session ") else [])  # (no token's name has a space)
    async with serial.one_at_a_time(f"{token} {about}"):
        for key in keys:
            wait = conflicts.wait(key)
            if wait:
                raise RateLimited(wait, "conflicting session requests with this token" if key == token
                                  else "changes of this session's courier")
        try:
            response = await handler(request)
        except ServiceError as exc:
            if exc.confirms_a_guess:
                for key in keys:
                    conflicts.take(key)
                log.info("api.conflict_counted", code=exc.code)
            raise
        if response.status == 201 and len(keys) > 1:
            conflicts.take(keys[1])  # (the courier changed)
        return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.get(UNMET_EXPECTATION):
            raise ExpectationFailed()
        return await handler(request)
    except ServiceError as exc:
        response = _error(exc.http_status, exc.code, str(exc), exc.details)
        if exc.http_status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="maskbridge"'
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web.HTTPException as exc:
        if exc.status >= 400:
            response = _error(exc.status, status_code(exc.status, exc.reason), exc.reason)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        raise
    except Exception as exc:
        if database_unreachable(exc):
            log.warning("api.database_unavailable", path=request.path, method=request.method, error=type(exc).__name__)
            response = _error(DatabaseUnavailable.http_status, DatabaseUnavailable.code, DatabaseUnavailable.message)
            response.headers["Retry-After"] = "1"
            return response
        log.exception("api.failed", path=request.path, method=request.method)
        return _error(InternalError.http_status, InternalError.code, InternalError.message)


@web.middleware
async def _measured(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request by its route's template (never the path: it can hold a
    pool number or an id) and method (any other method a client makes up: "other"), and logs
    it (api.request, with its token's name). The request's token is bound for its own log
    lines and audits only."""
    began = time.perf_counter()
    status = 500
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.request_started(request.transport)  # (its line and headers have arrived)
    requester = REQUEST_TOKEN.set(None)
    try:
        with structlog.contextvars.bound_contextvars(token=None):
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                _answered(request, status, time.perf_counter() - began)  # (while its token is bound)
    finally:
        REQUEST_TOKEN.reset(requester)
        if guard is not None:
            guard.request_answered(request.transport)


def _answered(request: web.Request, status: int, elapsed: float) -> None:
    route = _route(request) or "unmatched"
    method = request.method if request.method in _METHODS else "other"
    metrics.HTTP_REQUESTS.labels(route, method, str(status)).inc()
    metrics.HTTP_LATENCY.labels(route, method).observe(elapsed)
    # (health checks and scrapes, many a minute, only at debug; requests held back by their
    # address's bucket not at all: AddressGate logs them once a minute)
    if request.get(HELD_BACK):
        return
    say = log.debug if request.path in PUBLIC_PATHS else log.info
    say("api.request", method=method, route=route, status=status, ms=round(elapsed * 1000, 1), remote=request.remote)


# --- request helpers -----------------------------------------------------------------------


async def _read(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the body must be at most {limit} bytes")
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {BODY_TIMEOUT:.0f} seconds") from None
    except web.HTTPRequestEntityTooLarge:  # (a compressed body that inflates past client_max_size)
        raise TooLarge(f"the body must be at most {limit} bytes") from None
    except web.RequestPayloadError:  # (a Content-Encoding that does not decode: the client's fault)
        raise UnreadableBody("the body could not be read: it does not decode as its Content-Encoding says") from None
    except ConnectionResetError:  # (the client went away mid-body: nothing of the database's)
        raise UnreadableBody("the connection closed before the body arrived whole") from None
    if len(raw) > limit:
        raise TooLarge(f"the body must be at most {limit} bytes")
    return raw


async def _body(request: web.Request, limit: int = JSON_BODY_LIMIT) -> dict[str, Any]:
    """The request's JSON object; parsed once (the conflict budget reads an open's body
    before its handler does)."""
    if limit == JSON_BODY_LIMIT and BODY in request:
        return request[BODY]
    raw = await _read(request, limit)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidJson() from None
    if not isinstance(data, dict):
        raise InvalidJson()
    if limit == JSON_BODY_LIMIT:
        request[BODY] = data
    return data


def _session_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["session_id"])
    except ValueError:
        raise SessionNotFound() from None


def _page(request: web.Request) -> tuple[int, Any]:
    raw_limit = request.query.get("limit", str(DEFAULT_PAGE))
    if not re.fullmatch(r"[0-9]{1,4}", raw_limit) or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise InvalidInput(f"limit must be a whole number from 1 to {MAX_PAGE}", field="limit")
    cursor = request.query.get("cursor")
    if not cursor:
        return int(raw_limit), None
    try:
        return int(raw_limit), json.loads(base64.urlsafe_b64decode(cursor.encode() + b"==="))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise InvalidInput("cursor is not one this API gave out", field="cursor") from None


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, default=_default).encode()).decode().rstrip("=")


def _listing(items: list[Any], limit: int, last: Callable[[Any], Any]) -> dict[str, Any]:
    return {"items": items, "next_cursor": _cursor(last(items[-1])) if len(items) == limit else None}


def _time_and_id(cursor: Any) -> tuple[datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    try:
        at, ident = cursor
        when = datetime.fromisoformat(at)
        if when.tzinfo is None or not 2000 <= when.year <= 9000:
            raise ValueError("not a time this API gives out")
        return when, uuid.UUID(str(ident))
    except (TypeError, ValueError, AttributeError, OverflowError):
        raise InvalidInput("cursor is not one this API gave out", field="cursor") from None


def _query(request: web.Request, name: str, pattern: re.Pattern[str]) -> str | None:
    """A filter from the query string, checked before it reaches the database."""
    value = request.query.get(name)
    if value is not None and not pattern.fullmatch(value):
        raise InvalidInput(f"{name} is not a valid {name}", field=name)
    return value


# --- sessions ------------------------------------------------------------------------------

async def open_session(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    session, created = await sessions.open(parse(OpenSession, await _body(request)))
    return _json(render_session(sessions, session), 201 if created else 200)


async def list_sessions(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    limit, cursor = _page(request)
    rows = await sessions.find(
        order_id=_query(request, "order_id", ORDER_ID), status=request.query.get("status"),
        after=_time_and_id(cursor), limit=limit,
    )
    return _json(_listing([render_session(sessions, s) for s in rows], limit, lambda s: [s["created_at"], s["id"]]))


async def get_session(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    return _json(render_session(sessions, await sessions.get(_session_id(request))))


async def extend_session(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    session_id = (await sessions.get(_session_id(request))).id
    body: ExtendSession = parse(ExtendSession, await _body(request))
    session = await sessions.extend(session_id, body.ttl_seconds, body.idle_timeout_seconds)
    return _json(render_session(sessions, session))


async def close_session(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    session_id = (await sessions.get(_session_id(request))).id
    body: CloseSession = parse(CloseSession, await _body(request))
    return _json(render_session(sessions, await sessions.close(session_id, body.grace_seconds)))


async def list_participants(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    session = await sessions.get(_session_id(request))
    return _json({"items": [render_participant(sessions, p) for p in session.participants], "next_cursor": None})


async def add_participant(request: web.Request) -> web.Response:
    """Reassign the order to a new courier (the only participant that can change). Answers
    the session: 201 when the courier changed, 200 when the number was the courier's already."""
    sessions = request.app[SESSIONS]
    session_id = _session_id(request)
    await sessions.get(session_id)
    body: AddParticipant = parse(AddParticipant, await _body(request))
    session, changed = await sessions.reassign_courier(session_id, body.number, field="number")
    return _json(render_session(sessions, session), 201 if changed else 200)


async def session_events(request: web.Request) -> web.Response:
    events = await request.app[SESSIONS].events(_session_id(request))
    return _json({"items": events, "next_cursor": None})


async def session_calls(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    session = await sessions.get(_session_id(request))
    limit, cursor = _page(request)
    calls = await sessions.store.session_calls([session.id], _time_and_id(cursor), limit)
    return _json({"session_id": session.id, **_listing(calls, limit, lambda c: [c["started_at"], c["id"]])})


async def order_calls(request: web.Request) -> web.Response:
    """Every call of an order, across its sessions (an order reopened has several)."""
    order_id = _query(request, "order_id", ORDER_ID)
    if not order_id:
        raise InvalidInput("order_id is required", field="order_id")
    limit, cursor = _page(request)
    calls = await request.app[SESSIONS].store.order_calls(order_id, _time_and_id(cursor), limit)
    return _json({"order_id": order_id, **_listing(calls, limit, lambda c: [c["started_at"], c["id"]])})


# --- pool numbers ---------------------------------------------------------------------------


async def import_pool_numbers(request: web.Request) -> web.Response:
    pools = request.app[POOLS]
    if request.content_type in ("text/csv", "text/plain"):
        try:
            text = (await _read(request, IMPORT_BODY_LIMIT)).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidInput("the CSV must be UTF-8") from None
        counts = await pools.import_csv(text)
    else:
        body: ImportPoolNumbers = parse(ImportPoolNumbers, await _body(request, IMPORT_BODY_LIMIT))
        counts = await pools.import_numbers(body.numbers)
    return _json(counts, 201 if counts["added"] or counts["reactivated"] else 200)


async def list_pool_numbers(request: web.Request) -> web.Response:
    limit, cursor = _page(request)
    if cursor is not None and not (isinstance(cursor, str) and E164.fullmatch(cursor)):
        raise InvalidInput("cursor is not one this API gave out", field="cursor")
    rows = await request.app[POOLS].find(
        region=_query(request, "region", REGION_FORM), state=request.query.get("state"), after=cursor, limit=limit
    )
    return _json(_listing([render_pool_number(r) for r in rows], limit, lambda r: r["number"]))


async def get_pool_number(request: web.Request) -> web.Response:
    return _json(render_pool_number(await request.app[POOLS].get(request.match_info["number"])))


async def update_pool_number(request: web.Request) -> web.Response:
    """Change a number's mode (direct or order_code), while nobody holds it."""
    pools = request.app[POOLS]
    number = (await pools.get(request.match_info["number"])).number
    body: UpdatePoolNumber = parse(UpdatePoolNumber, await _body(request))
    return _json(render_pool_number(await pools.set_mode(number, body.mode)))


async def retire_pool_number(request: web.Request) -> web.Response:
    return _json(render_pool_number(await request.app[POOLS].retire(request.match_info["number"])))


async def pool_usage(request: web.Request) -> web.Response:
    return _json({"regions": await request.app[POOLS].usage()})


# --- blocklist ------------------------------------------------------------------------------


async def block_number(request: web.Request) -> web.Response:
    """Block a real number everywhere, at once: its calls in progress are ended too."""
    body: BlockNumber = parse(BlockNumber, await _body(request))
    blocklist = request.app[BLOCKLIST]
    entry, created = await blocklist.add(body.number, body.reason, body.ttl_seconds)
    return _json(render_block(blocklist, entry), 201 if created else 200)


async def list_blocked(request: web.Request) -> web.Response:
    blocklist = request.app[BLOCKLIST]
    limit, cursor = _page(request)
    rows = await blocklist.find(_time_and_id(cursor), limit)
    return _json(_listing([render_block(blocklist, r) for r in rows], limit, lambda r: [r["created_at"], r["id"]]))


async def unblock(request: web.Request) -> web.Response:
    blocklist = request.app[BLOCKLIST]
    try:
        entry_id = uuid.UUID(request.match_info["entry_id"])
    except ValueError:
        raise BlockNotFound() from None
    return _json(render_block(blocklist, await blocklist.remove(entry_id)))


# --- recordings ------------------------------------------------------------------------------
# Only tokens with recordings:read (the audit: audit:read) reach these; every request, granted
# or not, is written to the audit by the Recordings service, with its token's name.


def _who(request: web.Request) -> tuple[Caller, str | None]:
    """(who the request says it is from, where it came from)."""
    return request.get(CALLER, NO_TOKEN), request.remote


def _call_id(request: web.Request) -> uuid.UUID | None:
    try:
        return uuid.UUID(request.match_info["call_id"])
    except ValueError:
        return None  # no such call; the audit records the attempt all the same


async def recording_metadata(request: web.Request) -> web.Response:
    who, remote = _who(request)
    row = await request.app[RECORDINGS].metadata(who, remote, _call_id(request), request.get(REFUSAL))
    return _json(render_recording(row))


async def recording_audio(request: web.Request) -> web.StreamResponse:
    """The recording as one WAV file, streamed from Asterisk."""
    who, remote = _who(request)
    async with request.app[RECORDINGS].audio(who, remote, _call_id(request), request.get(REFUSAL)) as (row, stored):
        response = web.StreamResponse(headers={
            "Content-Type": "audio/wav",
            "Content-Disposition": f'attachment; filename="call-{row.call_id}.wav"',
            "Cache-Control": "no-store",
        })
        if stored.length is not None:
            response.content_length = stored.length
        await response.prepare(request)
        async for chunk in stored.chunks:
            await response.write(chunk)
        await response.write_eof()
        return response


async def recording_access_log(request: web.Request) -> web.Response:
    who, remote = _who(request)
    # The token is checked (and the request audited) before the parameters: a request without
    # the recording token learns nothing from a 422, and is in the audit whatever it asked.
    call_id: uuid.UUID | None = None
    limit, cursor = DEFAULT_PAGE, None
    invalid: InvalidInput | None = None
    try:
        raw_call = request.query.get("call_id")
        if raw_call is not None:
            try:
                call_id = uuid.UUID(raw_call)
            except ValueError:
                raise InvalidInput("call_id is not a valid call_id", field="call_id") from None
        limit, cursor = _page(request)
        if cursor is not None and (isinstance(cursor, bool) or not isinstance(cursor, int)
                                   or not 1 <= cursor < MAX_AUDIT_CURSOR):
            raise InvalidInput("cursor is not one this API gave out", field="cursor")
    except InvalidInput as exc:
        invalid = exc
    rows = await request.app[RECORDINGS].access_log(who, remote, call_id, cursor, limit, invalid,
                                                    request.get(REFUSAL))
    return _json(_listing(rows, limit, lambda r: r["id"]))


# --- service -------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    status = await request.app[HEALTH]()
    return _json(status, 200 if all(status.values()) else 503)


async def openapi(request: web.Request) -> web.Response:
    return _json(document())


async def prometheus_metrics(request: web.Request) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/healthz", health),
    ("GET", "/v1/openapi.json", openapi),
    ("GET", "/metrics", prometheus_metrics),
    ("POST", "/v1/sessions", open_session),
    ("GET", "/v1/sessions", list_sessions),
    ("GET", "/v1/sessions/{session_id}", get_session),
    ("POST", "/v1/sessions/{session_id}/extend", extend_session),
    ("POST", "/v1/sessions/{session_id}/close", close_session),
    ("GET", "/v1/sessions/{session_id}/participants", list_participants),
    ("POST", "/v1/sessions/{session_id}/participants", add_participant),
    ("GET", "/v1/sessions/{session_id}/events", session_events),
    ("GET", "/v1/sessions/{session_id}/calls", session_calls),
    ("GET", "/v1/calls", order_calls),
    ("POST", "/v1/pool-numbers", import_pool_numbers),
    ("GET", "/v1/pool-numbers", list_pool_numbers),
    ("GET", "/v1/pool-numbers/{number}", get_pool_number),
    ("PATCH", "/v1/pool-numbers/{number}", update_pool_number),
    ("POST", "/v1/pool-numbers/{number}/retire", retire_pool_number),
    ("GET", "/v1/pool-usage", pool_usage),
    ("POST", "/v1/blocklist", block_number),
    ("GET", "/v1/blocklist", list_blocked),
    ("DELETE", "/v1/blocklist/{entry_id}", unblock),
    ("GET", "/v1/calls/{call_id}/recording", recording_metadata),
    ("GET", "/v1/calls/{call_id}/recording/audio", recording_audio),
    ("GET", "/v1/recordings/access", recording_access_log),
]
RECORDING_PATHS = ("/v1/calls/{call_id}/recording", "/v1/calls/{call_id}/recording/audio", "/v1/recordings/access")


def make_app(
    sessions: Sessions, pools: Pools, blocklist: Blocklist, tokens: Tokens, health_check: HealthCheck,
    recordings: Recordings, guard: ConnectionGuard | None = None, limiter: RateLimiter | None = None,
    conflicts: RateLimiter | None = None, addresses: RateLimiter | None = None,
) -> web.Application:
    """The API. `guard`: the listening socket's (bridge.api.server), told of each request;
    `limiter`: the requests' rate per token; `conflicts`: each token's conflicts (refusals that
    confirm a guessed number); `addresses`: the requests without a valid token per remote
    address (each none: no limit)."""
    unlimited = RateLimiter(0, 0)
    app = web.Application(
        middlewares=[_measured, _errors, _auth_middleware(tokens, limiter or unlimited, conflicts or unlimited,
                                                          addresses or unlimited)],
        client_max_size=IMPORT_BODY_LIMIT,
    )
    if guard is not None:
        app[GUARD] = guard
    app[SESSIONS] = sessions
    app[POOLS] = pools
    app[BLOCKLIST] = blocklist
    app[HEALTH] = health_check
    app[RECORDINGS] = recordings
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app
