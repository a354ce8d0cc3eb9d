"""Errors the order system or an engineer can cause. Each has a stable machine-readable
`code`, an HTTP status, a human message that never holds a real number, and details."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    code = "bad_request"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details = details


class InvalidInput(ServiceError):
    code = "invalid_input"
    http_status = 422


class NotFound(ServiceError):
    code = "not_found"
    http_status = 404


class Conflict(ServiceError):
    code = "conflict"
    http_status = 409


class TooLarge(ServiceError):
    code = "body_too_large"
    http_status = 413


class PoolExhausted(Conflict):
    code = "pool_exhausted"


class Unauthorized(ServiceError):
    code = "unauthorized"
    http_status = 401


class Forbidden(ServiceError):
    code = "forbidden"
    http_status = 403


class Gone(ServiceError):
    code = "gone"
    http_status = 410


class Unavailable(ServiceError):
    code = "unavailable"
    http_status = 503
