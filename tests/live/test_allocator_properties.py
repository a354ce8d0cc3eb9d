"""Property-based tests of the pool allocator (hypothesis), against the real Postgres of the
stack, in a schema of their own so that the running bridge never sees them.

Any sequence of opens, closes, reassignments, expiries, cool-off ends, retirements and
re-imports keeps the invariants, and every open picks what the rules say it must, as
computed here independently of the SQL in bridge/store.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import Conflict, InvalidInput, PoolExhausted
from tests.live.conftest import Harness, opening

PEOPLE = [f"+7916555{i:04d}" for i in range(4)]
NUMBERS = [f"+7495666{i:04d}" for i in range(5)]
REGIONS = ["RU-MOW", "RU-SPE"]
TABLES = "recording_access, recordings, calls, session_events, participants, sessions, pool_numbers"


@pytest.fixture(scope="module")
def harness(scratch_db) -> Harness:
    return scratch_db


# --- the model: what the database says, read plainly -----------------------------------------


async def holding(conn: asyncpg.Pool) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT p.*, s.order_id, s.created_at FROM participants p JOIN sessions s ON s.id = p.session_id
           WHERE p.holds AND (p.held_until IS NULL OR p.held_until > now())"""
    )


async def free_numbers(h: Harness, courier: str, client: str) -> dict[str, dict[str, Any]]:
    """Active numbers free for both, with their region and load, by the rules in words:
    nobody of the pair holds the number, except the pair's own cooling holds from a session
    they had together."""
    c, k = h.vault.index(courier), h.vault.index(client)
    rows = await holding(h.pool)
    everyone = await h.pool.fetch("SELECT session_id, role, number_idx FROM participants")
    members: dict[uuid.UUID, set[tuple[str, bytes]]] = {}
    for r in everyone:
        members.setdefault(r["session_id"], set()).add((r["role"], r["number_idx"]))
    blocked = set()
    for r in rows:
        if r["number_idx"] not in (c, k):
            continue
        other = k if r["number_idx"] == c else c
        own_cooling = r["left_at"] is not None and any(
            role != r["role"] and idx == other for role, idx in members[r["session_id"]]
        )
        if not own_cooling:
            blocked.add(r["pool_number"])
    load: dict[str, int] = {}
    for r in await h.pool.fetch("SELECT pool_number FROM participants WHERE holds"):
        load[r["pool_number"]] = load.get(r["pool_number"], 0) + 1
    return {
        r["number"]: {"region": r["region"], "load": load.get(r["number"], 0)}
        for r in await h.pool.fetch("SELECT number, region FROM pool_numbers WHERE state = 'active'")
        if r["number"] not in blocked
    }


async def last_pair_number(h: Harness, courier: str, client: str) -> str | None:
    c, k = h.vault.index(courier), h.vault.index(client)
    return await h.pool.fetchval(
        """SELECT s.pool_number FROM sessions s
           WHERE EXISTS (SELECT 1 FROM participants a, participants b WHERE a.session_id = s.id
                         AND b.session_id = s.id AND a.role <> b.role AND a.number_idx = $1 AND b.number_idx = $2)
           ORDER BY s.created_at DESC LIMIT 1""",
        c, k,
    )


async def check_invariants(h: Harness) -> None:
    rows = await holding(h.pool)
    pairs = [(r["number_idx"], r["pool_number"]) for r in await h.pool.fetch("SELECT * FROM participants WHERE holds")]
    assert len(pairs) == len(set(pairs)), "a (real number, pool number) pair has two holders"
    assert not await h.pool.fetch(
        "SELECT order_id FROM sessions WHERE status = 'open' GROUP BY order_id HAVING count(*) > 1"
    ), "two open sessions for one order"
    for s in await h.pool.fetch("SELECT id, status FROM sessions"):
        live = await h.pool.fetch("SELECT role FROM participants WHERE session_id = $1 AND left_at IS NULL", s["id"])
        roles = sorted(r["role"] for r in live)
        expected = {"open": ["client", "courier"], "grace": ["client"], "closed": []}[s["status"]]
        assert roles == expected, (s["status"], roles)
    assert not await h.pool.fetch(
        """SELECT 1 FROM participants p JOIN pool_numbers n ON n.number = p.pool_number
           WHERE p.left_at IS NULL AND n.state = 'retired'"""
    ), "a live participant on a retired number"
    assert all(r["left_at"] is None or r["held_until"] is not None for r in rows)
    assert not await h.pool.fetch(
        """SELECT p.number FROM pool_numbers p WHERE p.holders <> (
               SELECT count(*) FROM participants h WHERE h.holds AND NOT h.by_code AND h.pool_number = p.number)"""
    ), "every number's holders (the allocator's load, sql/027) is its count of direct holders, at every commit"


# --- operations ---------------------------------------------------------------------------------

person = st.sampled_from(PEOPLE)
order = st.integers(0, 2)
op = st.one_of(
    st.tuples(st.just("open"), order, person, person, st.sampled_from([None, *REGIONS])),
    st.tuples(st.just("close"), order),
    st.tuples(st.just("reassign"), order, person),
    st.tuples(st.just("expire"), order),
    st.tuples(st.just("cool_off_ends")),
    st.tuples(st.just("retire"), st.sampled_from(NUMBERS)),
    st.tuples(st.just("reimport"), st.sampled_from(NUMBERS)),
)


async def open_session(h: Harness, o: int, courier: str, client: str, region: str | None) -> None:
    order_id = f"order-{o}"
    before = await h.pool.fetchrow(
        "SELECT id FROM sessions WHERE order_id = $1 AND status = 'open'", order_id
    )
    if courier == client:
        with pytest.raises(InvalidInput):
            await h.sessions.open(opening(order_id, courier, client, region=region))
        return
    known_region = region is None or await h.pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pool_numbers WHERE region = $1)", region
    )
    free = await free_numbers(h, courier, client)
    sticky = await last_pair_number(h, courier, client)
    try:
        session, created = await h.sessions.open(opening(order_id, courier, client, region=region))
    except InvalidInput as exc:
        assert exc.code == "unknown_region" and not known_region
        return
    except PoolExhausted as exc:
        assert before is None and not free, "exhausted although a number was free for both"
        active = await h.pool.fetchval("SELECT count(*) FROM pool_numbers WHERE state = 'active'")
        assert exc.details["active_numbers"] == active
        assert exc.details["numbers_needed"] > active
        return
    except Conflict as exc:
        assert before is not None and exc.code == "order_has_open_session"
        return
    if before is not None:
        assert not created and session.id == before["id"], "an open order is answered with its session"
        return
    assert created
    chosen = session.pool_number
    assert chosen in free, "the number must be free for both"
    if sticky in free:
        assert chosen == sticky, "the pair's last number, when free, comes first"
        return
    tier = {n for n, f in free.items() if region is not None and f["region"] == region} or set(free)
    assert chosen in tier, "the client's region comes before the others"
    assert free[chosen]["load"] == min(free[n]["load"] for n in tier), "the least loaded number of the tier"


async def apply(h: Harness, step: tuple[Any, ...]) -> None:
    kind = step[0]
    current = None
    if kind in ("close", "reassign", "expire"):
        current = await h.pool.fetchval("SELECT id FROM sessions WHERE order_id = $1 AND status = 'open'",
                                        f"order-{step[1]}")
    if kind == "open":
        await open_session(h, *step[1:])
    elif kind == "close" and current is not None:
        await h.sessions.close(current)
    elif kind == "reassign" and current is not None:
        try:
            session, _ = await h.sessions.reassign_courier(current, step[2])
        except (InvalidInput, PoolExhausted):
            return
        courier = session.live("courier")
        assert courier is not None and h.sessions.reveal(courier) == step[2]
    elif kind == "expire" and current is not None:
        await h.pool.execute("UPDATE sessions SET expires_at = now() - interval '1 second' WHERE id = $1", current)
        await h.sessions.sweep()
        assert await h.pool.fetchval("SELECT status FROM sessions WHERE id = $1", current) == "closed"
    elif kind == "cool_off_ends":
        await h.pool.execute(
            "UPDATE participants SET held_until = now() - interval '1 second' WHERE holds AND left_at IS NOT NULL"
        )
        await h.sessions.sweep()
    elif kind == "retire":
        if await h.pool.fetchval("SELECT state FROM pool_numbers WHERE number = $1", step[1]) == "active":
            row = await h.pools.retire(step[1])
            assert row.state == "cooling"
    elif kind == "reimport":
        await h.pools.import_numbers([{"number": step[1], "region": REGIONS[NUMBERS.index(step[1]) % 2]}])


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pool_size=st.integers(1, 5), steps=st.lists(op, max_size=25))
def test_any_sequence_keeps_the_invariants(harness: Harness, pool_size: int, steps: list[tuple[Any, ...]]) -> None:
    async def scenario() -> None:
        await harness.pool.execute(f"TRUNCATE {TABLES}")
        await harness.pools.import_numbers(
            [{"number": n, "region": REGIONS[i % 2]} for i, n in enumerate(NUMBERS[:pool_size])]
        )
        for step in steps:
            await apply(harness, step)
            await check_invariants(harness)

    harness.run(scenario())


def test_racing_opens_over_shared_people_never_collide(harness: Harness) -> None:
    """Hundreds of opens at once, on a pool just large enough (2N-1 numbers for N sessions
    per person): zero pair collisions, one session per order, and everyone is served."""
    couriers = [f"+7916777{i:04d}" for i in range(8)]
    clients = [f"+7916888{i:04d}" for i in range(8)]
    n = 8  # every person takes part in 8 sessions
    numbers = [f"+7495999{i:04d}" for i in range(2 * n - 1)]

    async def scenario() -> None:
        await harness.pool.execute(f"TRUNCATE {TABLES}")
        await harness.pools.import_numbers([{"number": x} for x in numbers])
        wanted = [(f"race-{i}-{j}", couriers[i], clients[j]) for i in range(n) for j in range(n)]
        requests = wanted + wanted[:36]  # some orders are asked for twice, at the same moment
        results = await asyncio.gather(*(harness.sessions.open(opening(*r)) for r in requests), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        ids: dict[str, set[uuid.UUID]] = {}
        for (order_id, _, _), (session, _) in zip(requests, results):  # type: ignore[misc]
            ids.setdefault(order_id, set()).add(session.id)
        assert all(len(v) == 1 for v in ids.values()), "one session per order"
        assert await harness.pool.fetchval("SELECT count(*) FROM sessions") == len(wanted)
        await check_invariants(harness)
        for person in couriers + clients:
            held = await harness.pool.fetch(
                "SELECT pool_number FROM participants WHERE number_idx = $1 AND left_at IS NULL",
                harness.vault.index(person),
            )
            assert len(held) == n and len({r["pool_number"] for r in held}) == n

    harness.run(scenario())


def test_racing_opens_with_people_in_both_roles_never_deadlock_or_collide(harness: Harness) -> None:
    """Every person is a courier in some orders and a client in others, all opened at once:
    two opens sharing both people in opposite roles must queue, not deadlock."""
    people = [f"+7916444{i:04d}" for i in range(8)]
    n = 2 * (len(people) - 1)  # each person: 7 sessions as courier, 7 as client
    numbers = [f"+7495444{i:04d}" for i in range(2 * n - 1)]

    async def scenario() -> None:
        await harness.pool.execute(f"TRUNCATE {TABLES}")
        await harness.pools.import_numbers([{"number": x} for x in numbers])
        wanted = [(f"both-{i}-{j}", a, b) for i, a in enumerate(people) for j, b in enumerate(people) if a != b]
        results = await asyncio.gather(*(harness.sessions.open(opening(*w)) for w in wanted), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        await check_invariants(harness)
        assert await harness.pool.fetchval("SELECT count(*) FROM sessions WHERE status = 'open'") == len(wanted)

    harness.run(scenario())


def test_a_repeated_reassignment_racing_itself_changes_the_courier_once(harness: Harness) -> None:
    async def scenario() -> None:
        await harness.pool.execute(f"TRUNCATE {TABLES}")
        await harness.pools.import_numbers([{"number": x} for x in NUMBERS])
        session, _ = await harness.sessions.open(opening("order-r", PEOPLE[0], PEOPLE[1]))
        results = await asyncio.gather(*(harness.sessions.reassign_courier(session.id, PEOPLE[2]) for _ in range(6)))
        assert sum(changed for _, changed in results) == 1
        final = await harness.sessions.get(session.id)
        courier = final.live("courier")
        assert courier is not None and harness.sessions.reveal(courier) == PEOPLE[2]
        assert courier.pool_number == session.pool_number, "the new courier gets the client's number when free"
        assert [p.role for p in final.participants].count("courier") == 2
        await check_invariants(harness)

    harness.run(scenario())


def test_two_opens_with_the_same_people_in_opposite_roles_queue_instead_of_deadlocking(harness: Harness) -> None:
    """(A courier, B client) and (B courier, A client) on the same number (the only one) at the
    same moment: one wins, the other is told the pair is taken, and neither is aborted as a
    deadlock."""
    from bridge.crypto import participant_number
    from bridge.store.sessions import PairTaken, Sealed, SessionTerms

    a, b = PEOPLE[0], PEOPLE[1]

    async def sealed(person: str) -> Sealed:  # (a new participant row each time: its id is bound in)
        row = uuid.uuid4()
        return Sealed(row, harness.vault.index(person), await harness.vault.seal(person, participant_number(row)))

    terms = SessionTerms(region=None, ttl_seconds=3600, idle_timeout_seconds=None, grace_seconds=0)

    async def scenario() -> None:
        await harness.pool.execute(f"TRUNCATE {TABLES}")
        await harness.pools.import_numbers([{"number": NUMBERS[0]}])
        for round_ in range(10):
            # Both opens are held at the number's row lock and let go together, so that
            # their inserts interleave.
            gate = await harness.pool.acquire()
            tx = gate.transaction()
            await tx.start()
            await gate.execute("SELECT 1 FROM pool_numbers WHERE number = $1 FOR UPDATE", NUMBERS[0])
            x, y = [await sealed(a), await sealed(b)], [await sealed(b), await sealed(a)]
            opens = asyncio.gather(
                harness.sessions.repo.open(f"x-{round_}", *x, terms),
                harness.sessions.repo.open(f"y-{round_}", *y, terms),
                return_exceptions=True,
            )
            async with asyncio.timeout(10):
                while await gate.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
                ) < 2:
                    await asyncio.sleep(0.005)  # wait-ok: polling Postgres until both opens wait
            await tx.commit()
            await harness.pool.release(gate)
            results = await opens
            lost = [r for r in results if isinstance(r, BaseException)]
            assert len(lost) == 1 and isinstance(lost[0], PairTaken), results
            assert isinstance(lost[0].__cause__, asyncpg.UniqueViolationError), "a deadlock, not a queue"
            await harness.pool.execute("UPDATE participants SET holds = false, left_at = now(), held_until = now()")
            await harness.pool.execute("UPDATE sessions SET status = 'closed', closed_at = now(), end_reason = 'closed'")

    harness.run(scenario())
