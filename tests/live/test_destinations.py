"""Allowed destinations against the running bridge and the real Postgres: a session or a
reassignment naming a number outside MB_ALLOWED_DESTINATIONS (the stack's default: Russian
mobile and geographic numbers) is refused with 422 destination_not_allowed and writes
nothing; the routing decision never dials a participant the list no longer allows."""

from __future__ import annotations

import uuid

import pytest

from bridge.destinations import Destinations
from bridge.sessions import Policy, Sessions
from tests.live.conftest import Harness, opening

PREMIUM, INTERNATIONAL_NETWORK, TOLL_FREE = "+78091234567", "+88234567890", "8 (800) 555-35-35"


@pytest.mark.parametrize(("field", "courier", "client"), [
    ("client_number", None, PREMIUM), ("courier_number", INTERNATIONAL_NETWORK, None), ("client_number", None, TOLL_FREE),
])
async def test_an_open_outside_the_allowed_destinations_is_refused_and_writes_nothing(
    api, db, real_number, field, courier, client
):
    order = f"order-{uuid.uuid4()}"
    status, body = await api.request("POST", "/v1/sessions", json={
        "order_id": order, "courier_number": courier or real_number(), "client_number": client or real_number(),
    })
    assert status == 422, body
    assert body["error"]["code"] == "destination_not_allowed" and body["error"]["details"] == {"field": field}
    assert "1234567" not in str(body) and "5553535" not in str(body), "the answer never repeats the number"
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE order_id = $1", order) == 0


async def test_a_reassignment_outside_the_allowed_destinations_is_refused(api, real_number):
    courier = real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, real_number())
    path = f"/v1/sessions/{session['id']}"
    status, body = await api.request("POST", f"{path}/participants", json={"role": "courier", "number": PREMIUM})
    assert status == 422 and body["error"]["code"] == "destination_not_allowed", body
    assert body["error"]["details"] == {"field": "number"}
    status, now = await api.request("GET", path)
    assert now["participants"]["courier"]["id"] == session["participants"]["courier"]["id"], "nothing changed"


@pytest.fixture
def h(scratch_db: Harness) -> Harness:
    scratch_db.run(scratch_db.pool.execute(
        "TRUNCATE blocked_numbers, calls, session_events, participants, sessions, pool_numbers CASCADE"
    ))
    scratch_db.run(scratch_db.pools.import_numbers([{"number": "+74957780001", "region": "RU-MOW"}]))
    return scratch_db


def test_routing_never_dials_a_participant_the_list_no_longer_allows(h: Harness) -> None:
    """A session opened under a wider list (the client's mobile number was allowed then):
    after the list is narrowed to geographic numbers, the courier's call is refused as a
    block is, and the client's call to the courier's Moscow number still goes through."""
    courier, client = "+74957781111", "+79165551111"
    session, _ = h.run(h.sessions.open(opening("dest-1", courier, client)))
    assert h.run(h.sessions.route(courier, session.pool_number)).kind == "connect"
    narrowed = Sessions(h.store, h.vault, Policy(pair_cooloff=3600, destinations=Destinations.parse("RU:geographic")))
    refused = h.run(narrowed.route(courier, session.pool_number))
    assert (refused.kind, refused.callee_number, refused.session_id) == ("blocked", None, session.id)
    allowed = h.run(narrowed.route(client, session.pool_number))
    assert (allowed.kind, allowed.callee_number) == ("connect", courier)
