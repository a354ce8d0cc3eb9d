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

from bridge.phone import mask

_PHONE = re.compile(r"(?<![\d.])\+?\d{10,15}(?!\d|\.\d)")


def redact_text(text: str) -> str:
    return _PHONE.sub(lambda m: mask(m.group(0)), text)


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


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on `stream` (stderr by default), for structlog and stdlib logging alike."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: list[Any] = [redact_phone_numbers, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
