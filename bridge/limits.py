"""Every limit and format the bridge checks input against, in one place: the services check
with them, the HTTP API and its OpenAPI document state them from them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator


def _integral(value: Any) -> Any:
    """JSON Schema's integer: 5 and 5.0 alike (true and "5" are not numbers)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# A whole number in a request body, as JSON Schema's "integer" reads it.
Whole = Annotated[int, BeforeValidator(_integral)]

# --- sessions ------------------------------------------------------------------------------
MAX_SECONDS = 31 * 24 * 3600  # the longest ttl, idle timeout, grace period or call
ORDER_ID_PATTERN = r"^[\x21-\x7e]{1,200}$"  # printable ASCII, no spaces
ORDER_ID = re.compile(ORDER_ID_PATTERN)
REGION_PATTERN = r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$"  # ISO 3166: RU, RU-MOW
REGION_FORM = re.compile(REGION_PATTERN)
MAX_PHONE_NUMBER_LENGTH = 32  # characters of a phone number as given (any form)
# The characters a phone number may be written with (what bridge.phone reads: 5 to 16 digits,
# a leading + or 00, spaces, dashes, dots and brackets between); whether the digits are a
# number is libphonenumber's to say.
PHONE_NUMBER_PATTERN = r"^[\s().-]*\+?(?:[0-9][\s().-]*){5,17}$"
MAX_CAP = 10_000  # calls per hour or per day
ORDER_CODE_LENGTHS = (4, 12)  # MB_ORDER_CODE_LENGTH's range
ORDER_CODE_PATTERN = r"^[0-9]{4,12}$"
Mode = Literal["direct", "order_code"]  # a session's mode, and a pool number's
MODES: tuple[str, ...] = get_args(Mode)
SessionStatus = Literal["open", "grace", "closed"]
SESSION_STATUSES: tuple[str, ...] = get_args(SessionStatus)

# --- pool numbers and the blocklist --------------------------------------------------------
MAX_IMPORT = 100_000  # numbers per import
PoolState = Literal["active", "cooling", "retired"]
POOL_STATES: tuple[str, ...] = get_args(PoolState)
BLOCK_REASON_MAX = 500  # characters
BLOCK_REASON_PATTERN = r"^[^\x00-\x1f]*$"  # no control characters

# --- the HTTP API ---------------------------------------------------------------------------
JSON_BODY_LIMIT = 64 * 1024  # bytes of a JSON body
IMPORT_BODY_LIMIT = 4 * 1024 * 1024  # bytes of a pool number import
DEFAULT_PAGE, MAX_PAGE = 50, 500  # items per page of a listing
MAX_AUDIT_CURSOR = 2**63  # recording audit ids are bigint
