"""The API's error answers, in one shape whoever makes them: the handlers' middleware
(bridge.api.http) and the connection's handler for a request aiohttp cannot parse
(bridge.api.server)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


def status_code(status: int, reason: str | None = None) -> str:
    """The code of an error answered for its HTTP status alone: the status's phrase (or the
    given reason) in snake case - 404 not_found, 405 method_not_allowed - and 413
    body_too_large."""
    if status == 413:
        return "body_too_large"
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:  # (a status Python does not name)
            reason = f"HTTP {status}"
    return reason.lower().replace(" ", "_")
