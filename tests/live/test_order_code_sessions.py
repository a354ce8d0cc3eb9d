"""Order-code sessions against the real Postgres, in a schema of their own: the direct
allocator never hands out an order-code number, codes stay unique on a number however many
opens race, the code routes, and the lockout counts and ends with its window."""

from __future__ import annotations

import asyncio

import pytest

from bridge.blocklist import Blocklist
from bridge.errors import Conflict, PoolExhausted
from bridge.sessions import Policy, Sessions
from tests.live.conftest import Harness, opening

SHARED = "+74957770001"
DIRECT = "+74957770002"
COURIER, CLIENT, OTHER_CLIENT, STRANGER = "+79165550001", "+79165550002", "+79165550003", "+79165550004"


@pytest.fixture
def h(scratch_db: Harness) -> Harness:
    scratch_db.run(scratch_db.pool.execute(
        "TRUNCATE order_code_failures, blocked_numbers, calls, session_events, participants, sessions, pool_numbers CASCADE"
    ))
    scratch_db.run(scratch_db.pools.import_numbers([{"number": SHARED, "region": "RU-MOW", "mode": "order_code"}]))
    return scratch_db


def sessions_of(h: Harness, **policy: int) -> Sessions:
    return Sessions(h.store, h.vault, Policy(pair_cooloff=3600, **policy))  # type: ignore[arg-type]


def test_a_direct_open_never_gets_an_order_code_number(h: Harness) -> None:
    s = sessions_of(h)
    with pytest.raises(PoolExhausted) as exhausted:
        h.run(s.open(opening("direct-1", COURIER, CLIENT, region="RU-MOW")))
    assert exhausted.value.details["active_numbers"] == 0
    h.run(h.pools.import_numbers([{"number": DIRECT, "region": "RU-SPE"}]))
    for i in range(3):  # the region asked for has only the shared number: the direct one anyway
        session, _ = h.run(s.open(opening(f"direct-{i}", f"+7916555200{i}", f"+7916555100{i}", region="RU-MOW")))
        assert (session.pool_number, session.mode, session.order_code) == (DIRECT, "direct", None)


def test_racing_opens_with_one_code_on_one_number_give_it_once(h: Harness) -> None:
    s = sessions_of(h)

    async def race() -> list[object]:
        return await asyncio.gather(
            *(s.open(opening(f"race-{i}", f"+7916556{i:04d}", f"+7916557{i:04d}", mode="order_code", order_code="777777"))
              for i in range(8)),
            return_exceptions=True,
        )

    results = h.run(race())
    won = [r for r in results if isinstance(r, tuple)]
    lost = [r for r in results if isinstance(r, Conflict)]
    assert len(won) == 1 and len(lost) == 7, results
    assert {e.code for e in lost} == {"order_code_taken"}
    assert h.run(h.pool.fetchval("SELECT count(*) FROM sessions WHERE order_code = '777777'")) == 1


def test_random_codes_stay_unique_on_a_shared_number(h: Harness) -> None:
    s = sessions_of(h, order_code_length=4)

    async def many() -> list[object]:
        return await asyncio.gather(
            *(s.open(opening(f"many-{i}", f"+7916558{i:04d}", f"+7916559{i:04d}", mode="order_code")) for i in range(40))
        )

    opened = h.run(many())
    codes = [session.order_code for session, _ in opened]
    assert all(len(code) == 4 and code.isdigit() for code in codes)
    assert len(set(codes)) == 40 and {session.pool_number for session, _ in opened} == {SHARED}


def test_the_code_routes_and_the_lockout_counts_and_ends(h: Harness) -> None:
    s = sessions_of(h, order_code_attempts=3, order_code_lockout=900)
    one, _ = h.run(s.open(opening("order-1", COURIER, CLIENT, mode="order_code")))
    two, _ = h.run(s.open(opening("order-2", COURIER, OTHER_CLIENT, mode="order_code")))
    assert one.pool_number == two.pool_number == SHARED  # one courier, two orders, one number
    assert h.run(s.route(COURIER, SHARED)).kind == "order_code"  # a direct lookup: ask for the code

    route = h.run(s.route_by_code(COURIER, SHARED, two.order_code or ""))
    assert (route.kind, route.callee_number, route.session_id) == ("connect", OTHER_CLIENT, two.id)
    assert route.shown_number == SHARED
    route = h.run(s.route_by_code(CLIENT, SHARED, one.order_code or ""))
    assert (route.kind, route.callee_number) == ("connect", COURIER)

    # Someone outside the order, with its right code: wrong, and the third one locks them out.
    kinds = [h.run(s.route_by_code(STRANGER, SHARED, one.order_code or "")).kind for _ in range(3)]
    assert kinds == ["wrong_code", "wrong_code", "locked_out"]
    assert h.run(s.route(STRANGER, SHARED)).kind == "locked_out"
    assert h.run(s.route(COURIER, SHARED)).kind == "order_code", "other callers are not affected"
    stored = h.run(h.pool.fetch("SELECT * FROM order_code_failures"))
    assert {r["number_idx"] for r in stored} == {h.vault.index(STRANGER)}, "by blind index only"

    # Once the window has passed, the stranger is asked again, and housekeeping forgets them.
    h.run(h.pool.execute("UPDATE order_code_failures SET at = at - interval '901 seconds'"))
    assert h.run(s.route(STRANGER, SHARED)).kind == "order_code"
    assert h.run(s.sweep()).get("wrong_codes_forgotten") == 3
    assert h.run(h.pool.fetchval("SELECT count(*) FROM order_code_failures")) == 0


def test_a_closed_order_code_session_routes_nothing(h: Harness) -> None:
    """Its participants keying its code hear that the order finished, and that is no wrong
    code: a courier keying a delivered order's code thrice is not locked out of their live
    orders on the number. To anyone else, the code is wrong."""
    s = sessions_of(h, order_code_attempts=3)
    one, _ = h.run(s.open(opening("order-1", COURIER, CLIENT, mode="order_code")))
    live, _ = h.run(s.open(opening("order-live", COURIER, OTHER_CLIENT, mode="order_code")))
    h.run(s.close(one.id))
    kinds = [h.run(s.route_by_code(COURIER, SHARED, one.order_code or "")).kind for _ in range(3)]
    assert kinds == ["finished"] * 3
    assert h.run(s.route_by_code(COURIER, SHARED, live.order_code or "")).kind == "connect"
    assert h.run(s.route_by_code(STRANGER, SHARED, one.order_code or "")).kind == "wrong_code"
    # Its code is free again on the number.
    again, _ = h.run(s.open(opening("order-2", COURIER, CLIENT, mode="order_code", order_code=one.order_code)))
    assert again.order_code == one.order_code


def test_a_reassigned_courier_keeps_the_shared_number(h: Harness) -> None:
    s = sessions_of(h)
    one, _ = h.run(s.open(opening("order-1", COURIER, CLIENT, mode="order_code")))
    session, changed = h.run(s.reassign_courier(one.id, STRANGER))
    assert changed and {p.pool_number for p in session.participants} == {SHARED}
    assert h.run(s.route_by_code(STRANGER, SHARED, one.order_code or "")).callee_number == CLIENT
    assert h.run(s.route_by_code(COURIER, SHARED, one.order_code or "")).kind == "finished"


def test_the_blocklist_applies_to_calls_by_code(h: Harness) -> None:
    s = sessions_of(h)
    one, _ = h.run(s.open(opening("order-1", COURIER, CLIENT, mode="order_code")))
    h.run(Blocklist(h.store, h.vault).add(CLIENT, "test"))
    assert h.run(s.route_by_code(COURIER, SHARED, one.order_code or "")).kind == "blocked"
    assert h.run(s.route_by_code(CLIENT, SHARED, one.order_code or "")).kind == "blocked"
