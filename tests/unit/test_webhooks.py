"""Webhook signatures and retry spacing (bridge/webhooks.py)."""

from __future__ import annotations

import hashlib
import hmac

from bridge.webhooks import ATTEMPTS, backoff, signature


def test_the_signature_is_an_hmac_of_time_and_body():
    body = b'{"id":"x","type":"call.ended"}'
    header = signature("s" * 20, 1764000000, body)
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    assert t == "1764000000"
    assert v1 == hmac.new(b"s" * 20, b"1764000000." + body, hashlib.sha256).hexdigest()
    assert signature("t" * 20, 1764000000, body) != header


def test_retries_back_off_to_five_minutes_and_end():
    waits = [backoff(n) for n in range(1, ATTEMPTS)]
    assert waits[:4] == [1, 2, 4, 8]
    assert max(waits) == 300 and waits == sorted(waits)
    assert sum(waits) > 30 * 60, "an order system down for half an hour still gets its events"
