"""The order system's HTTP API, against the running bridge: sessions over their life,
pool numbers, pagination, the OpenAPI document, and a table of bad inputs that each get
their 4xx and leave the database as it was."""

from __future__ import annotations

import uuid

import aiohttp
from openapi_spec_validator import validate
import pytest

from bridge.phone import mask


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
    assert first["participants"]["client"]["number"] == mask(client)
    assert courier not in str(first) and client not in str(first)
    # The same order with other people is a conflict, not a silent answer.
    status, other = await api.request(
        "POST", "/v1/sessions", json={"order_id": order, "courier_number": real_number(), "client_number": client}
    )
    assert status == 409 and other["error"]["code"] == "order_has_open_session"
    assert other["error"]["details"]["session_id"] == first["id"]


async def test_session_life_is_recorded_event_by_event(api, real_number):
    session = await api.open_session(f"order-{uuid.uuid4()}", real_number(), real_number())
    path = f"/v1/sessions/{session['id']}"
    status, extended = await api.request("POST", f"{path}/extend", json={"ttl_seconds": 3 * 86400})
    assert status == 200 and extended["expires_at"] > session["expires_at"]
    new_courier = real_number()
    status, moved = await api.request("POST", f"{path}/participants", json={"role": "courier", "number": new_courier})
    assert status == 201 and moved["participants"]["courier"]["number"] == mask(new_courier)
    status, same = await api.request("POST", f"{path}/participants", json={"role": "courier", "number": new_courier})
    assert status == 200, "the same courier again changes nothing"
    status, parts = await api.request("GET", f"{path}/participants")
    # In joining order (the first two joined together, then by role): every courier stays listed.
    assert [(p["role"], p["left_at"] is None) for p in parts["items"]] == [
        ("client", True), ("courier", False), ("courier", True)
    ]
    closed = await api.close_session(session["id"])
    assert (closed["status"], closed["end_reason"]) == ("closed", "closed") and closed["closed_at"]
    status, read = await api.request("GET", path)
    assert status == 200 and read["status"] == "closed"
    status, events = await api.request("GET", f"{path}/events")
    kinds = [e["kind"] for e in events["items"]]
    assert kinds == ["opened", "extended", "courier_reassigned", "closed"]
    times = [e["at"] for e in events["items"]]
    assert times == sorted(times)
    status, calls = await api.request("GET", f"{path}/calls")
    assert status == 200 and calls["items"] == [] and calls["next_cursor"] is None
    # A closed session cannot be changed.
    status, answer = await api.request("POST", f"{path}/extend", json={"ttl_seconds": 60})
    assert status == 409 and answer["error"]["code"] == "session_ended"


async def test_lists_are_paginated(api, real_number):
    order = f"order-{uuid.uuid4()}"
    courier, client = real_number(), real_number()
    ids = []
    for _ in range(3):  # an order reopened three times has three sessions
        session = await api.open_session(order, courier, client)
        ids.append(session["id"])
        await api.close_session(session["id"])
    seen, cursor = [], None
    while True:
        query = f"/v1/sessions?order_id={order}&limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, page = await api.request("GET", query)
        assert status == 200 and len(page["items"]) <= 2
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1], "newest first, each once"


async def test_pool_numbers_import_list_retire_and_usage(api, db, fresh_region, new_pool_number, real_number):
    a, b, c = new_pool_number(), new_pool_number(), new_pool_number()
    csv_text = f"number,region\n{a},{fresh_region}\n8{b[2:]},{fresh_region}\n"
    status, counts = await api.request("POST", "/v1/pool-numbers", data=csv_text, headers={"Content-Type": "text/csv"})
    assert status == 201 and counts == {"added": 2, "updated": 0, "reactivated": 0, "unchanged": 0}
    assert await api.import_pool([a, b, c], fresh_region) == {"added": 1, "updated": 0, "reactivated": 0,
                                                              "unchanged": 2}
    status, listed = await api.request("GET", f"/v1/pool-numbers?region={fresh_region}&limit=2")
    assert [n["number"] for n in listed["items"]] == sorted([a, b, c])[:2] and listed["next_cursor"]
    status, rest = await api.request("GET", f"/v1/pool-numbers?region={fresh_region}&cursor={listed['next_cursor']}")
    assert [n["number"] for n in rest["items"]] == sorted([a, b, c])[2:]

    status, retired = await api.request("POST", f"/v1/pool-numbers/{a}/retire")
    assert status == 200 and retired["state"] == "cooling" and retired["cooling_until"]
    status, usage = await api.request("GET", "/v1/pool-usage")
    mine = next(r for r in usage["regions"] if r["region"] == fresh_region)
    assert (mine["active"], mine["cooling"], mine["retired"]) == (2, 1, 0)
    # A cooling number is not handed out.
    status, session = await api.request(
        "POST", "/v1/sessions",
        json={"order_id": f"order-{uuid.uuid4()}", "courier_number": real_number(), "client_number": real_number(),
              "region": fresh_region},
    )
    api.opened.append(session["id"])
    assert session["pool_number"] in (b, c)
    status, one = await api.request("GET", f"/v1/pool-numbers/{session['pool_number']}")
    assert one["live_sessions"] == 1


async def test_openapi_document_is_served_without_a_token(api):
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(api.base + "/v1/openapi.json") as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["openapi"].startswith("3.") and "/v1/sessions" in doc["paths"]
    # The document as served, checked against the OpenAPI 3.1 meta-schema (raises on the first fault).
    validate(doc)


GOOD = {"order_id": "o-1", "courier_number": "+79161234567", "client_number": "+79161234568"}


def _with(**changes):
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not ...}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (_with(courier_number="not a number"), 422, "invalid_input"),
        (_with(courier_number="+7916"), 422, "invalid_input"),
        (_with(courier_number="9" * 40), 422, "invalid_input"),
        (_with(client_number="89161234567"), 422, "invalid_input"),  # the courier's number, national form
        (_with(client_number="+79161234567"), 422, "invalid_input"),
        (_with(order_id=""), 422, "invalid_input"),
        (_with(order_id="x" * 201), 422, "invalid_input"),
        (_with(order_id="has space"), 422, "invalid_input"),
        (_with(order_id=...), 422, "invalid_input"),
        (_with(courier_number=...), 422, "invalid_input"),
        (_with(client_number=None), 422, "invalid_input"),
        (_with(courier_number=79161234567), 422, "invalid_input"),
        (_with(region="Moscow"), 422, "invalid_input"),
        (_with(region="QQ-XYZ"), 422, "unknown_region"),
        (_with(ttl_seconds=0), 422, "invalid_input"),
        (_with(ttl_seconds=10**9), 422, "invalid_input"),
        (_with(ttl_seconds="3600"), 422, "invalid_input"),
        (_with(idle_timeout_seconds=True), 422, "invalid_input"),
        (_with(grace_seconds=-1), 422, "invalid_input"),
        (_with(surprise="field"), 422, "invalid_input"),
        (["not", "an", "object"], 400, "invalid_json"),
        ("{not json", 400, "invalid_json"),
        (_with(order_id="x" * 70_000), 413, "body_too_large"),
    ],
)
async def test_bad_input_gets_its_4xx_and_changes_nothing(api, db, body, status, code):
    tables = ("sessions", "participants", "session_events", "pool_numbers")

    async def counts():
        return [await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables]

    before = await counts()
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) else {"json": body}
    got, answer = await api.request("POST", "/v1/sessions", **kwargs)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert answer["error"]["message"]
    assert "9161234567" not in answer["error"]["message"], "no real number in an error"
    assert await counts() == before


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/pool-numbers", {"numbers": [{"number": "+74950000001"}, {"number": "junk"}]}, 422,
         "invalid_import"),
        ("POST", "/v1/pool-numbers", {"numbers": [{"number": "+74957700001", "region": "nope"}]}, 422,
         "invalid_import"),
        # (Python's `$` takes a trailing newline: the region is checked whole.)
        ("POST", "/v1/pool-numbers", {"numbers": [{"number": "+74957700002", "region": "RU\n"}]}, 422,
         "invalid_import"),
        ("POST", "/v1/pool-numbers", {"numbers": []}, 422, "invalid_input"),
        ("POST", "/v1/pool-numbers", {"numbers": "+74950000001"}, 422, "invalid_input"),
        ("GET", "/v1/sessions?limit=0", None, 422, "invalid_input"),
        ("GET", "/v1/sessions?limit=%C2%B2", None, 422, "invalid_input"),
        ("GET", "/v1/sessions?cursor=bm90LWpzb24", None, 422, "invalid_input"),
        ("GET", "/v1/sessions?status=lost", None, 422, "invalid_input"),
        ("GET", "/v1/pool-numbers/12", None, 422, "invalid_input"),
        ("GET", "/v1/pool-numbers/+74959999999", None, 404, "pool_number_not_found"),
        ("POST", f"/v1/sessions/{uuid.uuid4()}/close", None, 404, "session_not_found"),
        ("POST", f"/v1/sessions/{uuid.uuid4()}/participants", {"role": "courier", "number": "+79161234567"}, 404,
         "session_not_found"),
        ("GET", "/v1/calls", None, 422, "invalid_input"),
        ("DELETE", "/v1/sessions", None, 405, "method_not_allowed"),
        ("GET", "/v1/nothing-here", None, 404, "not_found"),
    ],
)
async def test_bad_requests_elsewhere_get_their_4xx_and_change_nothing(api, db, method, path, body, status, code):
    before = await db.fetchval("SELECT count(*) FROM pool_numbers")
    got, answer = await api.request(method, path, json=body)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert await db.fetchval("SELECT count(*) FROM pool_numbers") == before


async def test_wrong_or_missing_token_is_refused_everywhere(api):
    for path in ("/v1/sessions", "/v1/pool-numbers", "/v1/pool-usage", f"/v1/sessions/{uuid.uuid4()}"):
        for headers in (
            {"Authorization": "Bearer wrong-token-wrong-token"},
            {"Authorization": ""},
            {"Authorization": "Basic " + api.http.headers["Authorization"].split()[1]},
        ):
            async with api.http.get(api.base + path, headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_unknown_session_is_404(api):
    for path in (f"/v1/sessions/{uuid.uuid4()}", "/v1/sessions/not-a-uuid"):
        status, answer = await api.request("GET", path)
        assert status == 404 and answer["error"]["code"] == "session_not_found"
