"""REST under /v1. Bearer-token auth; JSON errors with a stable `code` and a human `message`."""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from bridge.phone import mask
from bridge.sessions import SessionError, SessionNotFound, Sessions
from bridge.store.queries import SessionRow

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]
SESSIONS = web.AppKey("sessions", Sessions)
HEALTH: web.AppKey[HealthCheck] = web.AppKey("health")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (uuid.UUID,)):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(type(value).__name__)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=_default))


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def render_session(s: SessionRow) -> dict[str, Any]:
    """The order system gets the pool number in full; real numbers only masked."""
    return {
        "id": s.id,
        "order_id": s.order_id,
        "pool_number": s.pool_number,
        "status": s.status,
        "participants": {
            "courier": {"number": mask(s.courier_number), "dials": s.pool_number},
            "client": {"number": mask(s.client_number), "dials": s.pool_number},
        },
        "created_at": s.created_at,
        "closed_at": s.closed_at,
    }


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _error(401, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    return auth


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SessionError as exc:
        return _error(exc.http_status, exc.code, str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        raise


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length and request.content_length > 64 * 1024:
        raise SessionError("request body too large")
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise SessionError("body must be a JSON object") from None
    if not isinstance(data, dict):
        raise SessionError("body must be a JSON object")
    return data


def _session_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["session_id"])
    except ValueError:
        raise SessionNotFound("no such session") from None


async def open_session(request: web.Request) -> web.Response:
    body = await _body(request)
    session, created = await request.app[SESSIONS].open(
        body.get("order_id"), body.get("courier_number"), body.get("client_number")
    )
    return _json(render_session(session), 201 if created else 200)


async def get_session(request: web.Request) -> web.Response:
    return _json(render_session(await request.app[SESSIONS].get(_session_id(request))))


async def close_session(request: web.Request) -> web.Response:
    return _json(render_session(await request.app[SESSIONS].close(_session_id(request))))


async def session_calls(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    session = await sessions.get(_session_id(request))
    calls = await sessions.store.session_calls(session.id)
    return _json({"session_id": session.id, "calls": calls})


async def health(request: web.Request) -> web.Response:
    status = await request.app[HEALTH]()
    return _json(status, 200 if all(status.values()) else 503)


def make_app(sessions: Sessions, token: str, health_check: HealthCheck) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth_middleware(token)], client_max_size=64 * 1024)
    app[SESSIONS] = sessions
    app[HEALTH] = health_check
    app.router.add_get("/healthz", health)
    app.router.add_post("/v1/sessions", open_session)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_post("/v1/sessions/{session_id}/close", close_session)
    app.router.add_get("/v1/sessions/{session_id}/calls", session_calls)
    return app
