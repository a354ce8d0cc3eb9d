"""What the order system and engineers ask the services for, as checked request models
(pydantic, unknown fields refused). The HTTP API parses its bodies with them, the admin
tool builds them from its options, and the OpenAPI document takes their JSON schemas."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bridge.errors import InvalidInput
from bridge.limits import (
    BLOCK_REASON_MAX, BLOCK_REASON_PATTERN, MAX_IMPORT, MAX_PHONE_NUMBER_LENGTH, MAX_SECONDS, ORDER_CODE_PATTERN,
    PHONE_NUMBER_PATTERN,
    ORDER_ID_PATTERN, REGION_PATTERN, Mode, Whole,
)
from bridge.terms import Terms

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


def _phone_number(description: str, examples: list[str]) -> Any:
    return Field(max_length=MAX_PHONE_NUMBER_LENGTH, pattern=PHONE_NUMBER_PATTERN, description=description,
                 examples=examples)


def _seconds(description: str, minimum: int = 1) -> Any:
    return Field(None, ge=minimum, le=MAX_SECONDS, description=description)


class OpenSession(Terms):
    """Open the session of an order (or get the one open already): a pool number between its
    courier and its client. Null is the same as leaving a field out. Seconds are JSON integers
    (`5.0` reads as 5; `true` and `"5"` are refused)."""

    model_config = _STRICT

    order_id: str = Field(pattern=ORDER_ID_PATTERN, description="1 to 200 printable ASCII characters, no spaces. "
                          "At most one open session per order.", examples=["A-1042"])
    courier_number: str = _phone_number("The courier's real number: "
                                "E.164, or national form in the bridge's default region (`MB_DEFAULT_REGION`); "
                                "spaces, dashes, dots and brackets are ignored.", ["+79161234567"])
    client_number: str = _phone_number("The client's real number, read as "
                               "`courier_number`; must be another number.", ["89161234568"])
    region: str | None = Field(None, pattern=REGION_PATTERN, description="Prefer a pool number of this region (ISO "
                               "3166: `RU`, `RU-MOW`). Some pool number must have this region (`unknown_region` "
                               "otherwise); if none of them is free, another region's is used. Null: no "
                               "preference.", examples=["RU-MOW"])
    ttl_seconds: Whole | None = _seconds("The session ends this long after opening. Default `MB_SESSION_TTL` (24 "
                                       "hours).")
    idle_timeout_seconds: Whole | None = _seconds(
        "The session ends after this long without a call (counted from the end of the last one; a call in progress "
        "keeps it open). Default: no idle timeout.")
    grace_seconds: Whole | None = _seconds("Grace period at close: the client can still reach support through the "
                                         "pool number this long. Default `MB_GRACE_PERIOD` (0). More than 0 needs a "
                                         "support number (`MB_SUPPORT_NUMBER`).", minimum=0)
    mode: Mode | None = Field(None, description="`order_code`: the session gets a shared order-code pool number "
                              "(the region's if one is, then the least loaded) and an order code; callers of that "
                              "number key the code to reach the other participant. Null or left out: `direct`.")
    order_code: str | None = Field(None, pattern=ORDER_CODE_PATTERN, description="Mode `order_code` only: the "
                                   "order system's own code, exactly `MB_ORDER_CODE_LENGTH` (default 6) digits, "
                                   "unique among the live sessions on the number (a number where it is in use is "
                                   "skipped). Null or left out: a random code.", examples=["482913"])

    def terms(self) -> Terms:
        return Terms.model_validate({n: getattr(self, n) for n in Terms.names()})


class ExtendSession(BaseModel):
    """At least one of the two, not null. Extending also counts as activity (resets the idle
    timer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, json_schema_extra={"anyOf": [
        {"required": ["ttl_seconds"], "properties": {"ttl_seconds": {"type": "integer"}}},
        {"required": ["idle_timeout_seconds"], "properties": {"idle_timeout_seconds": {"type": "integer"}}},
    ]})

    ttl_seconds: Whole | None = _seconds("The session now ends this long from now (replacing `expires_at`, not adding "
                                       "to it).")
    idle_timeout_seconds: Whole | None = _seconds("The new idle timeout.")


class CloseSession(BaseModel):
    """Optional: an empty body, or `{}`, closes with the grace period set at open."""

    model_config = _STRICT

    grace_seconds: Whole | None = _seconds("Overrides the grace period set at open (0: none). More than 0 needs a "
                                         "support number (`MB_SUPPORT_NUMBER`).", minimum=0)


class AddParticipant(BaseModel):
    """Reassign the order to another courier (the client cannot change)."""

    model_config = _STRICT

    role: Literal["courier"] = Field(description="Only the courier can be replaced: the client keeps their number.")
    number: str = _phone_number("The new courier's real number, read as "
                        "`courier_number` at open. Validation errors name the field `number` in `details.field`.",
                        ["+79161234569"])


class ImportPoolNumbers(BaseModel):
    """Pool numbers to add (or reactivate). Each entry is checked on its own: any bad entry
    refuses the whole import with `invalid_import`, listing the problems."""

    model_config = _STRICT

    # (Each entry is checked by the pool service, which lists every bad one; the OpenAPI
    # document describes an entry as PoolNumberEntry.)
    numbers: list[Any] = Field(min_length=1, max_length=MAX_IMPORT, description="A number listed twice must have "
                               "the same region both times.")


class UpdatePoolNumber(BaseModel):
    """Change a pool number's mode, while nobody holds it."""

    model_config = _STRICT

    mode: Mode = Field(description="`direct`: handed to direct sessions, calls routed by the caller's number. "
                       "`order_code`: shared by order-code sessions, the caller keys the order's code (never handed "
                       "to a direct session).")


class BlockNumber(BaseModel):
    """Block a real number everywhere: its calls in progress are ended too."""

    model_config = _STRICT

    number: str = _phone_number("The real number to block: E.164, or "
                        "national form in the bridge's default region (`MB_DEFAULT_REGION`), read as "
                        "`courier_number` at open. Two forms of the same number (`89161234567`, `+79161234567`) are "
                        "the same entry.", ["+79161234567"])
    reason: str | None = Field(None, max_length=BLOCK_REASON_MAX, pattern=BLOCK_REASON_PATTERN,
                               description=f"Why, for the people reading the list: at most {BLOCK_REASON_MAX} "
                               "characters, no control characters (tabs and line breaks included). Null or left "
                               "out: none.", examples=["abusive calls to couriers"])
    ttl_seconds: Whole | None = _seconds("The block ends this long from now (`expires_at`): from then on it blocks "
                                         "nothing and is no longer listed. Null or left out: until unblocked. For a "
                                         "number blocked already, its expiry becomes the later of the two.")


# The OpenAPI document's name of each request body.
REQUESTS: dict[str, type[BaseModel]] = {
    "OpenSessionRequest": OpenSession,
    "ExtendRequest": ExtendSession,
    "CloseRequest": CloseSession,
    "AddParticipantRequest": AddParticipant,
    "ImportPoolNumbersRequest": ImportPoolNumbers,
    "UpdatePoolNumberRequest": UpdatePoolNumber,
    "BlockNumberRequest": BlockNumber,
}


def parse(model: type[BaseModel], data: Any) -> Any:
    """`data` checked against a request model: the model, or InvalidInput naming the first
    field that is wrong (the message never repeats the value: it may be a phone number)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
        # (Union members show in the location as "function-after[...]", "QuietHours": left out.)
        path = [str(p) for p in first["loc"] if isinstance(p, str) and p.isidentifier() and not p[:1].isupper()]
        field = path[0][:100] if path else None
        where = ".".join(path)[:200] or "the body"
        if first["type"] == "extra_forbidden":
            # (A key that is not a name is not repeated: it may be a phone number.)
            key = first["loc"][-1] if first["loc"] else None
            if path and key == path[-1]:
                raise InvalidInput(f"unknown field: {where}", field=field) from None
            inside = f" in {where}" if path else ""
            raise InvalidInput(f"a field{inside} this request does not take", field=field) from None
        if first["type"] == "missing":
            raise InvalidInput(f"{where} is required", field=field) from None
        if first["type"] == "string_pattern_mismatch":  # (pydantic's message is the regex)
            raise InvalidInput(f"{where} is not written in the form the API document gives", field=field) from None
        raise InvalidInput(f"{where}: {first['msg']}"[:300], field=field) from None
