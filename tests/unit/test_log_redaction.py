from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from bridge import logs


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_numbers_in_any_value_are_masked_and_asterisk_ids_are_not():
    stream = io.StringIO()
    logs.configure("info", stream)
    log = structlog.get_logger("t")
    log.info(
        "probe",
        channel="PJSIP/+79161234567@trunk-00000001",
        nested={"callee": "89161234568", "list": ["79161234569"]},
        asterisk_id="1764071234.56",
        pool_number="+74950000001",
    )
    logging.getLogger("stdlib").warning("raw text with 79161234570 inside")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    text = stream.getvalue()
    for digits in ("9161234567", "9161234568", "9161234569", "9161234570"):
        assert digits not in text
    assert lines[0]["channel"] == "PJSIP/+7916***4567@trunk-00000001"
    assert lines[0]["asterisk_id"] == "1764071234.56"
    assert lines[0]["pool_number"] == "+74950000001", "the service's own pool numbers stay readable"
    assert lines[1]["event"] == "raw text with 7916***4570 inside"


def test_a_request_aiohttp_cannot_parse_is_a_warning_without_its_bytes():
    from aiohttp.http_exceptions import BadHttpMessage

    stream = io.StringIO()
    logs.configure("info", stream)
    try:
        raise BadHttpMessage("Invalid header value char: X-Probe: 8 (916) 123-45-67\x00")
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.1")
    [line] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert line["level"] == "warning" and line["event"] == "http.malformed_request"
    assert line["fault"] == "BadHttpMessage"
    assert "916" not in stream.getvalue() and "X-Probe" not in stream.getvalue()
