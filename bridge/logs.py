"""Structured JSON logs, with a last line of defence against real phone numbers.

Code logs numbers masked on purpose (phone.mask); this processor masks any digit run that
looks like a phone number in any value, so a channel name like PJSIP/+79161234567@trunk or
an exception text cannot leak one. Asterisk ids like 1764071234.56 are left alone.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from bridge.phone import mask

# 10 to 15 digits, possibly written with separators as people write numbers: spaces,
# dashes, dots, parentheses (+7 916 123-45-67, 8 (916) 123.45.67). Not part of a longer
# run of digits or of a decimal, and not a group of a UUID or other hex id (hex digits
# around it, or joined to it by a dash: a call id stays whole).
_PHONE = re.compile(
    r"(?<![\d.+A-Fa-f])(?<![0-9A-Fa-f]-)"
    r"\+?\(?\d(?:[ .()-]{0,2}\d){9,14}"
    r"(?!\d|\.\d|[A-Fa-f]|-[0-9A-Fa-f])"
)
# What the pattern finds that is no phone number: an Asterisk unique id (epoch.sequence), a
# decimal with a long fraction (0.7916123456), a date (2026-12-04 19...), an IPv4 address.
_NOT_A_NUMBER = re.compile(r"\d{9,11}\.\d{1,9}|\d{1,3}\.\d{9,}|.*\d{4}-\d{2}-\d{2}.*|\d{1,3}(\.\d{1,3}){3}")


def _mask_found(found: str) -> str:
    if _NOT_A_NUMBER.fullmatch(found):
        return found
    return mask(("+" if found.startswith("+") else "") + re.sub(r"\D", "", found))


def redact_text(text: str) -> str:
    return _PHONE.sub(lambda m: _mask_found(m.group(0)), text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact_text(str(value))


# Values under these keys are the service's own public numbers, logged in full on purpose.
PUBLIC_KEYS = frozenset({"pool_number"})


def redact_phone_numbers(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v if k in PUBLIC_KEYS else _redact(v) for k, v in event_dict.items()}


class MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a bad header, a broken request line) as an
    error with the raw bytes: that is the client's fault, not the bridge's, and the bytes are
    the client's. Kept as a warning naming the kind of fault only."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "http.malformed_request", ()
            record.exc_info, record.exc_text = None, None
            record.fault = type(exc).__name__
        return True


class _LineWriter(structlog.WriteLogger):
    """structlog's WriteLogger, except that a line that cannot be written (a full disk, a
    closed pipe) is dropped, as stdlib logging's handlers drop it: logging never raises into
    the request or the call that logs."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on `stream` (stderr by default), for structlog and stdlib logging alike."""
    out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: list[Any] = [redact_phone_numbers, structlog.processors.JSONRenderer()]
    # The bridge's own lines are rendered and written by structlog itself: through stdlib
    # logging (a LogRecord, a handler and a formatter for each line) they cost twice as much,
    # about 30 us more for the two lines of every session open. (Both paths write whole lines,
    # each under its own lock: only the event loop's thread logs.)
    structlog.configure(
        processors=[*shared, *renderer],
        logger_factory=lambda *_args: _LineWriter(out),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        cache_logger_on_first_use=False,
    )
    # Other libraries' lines (aiohttp, asyncpg): stdlib logging, rendered alike.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(allow=("fault",)),
                               *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())
