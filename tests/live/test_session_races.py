"""Hundreds of opens at once through the running bridge's HTTP API, over shared people."""

from __future__ import annotations

import asyncio
import uuid


async def test_racing_opens_never_collide_and_never_duplicate_an_order(
    api, db, real_number, fresh_region, new_pool_number
):
    couriers = [real_number() for _ in range(12)]
    clients = [real_number() for _ in range(20)]
    n = max(len(couriers), len(clients))  # live sessions per person at the end
    # 2N-1 numbers always suffice; the region gets that many, the rest of the pool adds more.
    await api.import_pool([new_pool_number() for _ in range(2 * n - 1)], fresh_region)
    prefix = f"race-{uuid.uuid4()}"
    wanted = [
        {"order_id": f"{prefix}-{i}-{j}", "courier_number": c, "client_number": k, "region": fresh_region}
        for i, c in enumerate(couriers)
        for j, k in enumerate(clients)
    ]
    requests = wanted + wanted[::4]  # 60 orders are asked for twice, at the same moment

    answers = await asyncio.gather(*(api.request("POST", "/v1/sessions", json=body) for body in requests))
    api.opened.extend({a["id"] for s, a in answers if s in (200, 201)})

    assert [s for s, _ in answers if s not in (200, 201)] == [], [a for s, a in answers if s not in (200, 201)][:3]
    assert sum(s == 201 for s, _ in answers) == len(wanted), "one session created per order"
    by_order: dict[str, set[str]] = {}
    for body, (_, answer) in zip(requests, answers):
        by_order.setdefault(body["order_id"], set()).add(answer["id"])
    assert all(len(ids) == 1 for ids in by_order.values()), "a repeated order gets the same session"
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE order_id LIKE $1", prefix + "%") == len(wanted)

    # No person holds one pool number twice: every call stays routable. (Participants of
    # order-code sessions share their number on purpose: their code routes them.)
    numbers_of: dict[str, list[str]] = {}
    for body, (_, answer) in zip(wanted, answers[: len(wanted)]):
        numbers_of.setdefault(body["courier_number"], []).append(answer["pool_number"])
        numbers_of.setdefault(body["client_number"], []).append(answer["pool_number"])
    assert all(len(v) == len(set(v)) for v in numbers_of.values())
    assert not await db.fetch(
        "SELECT 1 FROM participants WHERE holds AND NOT by_code GROUP BY number_idx, pool_number HAVING count(*) > 1"
    )
