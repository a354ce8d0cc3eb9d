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
    assert lines[0]["channel"] == "PJSIP/+***67@trunk-00000001"
    assert lines[0]["asterisk_id"] == "1764071234.56"
    assert lines[0]["pool_number"] == "+74950000001", "the service's own pool numbers stay readable"
    assert lines[1]["event"] == "raw text with ***70 inside"


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_each_level_keeps_its_lines_and_drops_the_lower_ones(level):
    stream = io.StringIO()
    logs.configure(level, stream)
    log = structlog.get_logger("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    try:
        raise ValueError("broken 79161234571")
    except ValueError:
        log.exception("e")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    order = ["debug", "info", "warning", "error"]
    assert [line["level"] for line in lines] == order[order.index(level):]
    assert "ValueError: broken ***71" in lines[-1]["exception"]
    assert "9161234571" not in stream.getvalue()


def test_a_line_that_cannot_be_written_is_dropped_not_raised_into_the_caller():
    """A full disk or a closed pipe: the request or the call that logs goes on."""
    stream = io.StringIO()
    logs.configure("info", stream)
    stream.close()
    structlog.get_logger("t").info("lost")
    structlog.get_logger("t").error("lost too")
    logging.getLogger("stdlib").warning("lost as well")


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


@pytest.mark.parametrize(("written", "masked"), [
    ("+7 916 123-45-67", "+***67"),
    ("8 (916) 123.45.67", "***67"),
    ("+7(916)1234567", "+***67"),
    ("call 8-916-123-45-67 now", "call ***67 now"),
    ("tel:+7 (916) 123 45 67;", "tel:+***67;"),
    ("caller=79161234567,", "caller=***67,"),
])
def test_numbers_written_with_spaces_dashes_dots_or_parentheses_are_masked(written, masked):
    assert logs.redact_text(written) == masked


@pytest.mark.parametrize("kept", [
    "1764071234.56", "node-2-1796409460.0", "2026-12-04 19:35:09", "port 8080 and 55432", "took 0.7916123456 s",
    "11111111-2222-3333-4444-555555555555", "carrier-12345678-1234-5678-9999-123456789012-callee",
    "from 192.168.100.200:5060", "remote 203.113.150.222",
])
def test_ids_dates_and_decimals_are_not_mangled(kept):
    assert logs.redact_text(kept) == kept


def test_no_call_id_is_mangled():
    """Call ids are UUIDs; some are all digits but the dashes, with a 12-digit last group."""
    import random
    import uuid

    rng = random.Random(7)
    for _ in range(20000):
        call_id = str(uuid.UUID(int=rng.getrandbits(128)))
        digits_only = "".join(c if c == "-" else str(int(c, 16) % 10) for c in call_id)
        for text in (call_id, digits_only, f"carrier-{digits_only}-callee", f"{digits_only}-code-1"):
            assert logs.redact_text(text) == text, text
