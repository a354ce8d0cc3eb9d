"""The order system's HTTP API, against the running bridge."""

from __future__ import annotations

import uuid

import pytest


async def test_open_is_idempotent_by_order_id_and_accepts_national_forms(api, real_number):
    courier, client = real_number(), real_number()
    order = f"order-{uuid.uuid4()}"
    status, first = await api.request(
        "POST", "/v1/sessions", json={"order_id": order, "courier_number": courier, "client_number": "8" + client[2:]}
    )
    assert status == 201
    api.opened.append(first["id"])
    status, again = await api.request(
        "POST", "/v1/sessions", json={"order_id": order, "courier_number": courier[1:], "client_number": client}
    )
    assert status == 200
    assert again["id"] == first["id"] and again["pool_number"] == first["pool_number"]
    # Real numbers are shown masked only.
    assert first["participants"]["client"]["number"] == client[:5] + "***" + client[-4:]
    assert courier not in str(first) and client not in str(first)


async def test_close_then_read_and_list_calls(api, real_number):
    session = await api.open_session(f"order-{uuid.uuid4()}", real_number(), real_number())
    closed = await api.close_session(session["id"])
    assert closed["status"] == "closed" and closed["closed_at"]
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert status == 200 and read["status"] == "closed"
    status, calls = await api.request("GET", f"/v1/sessions/{session['id']}/calls")
    assert status == 200 and calls["calls"] == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"order_id": "x", "courier_number": "not a number", "client_number": "+79161234567"}, 422, "invalid_input"),
        ({"order_id": "x", "courier_number": "+79161234567", "client_number": "89161234567"}, 422, "invalid_input"),
        ({"order_id": "", "courier_number": "+79161234567", "client_number": "+79161234568"}, 422, "invalid_input"),
        ({"courier_number": "+79161234567", "client_number": "+79161234568"}, 422, "invalid_input"),
        ({"order_id": "x", "courier_number": 79161234567, "client_number": "+79161234568"}, 422, "invalid_input"),
        (["not", "an", "object"], 400, "session_error"),
    ],
)
async def test_bad_input_gets_a_4xx_with_a_stable_code(api, db, body, status, code):
    before = await db.fetchval("SELECT count(*) FROM sessions")
    got, answer = await api.request("POST", "/v1/sessions", json=body)
    assert (got, answer["error"]["code"]) == (status, code)
    assert answer["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM sessions") == before


async def test_wrong_or_missing_token_is_refused(api):
    for headers in ({"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": ""}):
        async with api.http.post(api.base + "/v1/sessions", json={}, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_unknown_session_is_404(api):
    for path in (f"/v1/sessions/{uuid.uuid4()}", "/v1/sessions/not-a-uuid"):
        status, answer = await api.request("GET", path)
        assert status == 404 and answer["error"]["code"] == "session_not_found"
