"""The OpenAPI 3.1 document of the HTTP API (bridge.api.http), served at /v1/openapi.json.

The responses and operations are written here next to the handlers, and checked against them
by tests/unit/test_openapi.py (every route documented, every documented operation a route,
every $ref resolving). What is defined elsewhere is taken from there, never repeated: the
request bodies are the JSON schemas of their models (bridge.requests), a session's terms and
those a call keeps are the schema of bridge.terms.Terms, limits come from bridge.limits,
languages from bridge.languages, and error codes from bridge.errors.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bridge.calls.outcomes import CUT_REASONS, HANGUP_BY, OUTCOMES, STATES
from bridge.errors import (
    AsteriskUnavailable,
    DatabaseUnavailable,
    BlockNotFound,
    Contention,
    DestinationNotAllowed,
    InternalError,
    InvalidImport,
    InvalidInput,
    InvalidJson,
    OrderCodeTaken,
    OrderHasOpenSession,
    PoolExhausted,
    PoolNumberInUse,
    PoolNumberNotFound,
    RecordingDeleted,
    RecordingInProgress,
    RecordingNotFound,
    InsufficientScope,
    RateLimited,
    SessionEnded,
    SessionNotFound,
    TooLarge,
    Unauthorized,
    UnknownRegion,
)
from bridge.languages import LANGUAGES
from bridge.limits import (
    BLOCK_REASON_MAX,
    DEFAULT_PAGE,
    IMPORT_BODY_LIMIT,
    JSON_BODY_LIMIT,
    MAX_IMPORT,
    MAX_PAGE,
    MAX_PHONE_NUMBER_LENGTH,
    PHONE_NUMBER_PATTERN,
    ORDER_CODE_PATTERN,
    MAX_SECONDS,
    MODES,
    POOL_STATES,
    REGION_PATTERN,
)
from bridge.requests import REQUESTS
from bridge.terms import Terms
from bridge.tokens import SCOPES

Schema = dict[str, Any]


# --- building blocks ------------------------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _response_ref(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def _parameter_ref(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


def _or_null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _json_response(description: str, schema: Schema, example: Any = None, links: Schema | None = None) -> Schema:
    media: Schema = {"schema": schema}
    if example is not None:
        media["example"] = example
    response: Schema = {"description": description, "content": {"application/json": media}}
    if links:
        response["links"] = links
    return response


# What a client can do next with the session an answer holds (OpenAPI links: clients and
# fuzzers follow them from the session just opened).
SESSION_LINKS: Schema = {
    operation[0].upper() + operation[1:]: {
        "operationId": operation,
        "parameters": {"session_id": "$response.body#/id"},
    }
    for operation in ("getSession", "extendSession", "closeSession", "listParticipants", "reassignCourier",
                      "listSessionEvents", "listSessionCalls")
}


def _error_response(description: str, examples: dict[str, tuple[str, str, dict[str, Any] | None]]) -> Schema:
    """A response with the Error body; examples: name -> (code, message, details)."""
    shown: dict[str, Any] = {}
    for name, (code, message, details) in examples.items():
        error: dict[str, Any] = {"code": code, "message": message}
        if details:
            error["details"] = details
        shown[name] = {"summary": code, "value": {"error": error}}
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error"), "examples": shown}},
    }


def _too_large(limit: int) -> Schema:
    """The 413 of an endpoint that reads at most `limit` bytes of body."""
    return _error_response(
        f"`body_too_large`: the body is larger than {limit} bytes, whether `Content-Length` says so (refused "
        "before it is read) or a body sent without it (chunked) turns out larger. A chunked body above the "
        f"server-wide cap ({IMPORT_BODY_LIMIT} bytes) is cut off by the server with the same code.",
        {
            "body_too_large": (TooLarge.code, f"the body must be at most {limit} bytes", None),
            "chunked_above_the_cap": (TooLarge.code, "Request Entity Too Large", None),
        },
    )


def _json_request(schema_name: str, *, required: bool = True, description: str | None = None) -> Schema:
    body: Schema = {"required": required, "content": {"application/json": {"schema": _ref(schema_name)}}}
    if description:
        body["description"] = description
    return body


TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
NULLABLE_TIMESTAMP: Schema = {"type": ["string", "null"], "format": "date-time"}
UUID: Schema = {"type": "string", "format": "uuid"}
E164: Schema = {"type": "string", "pattern": r"^\+[1-9][0-9]{6,14}$", "examples": ["+74950000001"]}
REGION: Schema = {
    "type": "string",
    "pattern": REGION_PATTERN,
    "description": "An ISO 3166 country (`RU`) or subdivision (`RU-MOW`) code.",
    "examples": ["RU-MOW"],
}


def _seconds(description: str, *, minimum: int = 1) -> Schema:
    return {"type": "integer", "minimum": minimum, "maximum": MAX_SECONDS, "description": description}


# --- shared responses -----------------------------------------------------------------------

RESPONSES: dict[str, Schema] = {
    "Unauthorized": {
        **_error_response(
            "`unauthorized`: the `Authorization` header is missing, or is not `Bearer <token>` with the right "
            "token (the scheme `Bearer` is matched case-insensitively).",
            {"unauthorized": (Unauthorized.code, "missing or wrong bearer token", None)},
        ),
        "headers": {
            "WWW-Authenticate": {
                "description": 'Always `Bearer realm="maskbridge"`.',
                "schema": {"type": "string", "const": 'Bearer realm="maskbridge"'},
            }
        },
    },
    "RecordingUnauthorized": {
        **_error_response(
            "`unauthorized`: the `Authorization` header is missing, or holds no valid token (a wrong, revoked or "
            "expired one). The attempt is written to the audit.",
            {"unauthorized": (Unauthorized.code, "missing or wrong bearer token", None)},
        ),
        "headers": {
            "WWW-Authenticate": {
                "description": 'Always `Bearer realm="maskbridge"`.',
                "schema": {"type": "string", "const": 'Bearer realm="maskbridge"'},
            }
        },
    },
    "RecordingForbidden": _error_response(
        "`insufficient_scope`: the token lacks the operation's scope (`recordings:read`, or `audit:read` for the "
        "audit); the order system's `MB_API_TOKEN` never has them. The attempt is written to the audit.",
        {"insufficient_scope": (InsufficientScope.code, "the token 'env' lacks the scope recordings:read",
                                {"required_scope": "recordings:read"})},
    ),
    "Forbidden": _error_response(
        "`insufficient_scope`: the token lacks the scope this operation needs (`details.required_scope`).",
        {"insufficient_scope": (InsufficientScope.code, "the token 'reports' lacks the scope sessions:write",
                                {"required_scope": "sessions:write"})},
    ),
    "RateLimited": {
        **_error_response(
            "`rate_limited`: the token made more requests than its rate limit lets it (per bridge process: "
            "`MB_API_RATE` a second after a burst of `MB_API_BURST`, or the token's own rate); or, on opening a "
            "session and reassigning the courier, it spent its conflict budget (`MB_API_CONFLICT_RATE` a minute "
            "after `MB_API_CONFLICT_BURST`), or the session's courier changed that often; or the request has no "
            "valid token and its address made more such "
            "requests than `MB_API_ADDRESS_RATE` a second after `MB_API_ADDRESS_BURST` (not audited). Wait "
            "`Retry-After` seconds. On a recording route an attempt with a token is written to the audit.",
            {"rate_limited": (RateLimited.code, "too many requests with this token; try again in 1 s",
                              {"retry_after_seconds": 1})},
        ),
        "headers": {
            "Retry-After": {
                "description": "Whole seconds after which the token may make a request again.",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    },
    "RecordingNotFound": _error_response(
        "`recording_not_found`: the call does not exist, was not recorded, or its audio is missing from "
        "Asterisk (an id that is not a UUID is not found either). Audited.",
        {"recording_not_found": (RecordingNotFound.code, "this call has no recording", None)},
    ),
    "RecordingDeleted": _error_response(
        "`recording_deleted`: the recording was deleted under the retention policy "
        "(`MB_RECORDING_RETENTION_DAYS`). Audited.",
        {
            "recording_deleted": (
                RecordingDeleted.code,
                "the recording was deleted under the retention policy",
                {"deleted_at": "2025-06-12T10:00:00+00:00"},
            )
        },
    ),
    "InternalError": _error_response(
        "`internal_error`: the bridge failed (the database is unreachable, for example). The failure is "
        "logged; the request may be retried.",
        {"internal_error": (InternalError.code, "the bridge failed to answer; the failure is logged", None)},
    ),
    "DatabaseUnavailable": {
        **_error_response(
            "`database_unavailable`: the database could not be reached, or the connection to it was lost, while "
            "answering. Nothing was changed unless the change had committed (the request is safe to retry: opens "
            "are idempotent by `order_id`). `Retry-After` says when.",
            {"database_unavailable": (DatabaseUnavailable.code, DatabaseUnavailable.message, None)},
        ),
        "headers": {"Retry-After": {"description": "Seconds to wait before retrying.",
                                    "schema": {"type": "integer", "minimum": 0}}},
    },
    "BadBody": _error_response(
        "`invalid_json`: the body is not a JSON object (an empty body counts as `{}`).",
        {"invalid_json": (InvalidJson.code, "the body must be a JSON object", None)},
    ),
    "BodyTooLarge": _too_large(JSON_BODY_LIMIT),
    "SessionNotFound": _error_response(
        "`session_not_found`: no session has this id (an id that is not a UUID is not found either).",
        {"session_not_found": (SessionNotFound.code, "no such session", None)},
    ),
    "BlockNotFound": _error_response(
        "`block_not_found`: no blocklist entry has this id (an id that is not a UUID is not found either); "
        "the number may have been unblocked already.",
        {"block_not_found": (BlockNotFound.code, "no such blocklist entry", None)},
    ),
    "PoolNumberNotFound": _error_response(
        "`pool_number_not_found`: the number is a valid phone number, but not one of the pool.",
        {"pool_number_not_found": (PoolNumberNotFound.code, "no such pool number", None)},
    ),
    "InvalidPoolNumber": _error_response(
        "`invalid_input`: the path does not hold a phone number (`details.field` is `number`).",
        {
            "invalid_input": (
                InvalidInput.code,
                "pool number: not a valid phone number (not a phone number)",
                {"field": "number"},
            )
        },
    ),
    "InvalidPage": _error_response(
        "`invalid_input`: `limit` is not a whole number from 1 to "
        f"{MAX_PAGE} written in ASCII digits, `cursor` is not one this API gave out, or a filter has a value it "
        "does not know. "
        "`details.field` names the parameter.",
        {
            "limit": (InvalidInput.code, f"limit must be a whole number from 1 to {MAX_PAGE}", {"field": "limit"}),
            "cursor": (InvalidInput.code, "cursor is not one this API gave out", {"field": "cursor"}),
        },
    ),
}


# --- parameters -----------------------------------------------------------------------------

PARAMETERS: dict[str, Schema] = {
    "Limit": {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"Most items on the page, from 1 to {MAX_PAGE}, written in ASCII digits only (no sign, "
        "spaces, decimal point or other digits).",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
    },
    "Cursor": {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "Opaque: the `next_cursor` of the previous page, as it was given. Leave it out for the "
        "first page. A cursor is only good for the listing (and filters) that gave it out; one that is not "
        "is refused with 422 `invalid_input` (`details.field` is `cursor`).",
        "schema": {"type": "string"},
    },
    "SessionId": {
        "name": "session_id",
        "in": "path",
        "required": True,
        "description": "The session's id.",
        "schema": UUID,
    },
    "CallId": {
        "name": "call_id",
        "in": "path",
        "required": True,
        "description": "The call's id (`id` of a Call).",
        "schema": UUID,
    },
    "BlockEntryId": {
        "name": "entry_id",
        "in": "path",
        "required": True,
        "description": "The blocklist entry's id (`id` of a BlockedNumber), not the number.",
        "schema": UUID,
    },
    "PoolNumber": {
        "name": "number",
        "in": "path",
        "required": True,
        "description": "The pool number: E.164 (`+74950000001`; the `+` may be sent as is or as `%2B`) or any "
        "other form the bridge reads as the same number (`84950000001` in the default region). Not a phone "
        "number: 422 `invalid_input` with `details.field` `number`.",
        "schema": {"type": "string", "maxLength": MAX_PHONE_NUMBER_LENGTH, "pattern": PHONE_NUMBER_PATTERN},
    },
}

PAGE_PARAMETERS = [_parameter_ref("Limit"), _parameter_ref("Cursor")]
SESSION_PARAMETERS = [_parameter_ref("SessionId")]
NUMBER_PARAMETERS = [_parameter_ref("PoolNumber")]
BLOCK_ENTRY_PARAMETERS = [_parameter_ref("BlockEntryId")]
CALL_PARAMETERS = [_parameter_ref("CallId")]


# --- schemas --------------------------------------------------------------------------------


def _list_of(item: str, description: str, *, paginated: bool = True) -> Schema:
    next_cursor: Schema = (
        {
            "type": ["string", "null"],
            "description": "The cursor of the next page; null when this page is the last one. A page as long as "
            "`limit` always has a cursor, so the page after it may be empty.",
        }
        if paginated
        else {"type": "null", "description": "Always null: this list comes whole, in one page."}
    )
    return {
        "type": "object",
        "description": description,
        "required": ["items", "next_cursor"],
        "properties": {"items": {"type": "array", "items": _ref(item)}, "next_cursor": next_cursor},
    }


HOLD_COUNTS: Schema = {
    "type": "object",
    "description": "How many pool numbers a real number holds.",
    "required": ["live", "cooling"],
    "properties": {
        "live": {"type": "integer", "minimum": 0, "description": "Held in live sessions."},
        "cooling": {"type": "integer", "minimum": 0, "description": "Held in a pair cool-off after leaving."},
    },
}

ERROR_CODES = """Stable error codes (`error.code`), by HTTP status:

* 400 `invalid_json`: the body is not a JSON object.
* 400 `bad_request`: the request is not valid HTTP/1.1, or its body could not be read (it does not decode
  as its `Content-Encoding` says, or the connection closed before it came whole). The answer quotes
  nothing of the request.
* 401 `unauthorized`: the bearer token is missing or wrong; the answer has the header
  `WWW-Authenticate: Bearer realm="maskbridge"`.
* 401 also for a token that was revoked or expired (the message says which).
* 403 `insufficient_scope`: the token lacks the scope the operation needs; `details.required_scope` names
  it (each operation's scope is its security requirement in this document).
* 404 `session_not_found`, `pool_number_not_found`, `block_not_found`, `recording_not_found` (the call has
  no recording); `not_found` for a path that is no route.
* 405 `method_not_allowed`: the path exists, the method does not; the `Allow` header lists the methods it has.
* 409 `order_has_open_session`: the order already has an open session that the request does not match
  (another courier, client, mode or order code). `details`: `session_id` (the open session) only: the
  answer is the same whatever differs, so that it never tells whether a number is in the order. Close it
  first, or reassign the courier (`POST /v1/sessions/{session_id}/participants`).
* 409 `pool_exhausted`: no pool number is free for the pair. `details`: `active_numbers`, `courier_holds`
  and `client_holds` (`{live, cooling}` counts of the numbers each one holds), `numbers_needed`. For a
  session in mode `order_code`: no active pool number is in mode `order_code` (`details.active_numbers` 0).
* 409 `order_code_taken`: every order-code number has a live session with the `order_code` given.
* 409 `pool_number_in_use`: the mode of a pool number cannot change while someone holds it (live sessions,
  or pairs cooling off). `details`: `live_sessions`, `cooling_pairs`.
* 409 `contention`: too many concurrent requests raced for the same numbers; retry.
* 409 `recording_in_progress`: the call is still being recorded; its audio can be fetched once it ended.
* 409 `session_ended`: the change needs an open session, and the session is in grace or closed, or was
  past its expiry or idle timeout (it is ended then, not revived).
* 410 `recording_deleted`: the recording was deleted under the retention policy (`details.deleted_at`).
* 413 `body_too_large`: the body is larger than the endpoint takes (64 KiB for JSON, 4 MiB for a pool
  number import), whether `Content-Length` says so or a chunked or compressed body turns out larger.
* 417 `expectation_failed`: an `Expect` header other than `100-continue`.
* 422 `invalid_input`: a field or parameter is missing, unknown or out of range; `details.field` names it
  when there is one.
* 422 `unknown_region`: no pool number is in the requested region (`details.field` is `region`).
* 422 `destination_not_allowed`: a courier or client number is outside the number ranges the bridge serves
  (`MB_ALLOWED_DESTINATIONS`), or is a premium-rate or international-network number, which the bridge never
  dials (`details.field` names it).
* 429 `rate_limited`: the token made more requests than its rate limit lets it (`MB_API_RATE` a second
  after a burst of `MB_API_BURST`, per bridge process, or the token's own rate); or it spent its conflict
  budget (below); or a request without a valid token came from an address over `MB_API_ADDRESS_RATE` a
  second (after `MB_API_ADDRESS_BURST`; such a request is answered before its token is looked up, and not
  audited). The header `Retry-After` and `details.retry_after_seconds` say how many seconds to wait.
* 422 `invalid_import`: a pool number import had bad rows; nothing was imported. The message lists up to 20
  of them; `details.problems` counts them all.
* 500 `internal_error`: the bridge failed; the failure is logged.
* 503 `asterisk_unavailable`: the recording's audio could not be fetched from Asterisk.

Messages are for people and may change; never parse them. They never hold a real number."""

SESSION_MODE: dict[str, Any] = {
    "type": "string",
    "enum": list(MODES),
    "description": "`direct`: the pool number routes by the caller's number. `order_code`: the number is shared; "
    "callers key `order_code`.",
}
POOL_MODE: dict[str, Any] = {
    "type": "string",
    "enum": list(MODES),
    "description": "`direct`: handed to direct sessions, calls routed by the caller's number. `order_code`: "
    "shared by order-code sessions, the caller keys the order's code (never handed to a direct session).",
}


def _model_schema(model: type[BaseModel]) -> tuple[Schema, dict[str, Schema]]:
    """A model's JSON schema as pydantic writes it, and the schemas it refers to (its $defs,
    which go to the document's components)."""
    schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})


def _term_properties(names: tuple[str, ...] | None = None) -> Schema:
    """The properties of a session's terms (or of the named ones), as Terms defines them."""
    properties = _model_schema(Terms)[0]["properties"]
    return {name: properties[name] for name in names or Terms.names()}


def _request_schemas() -> dict[str, Schema]:
    """Every request body's schema under its document name, and what they refer to."""
    schemas: dict[str, Schema] = {}
    for name, model in REQUESTS.items():
        schema, defs = _model_schema(model)
        schemas.update(defs)
        schemas[name] = schema
    # The import's entries are checked one by one by the pool service (bad ones are listed
    # in the answer): the model takes any entry; the document says what a good one is.
    schemas["ImportPoolNumbersRequest"]["properties"]["numbers"]["items"] = _ref("PoolNumberEntry")
    return schemas


SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "description": "Every error answer. " + ERROR_CODES,
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {
                        "type": "string",
                        "description": "Stable, machine-readable.",
                        "examples": ["invalid_input"],
                    },
                    "message": {"type": "string", "description": "For a person; may change."},
                    "details": _ref("ErrorDetails"),
                },
            }
        },
    },
    "ErrorDetails": {
        "type": "object",
        "description": "Present only when there is something to say. Which keys appear depends on the code.",
        "additionalProperties": True,
        "properties": {
            "field": {
                "type": "string",
                "description": "`invalid_input`, `unknown_region`, `destination_not_allowed`, `order_code_taken`: "
                "the field or parameter at fault.",
            },
            "session_id": {
                **UUID,
                "description": "`order_has_open_session`: the order's open session.",
            },
            "problems": {"type": "integer", "minimum": 1, "description": "`invalid_import`: how many rows were bad."},
            "deleted_at": {**TIMESTAMP, "description": "`recording_deleted`: when the retention job deleted it."},
            "active_numbers": {
                "type": "integer",
                "minimum": 0,
                "description": "`pool_exhausted`: active pool numbers (in mode `direct`, for a direct session).",
            },
            "live_sessions": {
                "type": "integer",
                "minimum": 0,
                "description": "`pool_number_in_use`: live sessions on the number.",
            },
            "cooling_pairs": {
                "type": "integer",
                "minimum": 0,
                "description": "`pool_number_in_use`: (real number, pool number) pairs cooling off on it.",
            },
            "courier_holds": {**_ref("HoldCounts"), "description": "`pool_exhausted`: numbers the courier holds."},
            "client_holds": {
                **_ref("HoldCounts"),
                "description": "`pool_exhausted`: numbers the client holds. When a courier is being reassigned, "
                "these are the new courier's counts again.",
            },
            "numbers_needed": {
                "type": "integer",
                "minimum": 1,
                "description": "`pool_exhausted`: active pool numbers this pair needs at least, with its cool-offs.",
            },
        },
    },
    "HoldCounts": HOLD_COUNTS,
    "Participant": {
        "type": "object",
        "description": "A person in a session. A reassigned courier stays as a participant who left.",
        "required": ["id", "role", "number", "proxy_number", "joined_at", "left_at", "cooling_until"],
        "properties": {
            "id": {**UUID, "description": "Stable; the pseudonymous reference calls keep after retention."},
            "role": {"type": "string", "enum": ["courier", "client"]},
            "number": {
                "type": ["string", "null"],
                "description": "The real number, masked to its last two digits (`+***67`); null once the retention "
                "job removed it.",
                "examples": ["+***67"],
            },
            "proxy_number": {
                **E164,
                "description": "The pool number this participant dials to reach the other side, and sees the "
                "other side's calls come from.",
            },
            "joined_at": TIMESTAMP,
            "left_at": {**NULLABLE_TIMESTAMP, "description": "When they left (reassigned, or the session ended)."},
            "cooling_until": {
                **NULLABLE_TIMESTAMP,
                "description": "After leaving: until when their (real number, pool number) pair is kept from "
                "anyone else; they hear that the order finished if they call meanwhile.",
            },
        },
    },
    "Session": {
        "type": "object",
        "description": "The session of one order: a pool number between its courier and its client.",
        "required": [
            "id",
            "order_id",
            "status",
            "pool_number",
            "region",
            "participants",
            "created_at",
            "expires_at",
            "idle_timeout_seconds",
            "last_activity_at",
            "grace_seconds",
            "grace_until",
            "closed_at",
            "end_reason",
            "mode",
            "order_code",
            *Terms.names(),
        ],
        "properties": {
            "id": UUID,
            "order_id": {"type": "string", "description": "The order system's id of the order."},
            "status": {
                "type": "string",
                "enum": ["open", "grace", "closed"],
                "description": "`open`: the two can call each other. `grace`: closed with a grace period, the "
                "courier has left and the client can still reach support until `grace_until`. `closed`: ended. "
                "A session past its `expires_at` or idle timeout is ended by the housekeeping as that moment "
                "comes (its calls in progress with it); until then it may still read `open`, but no call is routed "
                "through it, and no change brings it back.",
            },
            "pool_number": {
                **E164,
                "description": "The pool number chosen at open (the client's `proxy_number`; a reassigned courier "
                "may have been given another).",
            },
            "region": {"type": ["string", "null"], "description": "The region asked for at open, if any."},
            "participants": {
                "type": "object",
                "description": "The current (latest) participant of each role; see the participants endpoint "
                "for everyone who took part.",
                "required": ["courier", "client"],
                "properties": {"courier": _ref("Participant"), "client": _ref("Participant")},
            },
            "created_at": TIMESTAMP,
            "expires_at": {**TIMESTAMP, "description": "When the session ends at the latest (while it is open)."},
            "idle_timeout_seconds": {
                "type": ["integer", "null"],
                "description": "The session ends after this long without a call or an extension (counted from the "
                "end of the last call; a call in progress keeps it open); null: never.",
            },
            "last_activity_at": {**TIMESTAMP, "description": "The last call's start or end, or the last extension."},
            "grace_seconds": {"type": "integer", "minimum": 0, "description": "The grace period used at close."},
            "grace_until": {**NULLABLE_TIMESTAMP, "description": "Set while the status is `grace`."},
            "closed_at": NULLABLE_TIMESTAMP,
            "end_reason": {
                "type": ["string", "null"],
                "enum": ["closed", "expired", "inactive", None],
                "description": "Why it ended (also set during `grace`); null while open.",
            },
            **_term_properties(),
            "mode": SESSION_MODE,
            "order_code": {
                "type": ["string", "null"],
                "pattern": ORDER_CODE_PATTERN,
                "description": "Mode `order_code`: the code the courier and the client key in after dialing the "
                "shared `pool_number` (tell them); unique among the live sessions on that number. Null in mode "
                "`direct`.",
                "examples": ["482913"],
            },
        },
    },
    "SessionList": _list_of("Session", "Sessions, newest first."),
    "ParticipantList": _list_of(
        "Participant", "Everyone who took part in the session, in joining order.", paginated=False
    ),
    "SessionEvent": {
        "type": "object",
        "description": "One change in a session's life.",
        "required": ["at", "kind", "detail", "token"],
        "properties": {
            "at": TIMESTAMP,
            "kind": {
                "type": "string",
                "enum": [
                    "opened",
                    "extended",
                    "courier_reassigned",
                    "grace_started",
                    "closed",
                    "expired",
                    "inactive",
                    "purged",
                    "blocked_by_client",
                ],
            },
            "detail": {
                "type": "object",
                "additionalProperties": True,
                "description": "By kind: `blocked_by_client` {participant: the blocked participant's id, by: "
                "the client's}; `opened` {pool_number, region, mode, ttl_seconds, idle_timeout_seconds, "
                "grace_seconds}; `extended` {ttl_seconds, idle_timeout_seconds}; `courier_reassigned` "
                "{previous, participant (participant ids), pool_number}; `grace_started` {grace_seconds}; "
                "`purged` {participants (how many real numbers were removed)}; `closed`, `expired`, "
                "`inactive`: {}. Sessions from before events were recorded have an empty `opened` and `closed`.",
            },
            "token": {
                "type": ["string", "null"],
                "description": "The name of the API token whose request made the change; null when "
                "maskbridge-admin or the bridge itself (expiry, the client's keypad, retention) made it.",
            },
        },
    },
    "SessionEventList": _list_of("SessionEvent", "The session's events, oldest first.", paginated=False),
    "Call": {
        "type": "object",
        "description": "One call attempt through a pool number. Participants appear by id only.",
        "required": [
            "id",
            "session_id",
            "pool_number",
            "caller_role",
            "caller_participant_id",
            "callee_role",
            "callee_participant_id",
            "state",
            "outcome",
            "hangup_by",
            "hangup_cause",
            "cut_reason",
            "started_at",
            "answered_at",
            "ended_at",
            "duration_seconds",
            *Terms.on_call_row_names(),
        ],
        "properties": {
            "id": UUID,
            "session_id": UUID,
            "pool_number": {**E164, "description": "The pool number that was dialed."},
            "caller_role": {"type": ["string", "null"], "enum": ["courier", "client", None]},
            "caller_participant_id": {"type": ["string", "null"], "format": "uuid"},
            "callee_role": {
                "type": ["string", "null"],
                "enum": ["courier", "client", "support", None],
                "description": "`support` for a client's call during a grace period; null when nobody was rung.",
            },
            "callee_participant_id": {"type": ["string", "null"], "format": "uuid"},
            "state": {
                "type": "string",
                "enum": list(STATES),
                "description": "`entering_code`: a call to an order-code number, whose caller is keying the code. "
                "`confirming`: the other phone answered and is asked to press 1 (`confirm_answer`); the caller "
                "still hears ringback.",
            },
            "outcome": {
                "type": ["string", "null"],
                "enum": [*OUTCOMES, None],
                "description": "Set once the call ended. `wrong_code`: a call to an order-code number ended "
                "after `MB_ORDER_CODE_ATTEMPTS` tries without a right code (the caller heard that there were too "
                "many). `locked_out`: the caller had keyed `MB_ORDER_CODE_ATTEMPTS` wrong codes on this number "
                "within `MB_ORDER_CODE_LOCKOUT` seconds, and was told to try later without being asked. "
                "A call to an order-code number has no session until a right code names it. `unreachable`: the "
                "network could not reach the other "
                "phone (cause 1, 3, 20 or 27; the caller is hung up with the same cause). `redirected`: the other "
                "phone's network answered with a redirect (302, cause 23), which the bridge never follows; the caller "
                "is hung up as unavailable (cause 20). `not_confirmed`: the other phone answered but did not "
                "press 1 in time (`confirm_answer`: a voicemail or an answering machine, never joined; the caller "
                "is hung up as no answer, cause 19); `rejected` is also the outcome when it pressed 2. "
                "`session_closed` is also the outcome of a call that was ringing when its courier was reassigned "
                "or its session ended (`cut_reason`). "
                "`call_limit` / `quiet_hours`: the session's abuse "
                "controls refused the call (the caller heard an announcement). `blocked`: the caller's number or "
                "the other side's is "
                "on the blocklist, so the call was refused (the caller heard an announcement), or it was ringing "
                "when one of them was blocked and the bridge ended it (`cut_reason` `blocked`). A connected call "
                "ended by a block keeps `answered`, with `cut_reason` `blocked`. `node_lost`: the Asterisk "
                "that carried the call died, or was stopped or restarted, under it; nobody hung up (`hangup_by` "
                "`system`, no cause).",
            },
            "hangup_by": {
                "type": ["string", "null"],
                "enum": [*HANGUP_BY, None],
                "description": "`system`: the bridge hung up (no answer in time, the end of an announcement, a "
                "failure, or a cut: see `cut_reason`), or Asterisk itself did (an operator hung a leg up, "
                "Asterisk stopped: `node_lost`).",
            },
            "hangup_cause": {"type": ["integer", "null"], "description": "The Q.850 cause, when known."},
            "cut_reason": {
                "type": ["string", "null"],
                "enum": [*CUT_REASONS, None],
                "description": "Why the bridge itself ended the call while it was ringing or connected "
                "(`hangup_by` is `system`): `blocked`, the number of the caller or of the other side was "
                "blocked; `max_duration`, the call reached the session's maximum duration (both parties "
                "heard a warning tone first); `blocked_by_client`, the client keyed `MB_BLOCK_KEYS` to block the "
                "other party for this order; `reassigned`, the courier on the call was replaced by another; "
                "`session_ended`, the session closed or expired (a client's call to support during a grace "
                "period goes on). Null for every other call.",
            },
            "started_at": TIMESTAMP,
            "answered_at": NULLABLE_TIMESTAMP,
            "ended_at": {**NULLABLE_TIMESTAMP, "description": "When the call ended: a phone's hangup as Asterisk "
                         "stamped it. For `node_lost`, when the bridge lost the call's Asterisk, or that node's "
                         "last heartbeat; for a call found after its Asterisk was started again, no later than "
                         "that start. Never before the call's start or answer."},
            "duration_seconds": {
                "type": ["number", "null"],
                "description": "Talk time, from answer to end; null unless the call was answered and has ended.",
            },
            # The session's terms the call was put through with (a recorded call: see
            # GET /v1/calls/{call_id}/recording; one that ended before it was connected has no
            # recording). A call routed nowhere has none (false, null).
            **_term_properties(Terms.on_call_row_names()),
        },
    },
    "Recording": {
        "type": "object",
        "description": "The recording of one call: the bridged call from after the consent announcement to its "
        "end, both parties mixed, in one file.",
        "required": [
            "id",
            "call_id",
            "session_id",
            "format",
            "started_at",
            "ended_at",
            "duration_ms",
            "bytes",
            "deleted_at",
        ],
        "properties": {
            "id": UUID,
            "call_id": UUID,
            "session_id": {"type": ["string", "null"], "format": "uuid"},
            "format": {"type": "string", "enum": ["wav"], "description": "WAV, 8 kHz 16-bit mono."},
            "started_at": TIMESTAMP,
            "ended_at": {**NULLABLE_TIMESTAMP, "description": "Null while the call is still being recorded."},
            "duration_ms": {"type": ["integer", "null"], "minimum": 0, "description": "Length of the audio."},
            "bytes": {"type": ["integer", "null"], "minimum": 0, "description": "Size of the WAV file."},
            "deleted_at": {
                **NULLABLE_TIMESTAMP,
                "description": "When retention deleted the audio (then the recording routes answer 410).",
            },
        },
    },
    "RecordingAccess": {
        "type": "object",
        "description": "One access to the recordings, as the audit keeps it: granted or not.",
        "required": ["id", "at", "recording_id", "call_id", "actor", "token", "remote", "action", "result", "status"],
        "properties": {
            "id": {"type": "integer"},
            "at": TIMESTAMP,
            "recording_id": {
                "type": ["string", "null"],
                "format": "uuid",
                "description": "Null when no recording was reached (denied, not found).",
            },
            "call_id": {"type": ["string", "null"], "format": "uuid", "description": "The call asked for."},
            "actor": {
                "type": "string",
                "enum": ["token", "invalid_token", "no_token", "retention"],
                "description": "What the request held: a valid `token` (named in `token`), a wrong, revoked or "
                "expired one, or none; `retention`: the housekeeping deleted the recording.",
            },
            "token": {
                "type": ["string", "null"],
                "description": "The name of the valid token the request held (never the secret): `env` "
                "(`MB_API_TOKEN`), `recording` (`MB_RECORDING_TOKEN`) or a token added with maskbridge-admin. "
                "Null for any other actor.",
            },
            "remote": {"type": ["string", "null"], "description": "The address the request came from."},
            "action": {"type": "string", "enum": ["metadata", "download", "audit", "delete"]},
            "result": {"type": "string", "enum": ["granted", "denied", "not_found", "gone", "failed"]},
            "status": {"type": "integer", "description": "The HTTP status answered."},
        },
    },
    "RecordingAccessList": _list_of("RecordingAccess", "The audit, newest first."),
    "CallList": {
        **_list_of("Call", "Calls, oldest first."),
        "properties": {
            **_list_of("Call", "")["properties"],
            "session_id": {**UUID, "description": "The session asked for (calls of one session)."},
            "order_id": {"type": "string", "description": "The order asked for (calls of one order)."},
        },
    },
    "PoolNumber": {
        "type": "object",
        "description": "A number of the pool, with its load.",
        "required": [
            "number",
            "region",
            "language",
            "mode",
            "state",
            "live_sessions",
            "cooling_pairs",
            "cooling_until",
            "state_changed_at",
            "created_at",
        ],
        "properties": {
            "number": E164,
            "region": {"type": ["string", "null"]},
            "language": {
                "type": ["string", "null"],
                "enum": [*LANGUAGES, None],
                "description": "Language of the announcements its callers hear; null: `MB_DEFAULT_LANGUAGE`.",
            },
            "mode": POOL_MODE,
            "state": {
                "type": "string",
                "enum": list(POOL_STATES),
                "description": "`active`: handed out to new sessions. `cooling`: retired, but live sessions keep "
                "it and former participants still hear that their order finished, until `cooling_until` (and "
                "its last live session). `retired`: out of use.",
            },
            "live_sessions": {"type": "integer", "minimum": 0, "description": "Live sessions it serves."},
            "cooling_pairs": {
                "type": "integer",
                "minimum": 0,
                "description": "(real number, this number) pairs in cool-off.",
            },
            "cooling_until": {**NULLABLE_TIMESTAMP, "description": "Set while the state is `cooling`."},
            "state_changed_at": TIMESTAMP,
            "created_at": TIMESTAMP,
        },
    },
    "PoolNumberList": _list_of("PoolNumber", "Pool numbers, in ascending order of number."),
    "PoolUsage": {
        "type": "object",
        "description": "Utilisation of the pool, per region.",
        "required": ["regions"],
        "properties": {"regions": {"type": "array", "items": _ref("PoolUsageRegion")}},
    },
    "PoolUsageRegion": {
        "type": "object",
        "description": "One region's numbers (the numbers without a region first, as region null).",
        "required": [
            "region",
            "active",
            "cooling",
            "retired",
            "live_sessions",
            "cooling_pairs",
            "busiest_number_sessions",
        ],
        "properties": {
            "region": {"type": ["string", "null"]},
            "active": {"type": "integer", "minimum": 0, "description": "Numbers in state active."},
            "cooling": {"type": "integer", "minimum": 0, "description": "Numbers in state cooling."},
            "retired": {"type": "integer", "minimum": 0, "description": "Numbers in state retired."},
            "live_sessions": {"type": "integer", "minimum": 0, "description": "Live participants on its numbers."},
            "cooling_pairs": {"type": "integer", "minimum": 0, "description": "Pairs in cool-off on its numbers."},
            "busiest_number_sessions": {
                "type": "integer",
                "minimum": 0,
                "description": "Live participants on its busiest number.",
            },
        },
    },
    "ImportResult": {
        "type": "object",
        "description": "What an import did, by number.",
        "required": ["added", "updated", "reactivated", "unchanged"],
        "additionalProperties": False,
        "properties": {
            "added": {"type": "integer", "minimum": 0, "description": "New numbers."},
            "updated": {"type": "integer", "minimum": 0, "description": "Active numbers whose region changed."},
            "reactivated": {
                "type": "integer",
                "minimum": 0,
                "description": "Cooling or retired numbers made active again (their region set as given).",
            },
            "unchanged": {"type": "integer", "minimum": 0, "description": "Active numbers already as given."},
        },
    },
    "BlockedNumber": {
        "type": "object",
        "description": "A real number on the blocklist: its calls are refused on every session.",
        "required": ["id", "number", "reason", "created_at", "expires_at"],
        "properties": {
            "id": {**UUID, "description": "The entry's id: unblock with it."},
            "number": {
                "type": ["string", "null"],
                "description": "The blocked real number, masked (`+***67`: the last two digits only); null when "
                "its stored form does not open (damaged: the block holds all the same).",
                "examples": ["+***67"],
            },
            "reason": {"type": ["string", "null"], "description": "As given when it was blocked; null: none."},
            "created_at": {**TIMESTAMP, "description": "When it was blocked."},
            "expires_at": {
                **TIMESTAMP,
                "type": ["string", "null"],
                "description": "When the block ends by itself (`ttl_seconds`): from then on it blocks nothing and "
                "is no longer listed. Null: until unblocked.",
            },
        },
    },
    "BlockedNumberList": _list_of("BlockedNumber", "Blocked numbers, oldest first."),
    "HealthStatus": {
        "type": "object",
        "description": "Each dependency: true when reachable.",
        "required": ["ari", "database"],
        "properties": {
            "ari": {"type": "boolean", "description": "The Asterisk ARI event stream is connected."},
            "database": {"type": "boolean", "description": "PostgreSQL answers."},
        },
    },
    "PoolNumberEntry": {
        "type": "object",
        "additionalProperties": False,
        "required": ["number"],
        "properties": {
            "number": {
                "type": "string",
                "maxLength": MAX_PHONE_NUMBER_LENGTH,
                "pattern": PHONE_NUMBER_PATTERN,
                "description": "The number: E.164, or national form in the bridge's default region "
                "(`MB_DEFAULT_REGION`).",
                "examples": ["+74950000001"],
            },
            "region": {**REGION, "type": ["string", "null"], "description": "Null or left out: no region."},
            "language": {
                "type": ["string", "null"],
                "enum": [*LANGUAGES, None],
                "description": "The language callers of this number hear announcements in; null or left out: "
                "`MB_DEFAULT_LANGUAGE`.",
            },
            "mode": {
                **POOL_MODE,
                "type": ["string", "null"],
                "enum": [*MODES, None],
                "description": "Null or left out: a new number is `direct`, a known one keeps its mode. The mode "
                "of a number someone holds (live sessions, pairs cooling off) cannot change: a bad row.",
            },
        },
        "description": "An entry that is not an object, lacks `number` or has any other key is a bad row "
        "(`invalid_import`).",
    },
    **_request_schemas(),
}

# --- paths ----------------------------------------------------------------------------------

UNAUTHORIZED = _response_ref("Unauthorized")
INTERNAL = _response_ref("InternalError")
BAD_BODY = _response_ref("BadBody")
TOO_LARGE = _response_ref("BodyTooLarge")
SESSION_NOT_FOUND = _response_ref("SessionNotFound")
SESSION_ENDED = (SessionEnded.code, "only an open session can be extended: the session is closed", None)
ORDER_HAS_OPEN_SESSION = (
    OrderHasOpenSession.code,
    OrderHasOpenSession.message,
    {"session_id": "5f0c6d3e-8a51-4c1e-9d0b-3f7a2b1c9e42"},
)
DESTINATION_NOT_ALLOWED = (
    DestinationNotAllowed.code,
    "client_number is a premium-rate or international-network number",
    {"field": "client_number"},
)
CONTENTION = (Contention.code, "too many opens raced for the same numbers; try again", None)
POOL_EXHAUSTED = (
    PoolExhausted.code,
    "the pool is exhausted for this pair: every one of the 3 active numbers is held by the courier or the client "
    "(live or cooling off). For participants with at most 2 live sessions each, 3 numbers always suffice; this "
    "pair needs at least 4 with its cool-offs",
    {
        "active_numbers": 3,
        "courier_holds": {"live": 1, "cooling": 1},
        "client_holds": {"live": 1, "cooling": 0},
        "numbers_needed": 4,
    },
)

SESSION_EXAMPLE: dict[str, Any] = {
    "id": "5f0c6d3e-8a51-4c1e-9d0b-3f7a2b1c9e42",
    "order_id": "A-1042",
    "status": "open",
    "pool_number": "+74950000001",
    "region": "RU-MOW",
    "participants": {
        "courier": {
            "id": "0b7e1f0a-7d1c-4f7e-a7a4-5a1d2c3b4e5f",
            "role": "courier",
            "number": "+***67",
            "proxy_number": "+74950000001",
            "joined_at": "2025-05-12T10:00:00+00:00",
            "left_at": None,
            "cooling_until": None,
        },
        "client": {
            "id": "9c2d4e6f-1a3b-4c5d-8e7f-0a1b2c3d4e5f",
            "role": "client",
            "number": "+***68",
            "proxy_number": "+74950000001",
            "joined_at": "2025-05-12T10:00:00+00:00",
            "left_at": None,
            "cooling_until": None,
        },
    },
    "created_at": "2025-05-12T10:00:00+00:00",
    "expires_at": "2025-05-13T10:00:00+00:00",
    "idle_timeout_seconds": None,
    "last_activity_at": "2025-05-12T10:00:00+00:00",
    "grace_seconds": 0,
    "grace_until": None,
    "closed_at": None,
    "end_reason": None,
    "calls_per_hour": None,
    "calls_per_day": None,
    "quiet_hours": {"from": "22:00", "to": "08:00", "timezone": "Europe/Moscow"},
    "max_call_seconds": None,
    "record": False,
    "mode": "direct",
    "order_code": None,
}


BLOCK_EXAMPLE: dict[str, Any] = {
    "id": "3d6f8a2c-4b1e-4f9a-9c7d-2e5b8a1f0c64",
    "number": "+***67",
    "reason": "abusive calls to couriers",
    "created_at": "2025-05-12T11:30:00+00:00",
    "expires_at": None,
}


def _invalid(description: str, **examples: tuple[str, str, dict[str, Any] | None]) -> Schema:
    return _error_response(description, dict(examples))


PATHS: dict[str, Schema] = {
    "/healthz": {
        "get": {
            "operationId": "getHealth",
            "tags": ["service"],
            "summary": "Health of the bridge",
            "description": ("Whether the bridge reaches Asterisk (ARI: its event stream is connected and Asterisk "
                            "answers a ping) and PostgreSQL, each within 2 s. No token needed."),
            "security": [],
            "responses": {
                "200": _json_response("Both reachable.", _ref("HealthStatus"), {"ari": True, "database": True}),
                "503": _json_response(
                    "At least one is not reachable (the body says which; it is not an Error).",
                    _ref("HealthStatus"),
                    {"ari": False, "database": True},
                ),
                "500": INTERNAL,
            },
        }
    },
    "/v1/openapi.json": {
        "get": {
            "operationId": "getOpenApiDocument",
            "tags": ["service"],
            "summary": "This document",
            "description": "The OpenAPI 3.1 document of this API. No token needed.",
            "security": [],
            "responses": {
                "200": _json_response("The OpenAPI document.", {"type": "object"}),
                "500": INTERNAL,
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "getMetrics",
            "tags": ["service"],
            "summary": "Prometheus metrics",
            "description": "The bridge's metrics in Prometheus' text format (families `maskbridge_*`, plus the "
            "process's own): calls by outcome and direction, calls in progress, post-dial delay, route lookups, ARI, "
            "the database pool, webhooks, pool numbers per region, retention. No label holds a real number, an "
            "order id or an order code. No token needed: keep the API's address private (README: Production).",
            "security": [],
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "500": INTERNAL,
            },
        }
    },
    "/v1/sessions": {
        "post": {
            "operationId": "openSession",
            "tags": ["sessions"],
            "summary": "Open the session of an order",
            "description": "Chooses a pool number free for both the courier and the client (the number the same "
            "pair had last time if it is free, then one of the requested region, then the least loaded) and "
            "returns it: each one dials it to reach the other, and sees the other's calls come from it.\n\n"
            "Idempotent by `order_id`: while the order has an open session naming the same courier (its current "
            "one, after a reassignment) and the same client, that session is returned with 200 and nothing "
            "changes; numbers count as the same when they read as the same number (`89161234567` and "
            "`+79161234567`). The terms of the request (region, seconds) are checked, but not compared with the "
            "session's. An open session naming another courier or client number is a bug of the caller: 409 "
            "`order_has_open_session`, the same answer whichever number differs (so that it cannot tell "
            "whether a number is in an order); to change the courier, reassign it. An open session found past "
            "its expiry or idle timeout is ended first, and a new one is opened. The whole request is checked "
            "before anything is written.\n\n"
            "With `mode` `order_code`, the session gets a shared order-code number instead (one of the "
            "requested region if there is one, then the least loaded) and an `order_code` (the order system's, "
            "or a random one), returned here and in every view of the session. Many orders share the number; "
            "callers key the code after dialing, and are put through when they are a participant of the "
            "session with that code.\n\n"
            "Errors: 400 `invalid_json`; 401 `unauthorized`; 409 `order_has_open_session` (`details.session_id`), "
            "`pool_exhausted` (with details), `order_code_taken`, `contention`; 413 "
            "`body_too_large`; 422 `invalid_input` (`details.field`), `unknown_region`, `destination_not_allowed` "
            "(`details.field`); 500 `internal_error`.",
            "requestBody": _json_request("OpenSessionRequest"),
            "responses": {
                "201": _json_response("The session was opened.", _ref("Session"), SESSION_EXAMPLE, SESSION_LINKS),
                "200": _json_response(
                    "The order already had an open session with the same numbers: here it is, unchanged.",
                    _ref("Session"),
                    links=SESSION_LINKS,
                ),
                "400": BAD_BODY,
                "401": UNAUTHORIZED,
                "409": _invalid(
                    "`order_has_open_session`: the order has an open session that the request does not match "
                    "(another courier, client, mode or order code: the answer does not say which; "
                    "`details.session_id` is the session). `pool_exhausted`: "
                    "every active pool number is held by the courier or the client (live, or cooling off); "
                    "`details` says how many numbers the pair needs. `contention`: too many opens raced for the "
                    "same numbers; retry. `order_code_taken`: every order-code number has a live session with "
                    "the `order_code` given.",
                    order_has_open_session=ORDER_HAS_OPEN_SESSION,
                    pool_exhausted=POOL_EXHAUSTED,
                    contention=CONTENTION,
                    order_code_taken=(
                        OrderCodeTaken.code,
                        "every order-code number has a live session with this order_code; give another",
                        {"field": "order_code"},
                    ),
                ),
                "413": TOO_LARGE,
                "422": _invalid(
                    "`invalid_input`: a field is missing, unknown or out of range (`details.field` names it), "
                    "the two numbers are the same, or a grace period was asked for without a support number. "
                    "`unknown_region`: no pool number has the requested region. `destination_not_allowed`: a "
                    "number is outside `MB_ALLOWED_DESTINATIONS`, or premium-rate or of an international network "
                    "(never allowed); `details.field` names it.",
                    destination_not_allowed=DESTINATION_NOT_ALLOWED,
                    invalid_input=(
                        InvalidInput.code,
                        "courier_number is not a valid phone number: not a phone number",
                        {"field": "courier_number"},
                    ),
                    unknown_region=(UnknownRegion.code, "no pool number is in region RU-SPE", {"field": "region"}),
                    order_code=(
                        InvalidInput.code,
                        "order_code must be exactly 6 digits (0-9)",
                        {"field": "order_code"},
                    ),
                ),
                "500": INTERNAL,
            },
        },
        "get": {
            "operationId": "listSessions",
            "tags": ["sessions"],
            "summary": "List sessions",
            "description": "Sessions, newest first, optionally of one order and/or in one status. Paginated by "
            "cursor.\n\nErrors: 401 `unauthorized`; 422 `invalid_input` (`limit`, `cursor`, `status`); 500 "
            "`internal_error`.",
            "parameters": [
                *PAGE_PARAMETERS,
                {
                    "name": "order_id",
                    "in": "query",
                    "required": False,
                    "description": "Only the sessions of this order.",
                    "schema": {"type": "string"},
                },
                {
                    "name": "status",
                    "in": "query",
                    "required": False,
                    "description": "Only sessions in this status.",
                    "schema": {"type": "string", "enum": ["open", "grace", "closed"]},
                },
            ],
            "responses": {
                "200": _json_response("A page of sessions.", _ref("SessionList")),
                "401": UNAUTHORIZED,
                "422": _response_ref("InvalidPage"),
                "500": INTERNAL,
            },
        },
    },
    "/v1/sessions/{session_id}": {
        "parameters": SESSION_PARAMETERS,
        "get": {
            "operationId": "getSession",
            "tags": ["sessions"],
            "summary": "Get a session",
            "description": "Errors: 401 `unauthorized`; 404 `session_not_found`; 500 `internal_error`.",
            "responses": {
                "200": _json_response("The session.", _ref("Session"), SESSION_EXAMPLE),
                "401": UNAUTHORIZED,
                "404": SESSION_NOT_FOUND,
                "500": INTERNAL,
            },
        },
    },
    "/v1/sessions/{session_id}/extend": {
        "parameters": SESSION_PARAMETERS,
        "post": {
            "operationId": "extendSession",
            "tags": ["sessions"],
            "summary": "Extend an open session",
            "description": "Sets a new end (`ttl_seconds` from now) and/or a new idle timeout, and counts as "
            "activity. Only an open session can be extended: one found past its expiry or idle timeout is "
            "ended (not revived) and refused.\n\nErrors: 400 `invalid_json`; 401 `unauthorized`; 404 "
            "`session_not_found`; 409 `session_ended`; 413 `body_too_large`; 422 `invalid_input`; 500 "
            "`internal_error`.",
            "requestBody": _json_request("ExtendRequest"),
            "responses": {
                "200": _json_response("The session as extended.", _ref("Session")),
                "400": BAD_BODY,
                "401": UNAUTHORIZED,
                "404": SESSION_NOT_FOUND,
                "409": _invalid(
                    "`session_ended`: the session is in grace or closed, or was past its expiry or idle timeout "
                    "(it is ended now).",
                    session_ended=SESSION_ENDED,
                ),
                "413": TOO_LARGE,
                "422": _invalid(
                    "`invalid_input`: neither field given, a field out of range, or an unknown field "
                    "(`details.field` names it).",
                    invalid_input=(
                        InvalidInput.code,
                        "give ttl_seconds, idle_timeout_seconds or both",
                        {"field": "ttl_seconds"},
                    ),
                ),
                "500": INTERNAL,
            },
        },
    },
    "/v1/sessions/{session_id}/close": {
        "parameters": SESSION_PARAMETERS,
        "post": {
            "operationId": "closeSession",
            "tags": ["sessions"],
            "summary": "Close a session",
            "description": "Ends the order's session. With a grace period (given here, or set at open) an open "
            "session goes to `grace`: the courier leaves at once, and the client can still reach support "
            "through the pool number until `grace_until`, when the session closes. Closing a session in grace "
            "closes it at once; closing a closed session changes nothing and returns it. Participants who "
            "leave keep their pair of numbers from anyone else for the cool-off (`MB_PAIR_COOLOFF`).\n\n"
            "Errors: 400 `invalid_json`; 401 `unauthorized`; 404 `session_not_found`; 413 `body_too_large`; "
            "422 `invalid_input`; 500 `internal_error`.",
            "requestBody": _json_request("CloseRequest", required=False),
            "responses": {
                "200": _json_response("The session, in grace or closed.", _ref("Session")),
                "400": BAD_BODY,
                "401": UNAUTHORIZED,
                "404": SESSION_NOT_FOUND,
                "413": TOO_LARGE,
                "422": _invalid(
                    "`invalid_input`: `grace_seconds` out of range, an unknown field, or a grace period without "
                    "a support number configured.",
                    invalid_input=(
                        InvalidInput.code,
                        "a grace period needs a support number (MB_SUPPORT_NUMBER)",
                        {"field": "grace_seconds"},
                    ),
                ),
                "500": INTERNAL,
            },
        },
    },
    "/v1/sessions/{session_id}/participants": {
        "parameters": SESSION_PARAMETERS,
        "get": {
            "operationId": "listParticipants",
            "tags": ["participants"],
            "summary": "List a session's participants",
            "description": "Everyone who took part, in joining order, including reassigned couriers (with "
            "`left_at`). Not paginated: `next_cursor` is always null.\n\nErrors: 401 `unauthorized`; 404 "
            "`session_not_found`; 500 `internal_error`.",
            "responses": {
                "200": _json_response("The participants.", _ref("ParticipantList")),
                "401": UNAUTHORIZED,
                "404": SESSION_NOT_FOUND,
                "500": INTERNAL,
            },
        },
        "post": {
            "operationId": "reassignCourier",
            "tags": ["participants"],
            "summary": "Reassign the order to a new courier",
            "description": "The current courier leaves (their pair cools off) and the new one joins. The client "
            "keeps their number; the new courier gets the session's pool number when it is free for them, "
            "another one otherwise (see `participants.courier.proxy_number`). Only an open session can be "
            "reassigned: one found past its expiry or idle timeout is ended (not revived) and refused. Answers "
            "with the whole session: 201 when the courier changed, 200 when the number already was the current "
            "courier's (nothing changes).\n\nChecked in this order: the session exists (404), the body (400, "
            "413, 422 for `role` or an unknown field), the number is a phone number (422), the session is open "
            "(409), the number is not the client's (422).\n\n"
            "Errors: 400 `invalid_json`; 401 `unauthorized`; 404 `session_not_found`; 409 `session_ended`, "
            "`pool_exhausted`, `contention`; 413 `body_too_large`; 422 `invalid_input` (a `role` other than "
            "`courier`, a bad number or the client's number with `details.field` `number`, an unknown field), "
            "`destination_not_allowed` (the number is outside `MB_ALLOWED_DESTINATIONS`); 500 `internal_error`.",
            "requestBody": _json_request("AddParticipantRequest"),
            "responses": {
                "201": _json_response("The session, with its new courier.", _ref("Session")),
                "200": _json_response(
                    "The number already was the current courier's: the session, unchanged.", _ref("Session")
                ),
                "400": BAD_BODY,
                "401": UNAUTHORIZED,
                "404": SESSION_NOT_FOUND,
                "409": _invalid(
                    "`session_ended`: the session is in grace or closed, or was past its expiry or idle timeout "
                    "(it is ended now). `pool_exhausted`: no pool number is free for the new courier. "
                    "`contention`: concurrent changes raced; retry.",
                    session_ended=(
                        SessionEnded.code,
                        "only an open session can be reassigned: the session is closed",
                        None,
                    ),
                    pool_exhausted=POOL_EXHAUSTED,
                    contention=(Contention.code, "too many changes raced for the same numbers; try again", None),
                ),
                "413": TOO_LARGE,
                "422": _invalid(
                    "`invalid_input`: `role` is not `courier`, the number is not valid or is the client's "
                    "(`details.field` is `number`), or an unknown field. `destination_not_allowed`: the number is "
                    "outside `MB_ALLOWED_DESTINATIONS`, or premium-rate or of an international network.",
                    destination_not_allowed=(
                        DestinationNotAllowed.code,
                        "number is outside the number ranges this bridge serves (MB_ALLOWED_DESTINATIONS)",
                        {"field": "number"},
                    ),
                    role=(
                        InvalidInput.code,
                        "only the courier can be replaced: the client keeps their number",
                        {"field": "role"},
                    ),
                    number=(
                        InvalidInput.code,
                        "number is not a valid phone number: not a phone number",
                        {"field": "number"},
                    ),
                ),
                "500": INTERNAL,
            },
        },
    },
    "/v1/sessions/{session_id}/events": {
        "parameters": SESSION_PARAMETERS,
        "get": {
            "operationId": "listSessionEvents",
            "tags": ["sessions"],
            "summary": "A session's history",
            "description": "Every change of the session, oldest first. Not paginated: `next_cursor` is always "
            "null.\n\nErrors: 401 `unauthorized`; 404 `session_not_found`; 500 `internal_error`.",
            "responses": {
                "200": _json_response("The events.", _ref("SessionEventList")),
                "401": UNAUTHORIZED,
                "404": SESSION_NOT_FOUND,
                "500": INTERNAL,
            },
        },
    },
    "/v1/sessions/{session_id}/calls": {
        "parameters": SESSION_PARAMETERS,
        "get": {
            "operationId": "listSessionCalls",
            "tags": ["calls"],
            "summary": "A session's calls",
            "description": "Call attempts through the session's numbers, oldest first. Paginated by cursor.\n\n"
            "Errors: 401 `unauthorized`; 404 `session_not_found`; 422 `invalid_input` (`limit`, `cursor`); "
            "500 `internal_error`.",
            "parameters": PAGE_PARAMETERS,
            "responses": {
                "200": _json_response(
                    "A page of calls, with the session's id.",
                    {"allOf": [_ref("CallList"), {"required": ["session_id"]}]},
                ),
                "401": UNAUTHORIZED,
                "404": SESSION_NOT_FOUND,
                "422": _response_ref("InvalidPage"),
                "500": INTERNAL,
            },
        },
    },
    "/v1/calls": {
        "get": {
            "operationId": "listOrderCalls",
            "tags": ["calls"],
            "summary": "An order's calls",
            "description": "Call attempts of every session of the order (a reopened order has several), oldest "
            "first, however many sessions it had. An order without sessions has no calls (not an error). "
            "Paginated by cursor.\n\nErrors: 401 `unauthorized`; 422 `invalid_input` "
            "(`order_id` missing, `limit`, `cursor`); 500 `internal_error`.",
            "parameters": [
                {
                    "name": "order_id",
                    "in": "query",
                    "required": True,
                    "description": "The order.",
                    "schema": {"type": "string", "minLength": 1},
                },
                *PAGE_PARAMETERS,
            ],
            "responses": {
                "200": _json_response(
                    "A page of calls, with the order's id.",
                    {"allOf": [_ref("CallList"), {"required": ["order_id"]}]},
                ),
                "401": UNAUTHORIZED,
                "422": _invalid(
                    "`invalid_input`: `order_id` is missing, or `limit` or `cursor` is bad (`details.field` names it).",
                    order_id=(InvalidInput.code, "order_id is required", {"field": "order_id"}),
                    limit=(InvalidInput.code, f"limit must be a whole number from 1 to {MAX_PAGE}", {"field": "limit"}),
                    cursor=(InvalidInput.code, "cursor is not one this API gave out", {"field": "cursor"}),
                ),
                "500": INTERNAL,
            },
        },
    },
    "/v1/pool-numbers": {
        "post": {
            "operationId": "importPoolNumbers",
            "tags": ["pool-numbers"],
            "summary": "Import pool numbers",
            "description": "Adds numbers to the pool, or updates the region of known ones; a cooling or retired "
            "number is made active again. All or nothing: one bad row rejects the whole import, and the error "
            f"lists the bad rows. At most {MAX_IMPORT} numbers and {IMPORT_BODY_LIMIT} bytes per import.\n\n"
            "The body is CSV when the content type is `text/csv` or `text/plain` (UTF-8, optionally starting "
            "with a byte order mark), JSON otherwise. A number without a region has none (there is no default "
            "region for imports).\n\n"
            "Errors: 400 `invalid_json`; 401 `unauthorized`; 413 `body_too_large`; 422 `invalid_import` "
            "(`details.problems`), `invalid_input` (no numbers, too many, `numbers` not a list, CSV not UTF-8, "
            "an unknown field); 500 `internal_error`.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": _ref("ImportPoolNumbersRequest"),
                        "example": {
                            "numbers": [
                                {"number": "+74950000001", "region": "RU-MOW"},
                                {"number": "+78120000001", "region": "RU-SPE"},
                            ]
                        },
                    },
                    "text/csv": {
                        # (No "type": a text body is text whatever its characters; a fuzzer told
                        # "string" sends 1829096640 as a "non-string" and expects it refused.)
                        "schema": {
                            "minLength": 1,
                            "description": "UTF-8, optionally starting with a byte order mark. "
                            "`number[,region[,language[,mode]]]` per line; an optional first line naming the "
                            "columns (`number,region,language,mode`); blank lines and lines starting with `#` are "
                            "skipped; an empty or missing region means none, an empty or missing language or mode "
                            "as in the JSON entries; further columns are ignored. Errors name the line.",
                        },
                        "example": "number,region,language,mode\n+74950000001,RU-MOW\n# no region:\n+74950000002\n"
                        "# shared, callers key an order code:\n+74950000003,RU-MOW,ru,order_code\n",
                    },
                    "text/plain": {
                        "schema": {"minLength": 1, "description": "The same CSV as `text/csv`."},
                    },
                },
            },
            "responses": {
                "201": _json_response(
                    "Something was added or reactivated.",
                    _ref("ImportResult"),
                    {"added": 2, "updated": 0, "reactivated": 0, "unchanged": 0},
                ),
                "200": _json_response("Nothing was added or reactivated.", _ref("ImportResult")),
                "400": _invalid(
                    "`invalid_json`: a JSON body that is not a JSON object.",
                    invalid_json=(InvalidJson.code, "the body must be a JSON object", None),
                ),
                "401": UNAUTHORIZED,
                "413": _too_large(IMPORT_BODY_LIMIT),
                "422": _invalid(
                    "`invalid_import`: some rows are bad; nothing was imported. `invalid_input`: the body as a "
                    "whole is unusable.",
                    invalid_import=(
                        InvalidImport.code,
                        "nothing was imported: line 3: not a valid phone number (not a phone number); line 5: "
                        "region must look like RU or RU-MOW (ISO 3166)",
                        {"problems": 2},
                    ),
                    invalid_input=(InvalidInput.code, "no numbers to import", {"field": "numbers"}),
                ),
                "500": INTERNAL,
            },
        },
        "get": {
            "operationId": "listPoolNumbers",
            "tags": ["pool-numbers"],
            "summary": "List pool numbers",
            "description": "Pool numbers with their load, in ascending order of number, optionally of one region "
            "and/or in one state. Paginated by cursor.\n\nErrors: 401 `unauthorized`; 422 `invalid_input` "
            "(`limit`, `cursor`, `state`); 500 `internal_error`.",
            "parameters": [
                *PAGE_PARAMETERS,
                {
                    "name": "region",
                    "in": "query",
                    "required": False,
                    "description": "Only numbers of this region (compared as given; not checked).",
                    "schema": {"type": "string"},
                },
                {
                    "name": "state",
                    "in": "query",
                    "required": False,
                    "description": "Only numbers in this state.",
                    "schema": {"type": "string", "enum": list(POOL_STATES)},
                },
            ],
            "responses": {
                "200": _json_response("A page of pool numbers.", _ref("PoolNumberList")),
                "401": UNAUTHORIZED,
                "422": _response_ref("InvalidPage"),
                "500": INTERNAL,
            },
        },
    },
    "/v1/pool-numbers/{number}": {
        "parameters": NUMBER_PARAMETERS,
        "get": {
            "operationId": "getPoolNumber",
            "tags": ["pool-numbers"],
            "summary": "Get a pool number",
            "description": "Errors: 401 `unauthorized`; 404 `pool_number_not_found`; 422 `invalid_input` (not a "
            "phone number; `details.field` is `number`); 500 `internal_error`.",
            "responses": {
                "200": _json_response("The pool number, with its load.", _ref("PoolNumber")),
                "401": UNAUTHORIZED,
                "404": _response_ref("PoolNumberNotFound"),
                "422": _response_ref("InvalidPoolNumber"),
                "500": INTERNAL,
            },
        },
        "patch": {
            "operationId": "updatePoolNumber",
            "tags": ["pool-numbers"],
            "summary": "Set a pool number's mode",
            "description": "`direct`: calls are routed by the caller's number (one holder per caller and "
            "number), and the allocator hands the number to direct sessions. `order_code`: the number is shared "
            "by any number of order-code sessions; callers key the order's code, and the direct allocator never "
            "hands it out. The mode can change only while nobody holds the number (no live session, no pair "
            "cooling off): 409 `pool_number_in_use` otherwise. Setting the mode it has changes nothing.\n\n"
            "Errors: 400 `invalid_json`; 401 `unauthorized`; 404 `pool_number_not_found`; 409 "
            "`pool_number_in_use`; 413 `body_too_large`; 422 `invalid_input` (not a phone number, `mode` missing "
            "or not a mode, an unknown field; `details.field` names it); 500 `internal_error`.",
            "requestBody": _json_request("UpdatePoolNumberRequest"),
            "responses": {
                "200": _json_response("The pool number, in its new mode.", _ref("PoolNumber")),
                "400": BAD_BODY,
                "401": UNAUTHORIZED,
                "404": _response_ref("PoolNumberNotFound"),
                "409": _invalid(
                    "`pool_number_in_use`: someone holds the number.",
                    pool_number_in_use=(
                        PoolNumberInUse.code,
                        "the number is in use (live sessions, or pairs cooling off): its mode can change once "
                        "nobody holds it",
                        {"live_sessions": 2, "cooling_pairs": 0},
                    ),
                ),
                "413": TOO_LARGE,
                "422": _invalid(
                    "`invalid_input`: the number is not a phone number, or `mode` is missing or not a mode.",
                    mode=(InvalidInput.code, "mode must be one of direct, order_code", {"field": "mode"}),
                    number=(
                        InvalidInput.code,
                        "pool number: not a valid phone number (not a phone number)",
                        {"field": "number"},
                    ),
                ),
                "500": INTERNAL,
            },
        },
    },
    "/v1/pool-numbers/{number}/retire": {
        "parameters": NUMBER_PARAMETERS,
        "post": {
            "operationId": "retirePoolNumber",
            "tags": ["pool-numbers"],
            "summary": "Retire a pool number",
            "description": "Stops handing the number out to new sessions. It goes to `cooling` for "
            "`MB_NUMBER_COOLING` (7 days by default): live sessions keep it and former participants still hear "
            "that their order finished; then, once no live session uses it, it is `retired`. Retiring a number "
            "that is not active changes nothing. Importing it again makes it active. No body.\n\nErrors: 401 "
            "`unauthorized`; 404 `pool_number_not_found`; 422 `invalid_input` (not a phone number; "
            "`details.field` is `number`); 500 `internal_error`.",
            "responses": {
                "200": _json_response("The pool number, now cooling (or as it was).", _ref("PoolNumber")),
                "401": UNAUTHORIZED,
                "404": _response_ref("PoolNumberNotFound"),
                "422": _response_ref("InvalidPoolNumber"),
                "500": INTERNAL,
            },
        },
    },
    "/v1/blocklist": {
        "post": {
            "operationId": "blockNumber",
            "tags": ["blocklist"],
            "summary": "Block a real number",
            "description": "Puts a real number on the blocklist, for every session, at once:\n\n"
            "* calls from it are refused on every session it takes part in: the caller hears an announcement "
            "that the call cannot be completed, and the call's `outcome` is `blocked`;\n"
            "* calls to it are refused the same way (the other participant of its sessions hears the "
            "announcement);\n"
            "* its calls in progress, ringing or connected, are ended by the bridge (`hangup_by` `system`, "
            "`cut_reason` `blocked`; `outcome` `blocked` for a ringing call, `answered` for a connected one).\n\n"
            "Sessions are not changed: they stay open, and new ones can still be opened for the number; only "
            "its calls are refused, until it is unblocked, or until `expires_at` when the block was given "
            "`ttl_seconds` (an expired block blocks nothing from that moment on, whenever housekeeping deletes "
            "it). Blocks made with `maskbridge-admin` act the same.\n\n"
            "Idempotent by number: a number already blocked (in any form that reads as the same number) answers "
            "200 with its entry (the `reason` given is not stored; the expiry becomes the later of the entry's "
            "and the request's, null being the latest: blocking again never shortens a block), and any call of "
            "it still in progress is ended again. A number whose block expired is blocked anew: 201, a new "
            "entry.\n\n"
            "Errors: 400 `invalid_json`; 401 `unauthorized`; 413 `body_too_large`; 422 `invalid_input` (`number` "
            "missing or not a phone number, `reason` not text of at most "
            f"{BLOCK_REASON_MAX} characters without control characters, `ttl_seconds` out of range, an unknown "
            "field; `details.field` names it); 500 `internal_error`.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": _ref("BlockNumberRequest"),
                        "example": {"number": "+79161234567", "reason": "abusive calls to couriers",
                                    "ttl_seconds": 604800},
                    }
                },
            },
            "responses": {
                "201": _json_response("The number was blocked: its new entry.", _ref("BlockedNumber"), BLOCK_EXAMPLE),
                "200": _json_response(
                    "The number was blocked already: its entry (its expiry the later of the two).",
                    _ref("BlockedNumber"),
                ),
                "400": BAD_BODY,
                "401": UNAUTHORIZED,
                "413": TOO_LARGE,
                "422": _invalid(
                    "`invalid_input`: `number` is missing or not a phone number, `reason` is not text of at most "
                    f"{BLOCK_REASON_MAX} characters without control characters, `ttl_seconds` is out of range, "
                    "or a field is unknown (`details.field` names it).",
                    number=(
                        InvalidInput.code,
                        "number is not a valid phone number: not a phone number",
                        {"field": "number"},
                    ),
                    reason=(
                        InvalidInput.code,
                        f"reason must be text of at most {BLOCK_REASON_MAX} characters",
                        {"field": "reason"},
                    ),
                    unknown_field=(InvalidInput.code, "unknown field(s): role", {"field": "role"}),
                ),
                "500": INTERNAL,
            },
        },
        "get": {
            "operationId": "listBlockedNumbers",
            "tags": ["blocklist"],
            "summary": "List blocked numbers",
            "description": "The blocks in force, oldest entry first, numbers masked, each with its expiry (an "
            "expired block is not listed). Paginated by cursor.\n\n"
            "Errors: 401 `unauthorized`; 422 `invalid_input` (`limit`, `cursor`); 500 `internal_error`.",
            "parameters": PAGE_PARAMETERS,
            "responses": {
                "200": _json_response(
                    "A page of blocked numbers.",
                    _ref("BlockedNumberList"),
                    {"items": [BLOCK_EXAMPLE], "next_cursor": None},
                ),
                "401": UNAUTHORIZED,
                "422": _response_ref("InvalidPage"),
                "500": INTERNAL,
            },
        },
    },
    "/v1/blocklist/{entry_id}": {
        "parameters": BLOCK_ENTRY_PARAMETERS,
        "delete": {
            "operationId": "unblockNumber",
            "tags": ["blocklist"],
            "summary": "Unblock a number",
            "description": "Removes the entry: calls from and to the number are put through again, from "
            "its next call on; the calls the block refused or ended stay as they were recorded. No body.\n\n"
            "Errors: 401 `unauthorized`; 404 `block_not_found` (also for an id that is not a UUID, or an entry "
            "removed already or expired); 500 `internal_error`.",
            "responses": {
                "200": _json_response("The entry that was removed.", _ref("BlockedNumber"), BLOCK_EXAMPLE),
                "401": UNAUTHORIZED,
                "404": _response_ref("BlockNotFound"),
                "500": INTERNAL,
            },
        },
    },
    "/v1/calls/{call_id}/recording": {
        "parameters": CALL_PARAMETERS,
        "get": {
            "operationId": "getCallRecording",
            "tags": ["recordings"],
            "summary": "A call's recording",
            "description": "What is known of the call's recording (not the audio). Only with the scope "
            "`recordings:read`; every request, granted or not, is written to the audit.\n\nErrors: 401 "
            "`unauthorized`; 403 "
            "`insufficient_scope`; 404 `recording_not_found`; 410 `recording_deleted`; 500 `internal_error`.",
            "responses": {
                "200": _json_response("The recording.", _ref("Recording")),
                "401": _response_ref("RecordingUnauthorized"),
                "403": _response_ref("RecordingForbidden"),
                "404": _response_ref("RecordingNotFound"),
                "410": _response_ref("RecordingDeleted"),
                "500": INTERNAL,
            },
        },
    },
    "/v1/calls/{call_id}/recording/audio": {
        "parameters": CALL_PARAMETERS,
        "get": {
            "operationId": "getCallRecordingAudio",
            "tags": ["recordings"],
            "summary": "A call's recording: the audio",
            "description": "The recording as one WAV file (`audio/wav`), streamed from Asterisk. Only with the "
            "scope `recordings:read`; every request, granted or not, is written to the audit.\n\nErrors: 401 "
            "`unauthorized`; 403 `insufficient_scope`; 404 `recording_not_found`; 409 "
            "`recording_in_progress`; 410 `recording_deleted`; 500 `internal_error`; 503 `asterisk_unavailable`.",
            "responses": {
                "200": {
                    "description": "The WAV file (8 kHz, 16-bit mono).",
                    "content": {"audio/wav": {"schema": {"type": "string", "contentMediaType": "audio/wav"}}},
                },
                "401": _response_ref("RecordingUnauthorized"),
                "403": _response_ref("RecordingForbidden"),
                "404": _response_ref("RecordingNotFound"),
                "409": _error_response(
                    "`recording_in_progress`: the call is still being recorded.",
                    {"recording_in_progress": (RecordingInProgress.code, "the call is still being recorded", None)},
                ),
                "410": _response_ref("RecordingDeleted"),
                "500": INTERNAL,
                "503": _error_response(
                    "`asterisk_unavailable`: Asterisk did not hand out the audio; try again later.",
                    {
                        "asterisk_unavailable": (
                            AsteriskUnavailable.code,
                            "Asterisk did not hand out the recording: no answer",
                            None,
                        )
                    },
                ),
            },
        },
    },
    "/v1/recordings/access": {
        "get": {
            "operationId": "listRecordingAccess",
            "tags": ["recordings"],
            "summary": "The recordings' audit",
            "description": "Every access to the recordings (granted or not) and every deletion by retention, "
            "newest first; reading it is written to it too. Only with the scope `audit:read`. Paginated by "
            "cursor.\n\nErrors: 401 `unauthorized`; 403 `insufficient_scope`; 422 `invalid_input` "
            "(`call_id`, `limit`, `cursor`); 500 `internal_error`. The token is checked before the "
            "parameters: without a valid token with `audit:read` a bad parameter gets 401/403 (or 429); "
            "every answer is audited.",
            "parameters": [
                {
                    "name": "call_id",
                    "in": "query",
                    "required": False,
                    "description": "Only the accesses to this call's recording.",
                    "schema": UUID,
                },
                *PAGE_PARAMETERS,
            ],
            "responses": {
                "200": _json_response("A page of the audit.", _ref("RecordingAccessList")),
                "401": _response_ref("RecordingUnauthorized"),
                "403": _response_ref("RecordingForbidden"),
                "422": _invalid(
                    "`invalid_input`: `call_id` is not a UUID, or `limit` or `cursor` is bad (`details.field` "
                    "names it).",
                    call_id=(InvalidInput.code, "call_id is not a valid call_id", {"field": "call_id"}),
                    limit=(InvalidInput.code, f"limit must be a whole number from 1 to {MAX_PAGE}", {"field": "limit"}),
                    cursor=(InvalidInput.code, "cursor is not one this API gave out", {"field": "cursor"}),
                ),
                "500": INTERNAL,
            },
        },
    },
    "/v1/pool-usage": {
        "get": {
            "operationId": "getPoolUsage",
            "tags": ["pool-numbers"],
            "summary": "Pool utilisation per region",
            "description": "Per region: numbers by state, live sessions, pairs in cool-off and the load of the "
            "busiest number. Not paginated.\n\nErrors: 401 `unauthorized`; 500 `internal_error`.",
            "responses": {
                "200": _json_response(
                    "Usage, one entry per region (numbers without a region first).",
                    _ref("PoolUsage"),
                    {
                        "regions": [
                            {
                                "region": "RU-MOW",
                                "active": 40,
                                "cooling": 1,
                                "retired": 3,
                                "live_sessions": 112,
                                "cooling_pairs": 37,
                                "busiest_number_sessions": 4,
                            }
                        ]
                    },
                ),
                "401": UNAUTHORIZED,
                "500": INTERNAL,
            },
        }
    },
}

_SCOPE_LIST = "; ".join(f"`{scope}`: {what}" for scope, what in SCOPES.items()) + "."

DESCRIPTION = f"""The API of maskbridge, a number-masking VoIP bridge for deliveries.

For each order the order system opens a **session**: the bridge chooses a number from its pool
(**pool number**) and gives it to the order's courier and client. Each one dials that pool number to
reach the other and sees the other's calls come from it, so that neither ever learns the other's real
number. A session ends when it is closed (optionally after a grace period in which the client can still
reach support), expires, or stays idle too long; afterwards the pool number leads nowhere for that pair.

Real numbers are given to the API in requests and are never given back: answers only ever hold them
masked to their last two digits, like `+***67`. Pool numbers are given in full (E.164).

A real number on the **blocklist** can neither call nor be called through any session, and its calls in
progress are ended by the bridge as soon as it is blocked.

**Authentication**: every endpoint except `/healthz`, `/metrics` and `/v1/openapi.json` needs the header
`Authorization: Bearer <token>` (the scheme is matched case-insensitively). Without it, or with a wrong,
revoked or expired token: 401 `unauthorized` with `WWW-Authenticate: Bearer realm="maskbridge"`.

**Tokens and scopes**: each operation needs one scope, its security requirement here; a token without it
gets 403 `insufficient_scope` (`details.required_scope`). The scopes: {_SCOPE_LIST}

Tokens are named: `env` is `MB_API_TOKEN` (every scope but `recordings:read` and `audit:read`),
`recording` is `MB_RECORDING_TOKEN` (`recordings:read` and `audit:read`), and any number of others are
added and revoked with `maskbridge-admin token add|revoke` (secrets `mbt_...`), at once on every bridge.
Every request is logged with its token's name; the audits (recording access, a session's history) name
it too.

**Recordings** (sessions opened with `"record": true`) are reached only with `recordings:read`, which
the order system's `MB_API_TOKEN` never has; every access, granted or not, is written to an audit
(read with `audit:read`).

**Rate limit**: each token may make `MB_API_RATE` requests a second per bridge process, after a burst of
`MB_API_BURST` (a token may have a rate of its own); beyond it: 429 `rate_limited` with `Retry-After`.

**Conflicts cost more**: a refusal that tells whether a number is one of a session's people (409
`order_has_open_session` on opening; 422 `invalid_input` for a courier whose number is the client's) costs
the token one of its conflict budget: `MB_API_CONFLICT_BURST` (20) at once, then `MB_API_CONFLICT_RATE`
(10) a minute, per bridge process. With none left, opening a session and reassigning the courier answer 429
`rate_limited` before they run. Each of those holds one of the budget while it runs (at most
`MB_API_CONFLICT_BURST` in flight per token); one that does not conflict gives it back. Each change of a
session's courier costs that session one of a budget of the same size, whoever asks (a loop of
reassignments with candidate numbers would otherwise find the client's number as the one refused).

**Requests without a valid token** (none, a wrong, revoked or expired one) are limited per remote address:
`MB_API_ADDRESS_BURST` (40) at once, then `MB_API_ADDRESS_RATE` (20) a second; beyond: 429, answered
before the token is looked up and without an audit row.

**Requests**: JSON bodies are objects of at most {JSON_BODY_LIMIT} bytes (larger: 413 `body_too_large`);
unknown fields are refused.

**Lists** are paginated by an opaque cursor: `{{"items": [...], "next_cursor": "..."}}`. Pass
`next_cursor` as `cursor` to get the next page; it is null on the last page. `limit` is 1 to {MAX_PAGE}
(default {DEFAULT_PAGE}).

**Errors** are `{{"error": {{"code", "message", "details"?}}}}`.

{ERROR_CODES}"""

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "maskbridge",
        "version": "0.3.0",
        "summary": "Order-scoped pool numbers that mask couriers' and clients' real numbers.",
        "description": DESCRIPTION,
        "license": {"name": "AGPL-3.0-or-later", "identifier": "AGPL-3.0-or-later"},
    },
    "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
    "servers": [{"url": "/", "description": "The bridge itself (MB_API_BIND:MB_API_PORT)."}],
    "security": [{"bearer": []}],
    "tags": [
        {"name": "sessions", "description": "Order sessions: open, read, extend, close, history."},
        {"name": "participants", "description": "The people of a session; reassigning the courier."},
        {"name": "calls", "description": "Call attempts, by session or by order."},
        {"name": "pool-numbers", "description": "The pool: import, list, retire, utilisation."},
        {
            "name": "blocklist",
            "description": "Real numbers whose calls are refused on every session: block, list, unblock.",
        },
        {
            "name": "recordings",
            "description": "Recorded calls: metadata, audio, the audit. Only with `recordings:read` / "
            "`audit:read`.",
        },
        {"name": "service", "description": "Health and this document; no token needed."},
    ],
    "paths": PATHS,
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API token: `Authorization: Bearer <token>`. `MB_API_TOKEN` (the token `env`), "
                "`MB_RECORDING_TOKEN` (`recording`) or one added with `maskbridge-admin token add` "
                "(`mbt_...`). An operation's security requirement names the scope it needs.",
            },
        },
        "parameters": PARAMETERS,
        "responses": RESPONSES,
        "schemas": SCHEMAS,
    },
}


# The scope each operation needs (bridge.tokens.SCOPES), by operationId: its security
# requirement, which the API enforces (bridge.api.http.route_scopes). The others need no token.
OPERATION_SCOPES: dict[str, str] = {
    "openSession": "sessions:write",
    "listSessions": "sessions:read",
    "getSession": "sessions:read",
    "extendSession": "sessions:write",
    "closeSession": "sessions:write",
    "listParticipants": "sessions:read",
    "reassignCourier": "sessions:write",
    "listSessionEvents": "sessions:read",
    "listSessionCalls": "sessions:read",
    "listOrderCalls": "sessions:read",
    "importPoolNumbers": "pools:admin",
    "listPoolNumbers": "pools:read",
    "getPoolNumber": "pools:read",
    "updatePoolNumber": "pools:admin",
    "retirePoolNumber": "pools:admin",
    "getPoolUsage": "pools:read",
    "blockNumber": "blocklist:write",
    "listBlockedNumbers": "blocklist:read",
    "unblockNumber": "blocklist:write",
    "getCallRecording": "recordings:read",
    "getCallRecordingAudio": "recordings:read",
    "listRecordingAccess": "audit:read",
}

for _item in PATHS.values():
    for _operation in _item.values():
        if not isinstance(_operation, dict) or _operation.get("operationId") not in OPERATION_SCOPES:
            continue
        _scope = OPERATION_SCOPES[_operation["operationId"]]
        _operation["security"] = [{"bearer": [_scope]}]
        _operation["description"] += (f"\n\nScope: `{_scope}`. Also 403 `insufficient_scope` without it, 429 "
                                      "`rate_limited` over the token's rate limit.")
        _operation["responses"].setdefault("403", _response_ref("Forbidden"))
        _operation["responses"].setdefault("429", _response_ref("RateLimited"))

# Every operation that reads or writes the database may meet it unreachable.
for _path, _item in PATHS.items():
    if _path in ("/v1/openapi.json", "/metrics", "/healthz"):
        continue
    for _operation in _item.values():
        if isinstance(_operation, dict) and "responses" in _operation:
            _operation["responses"].setdefault("503", _response_ref("DatabaseUnavailable"))


def document() -> dict[str, Any]:
    """The OpenAPI document (one shared dict: do not change it)."""
    return _DOCUMENT
