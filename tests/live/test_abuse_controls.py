"""Call caps and quiet hours, with real calls: the refused caller hears why, nobody rings,
and the record says what refused it."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from tests.live.conftest import announced, last_call_of
from tests.live.test_session_calls import talk


async def test_the_call_cap_refuses_the_call_after_the_last_allowed(carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, calls_per_hour=2)
    pool = session["pool_number"]
    await talk(carrier, courier, pool, client)
    await talk(carrier, client, pool, courier)  # both directions count
    carrier.phone(client, action="answer")
    await announced(carrier, courier, pool)
    row = await last_call_of(db, pool, courier)
    assert (row["outcome"], str(row["session_id"])) == ("call_limit", session["id"])
    # Refused attempts do not count against the cap; the session's other limits stay.
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert (read["calls_per_hour"], read["calls_per_day"]) == (2, None)


async def test_quiet_hours_keep_calls_from_the_client_but_not_from_them(carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    now = datetime.now(timezone.utc)
    window = {
        "from": (now - timedelta(hours=1)).strftime("%H:%M"),
        "to": (now + timedelta(hours=1)).strftime("%H:%M"),
        "timezone": "UTC",
    }
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, quiet_hours=window)
    pool = session["pool_number"]
    assert session["quiet_hours"] == window
    carrier.phone(client, action="answer")
    await announced(carrier, courier, pool)
    assert (await last_call_of(db, pool, courier))["outcome"] == "quiet_hours"
    # The client may still call the courier.
    await talk(carrier, client, pool, courier)


async def test_bad_abuse_settings_get_a_422(api, real_number, db):
    before = await db.fetchval("SELECT count(*) FROM sessions")
    for extra in (
        {"calls_per_hour": -1},
        {"calls_per_day": "ten"},
        {"quiet_hours": {"from": "22:00", "to": "08:00", "timezone": "Nowhere/City"}},
        {"quiet_hours": "nights"},
    ):
        status, answer = await api.request(
            "POST", "/v1/sessions",
            json={"order_id": f"order-{uuid.uuid4()}", "courier_number": real_number(),
                  "client_number": real_number(), **extra},
        )
        assert (status, answer["error"]["code"]) == (422, "invalid_input"), answer
    assert await db.fetchval("SELECT count(*) FROM sessions") == before
