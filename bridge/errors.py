"""Errors the order system or an engineer can cause: one class per stable `code`.

Each has its HTTP status, a default message (for people; it never holds a real number) and
optional details. The HTTP API answers them as {"error": {"code", "message", "details"?}};
its OpenAPI document lists them from here (`CODES`)."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    code = "bad_request"
    http_status = 400
    message = "the request cannot be served"
    # A refusal that says whether a number the caller gave is one of a session's people (an
    # open that names other people, a courier who is the client): the API counts each against
    # the token's conflict budget (MB_API_CONFLICT_RATE), so that guessing a masked number
    # one candidate at a time takes days.
    confirms_a_guess = False

    def __init__(self, message: str | None = None, **details: Any) -> None:
        super().__init__(message or self.message)
        self.details = {key: value for key, value in details.items() if value is not None}


# --- 400 / 413 / 422: the request ---------------------------------------------------------


class InvalidJson(ServiceError):
    code = "invalid_json"
    message = "the body must be a JSON object"


class UnreadableBody(ServiceError):
    """The body did not arrive as it said it would: it does not decode as its
    Content-Encoding says, or the connection closed before it all came."""

    message = "the body could not be read"


class ExpectationFailed(ServiceError):
    """An Expect header other than 100-continue (bridge.api.server marks the request)."""

    code = "expectation_failed"
    http_status = 417
    message = "only Expect: 100-continue is understood"


class TooLarge(ServiceError):
    code = "body_too_large"
    http_status = 413
    message = "the body is too large"


class RequestTimeout(ServiceError):
    code = "request_timeout"
    http_status = 408
    message = "the body did not arrive in time"


class InvalidInput(ServiceError):
    code = "invalid_input"
    http_status = 422
    message = "a field or parameter is missing, unknown or out of range"


class CourierIsClient(InvalidInput):
    """The new courier's number is the client's (still `invalid_input`: the order system
    learns what to fix), counted as a conflict."""

    confirms_a_guess = True


class UnknownRegion(InvalidInput):
    code = "unknown_region"
    message = "no pool number is in this region"


class DestinationNotAllowed(InvalidInput):
    code = "destination_not_allowed"
    message = "the number is outside the number ranges this bridge serves (MB_ALLOWED_DESTINATIONS)"


class InvalidImport(InvalidInput):
    code = "invalid_import"
    message = "the import has bad rows; nothing was imported"


# --- 401 / 403: who asks ---------------------------------------------------------------------


class Unauthorized(ServiceError):
    code = "unauthorized"
    http_status = 401
    message = "missing or wrong bearer token"


class Forbidden(ServiceError):
    code = "forbidden"
    http_status = 403
    message = "this token does not reach this resource"


class InsufficientScope(Forbidden):
    code = "insufficient_scope"
    message = "this token lacks the scope this operation needs"

    def __init__(self, scope: str, token: str | None = None) -> None:
        super().__init__(f"the token {token!r} lacks the scope {scope}" if token else None, required_scope=scope)


# --- 404 / 410: what is asked for ------------------------------------------------------------


class NotFound(ServiceError):
    code = "not_found"
    http_status = 404
    message = "no such resource"


class SessionNotFound(NotFound):
    code = "session_not_found"
    message = "no such session"


class PoolNumberNotFound(NotFound):
    code = "pool_number_not_found"
    message = "no such pool number"


class BlockNotFound(NotFound):
    code = "block_not_found"
    message = "no such blocklist entry"


class TokenNotFound(NotFound):
    code = "token_not_found"
    message = "no such API token"


class RecordingNotFound(NotFound):
    code = "recording_not_found"
    message = "this call has no recording"


class Gone(ServiceError):
    code = "gone"
    http_status = 410
    message = "it existed, and is gone"


class RecordingDeleted(Gone):
    code = "recording_deleted"
    message = "the recording was deleted under the retention policy"


# --- 409: the state of things ---------------------------------------------------------------


class Conflict(ServiceError):
    code = "conflict"
    http_status = 409
    message = "the request conflicts with the current state"


class OrderHasOpenSession(Conflict):
    code = "order_has_open_session"
    # One answer whatever differs (the courier, the client, the mode or the order code): it
    # must not tell a caller which of the numbers it tried is in the order.
    message = "the order has an open session that this request does not match; close it, or reassign the courier"
    confirms_a_guess = True

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id=session_id)


class SessionEnded(Conflict):
    code = "session_ended"
    message = "only an open session can be changed"


class PoolExhausted(Conflict):
    code = "pool_exhausted"
    message = "no pool number is free for this pair"


class OrderCodeTaken(Conflict):
    code = "order_code_taken"
    message = "every order-code number has a live session with this order_code; give another"


class PoolNumberInUse(Conflict):
    code = "pool_number_in_use"
    message = "the pool number is held; its mode cannot change"


class Contention(Conflict):
    code = "contention"
    message = "too many concurrent requests raced for the same numbers; try again"


class RecordingInProgress(Conflict):
    code = "recording_in_progress"
    message = "the call is still being recorded"


# --- 429: how often ---------------------------------------------------------------------------


class RateLimited(ServiceError):
    code = "rate_limited"
    http_status = 429
    message = "too many requests with this token; try again after Retry-After seconds"

    def __init__(self, retry_after: int, what: str = "requests with this token") -> None:
        super().__init__(f"too many {what}; try again in {retry_after} s", retry_after_seconds=retry_after)
        self.retry_after = retry_after


# --- 5xx ---------------------------------------------------------------------------------------


class InternalError(ServiceError):
    code = "internal_error"
    http_status = 500
    message = "the bridge failed to answer; the failure is logged"


class Unavailable(ServiceError):
    code = "unavailable"
    http_status = 503
    message = "a service the bridge needs is unavailable"


class DatabaseUnavailable(Unavailable):
    code = "database_unavailable"
    message = "the database cannot be reached just now; try again"


class AsteriskUnavailable(Unavailable):
    code = "asterisk_unavailable"
    message = "the recording's audio could not be fetched from Asterisk"


def _classes(base: type[ServiceError]) -> list[type[ServiceError]]:
    return [base] + [c for sub in base.__subclasses__() for c in _classes(sub)]


# Every error the API can answer, by code (the first class of each: a subclass that keeps its
# parent's code, such as CourierIsClient, is that answer).
CODES: dict[str, type[ServiceError]] = {}
for _class in _classes(ServiceError):
    CODES.setdefault(_class.code, _class)
