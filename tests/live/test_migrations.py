"""Upgrading a database of the walking skeleton (sql/001 only) to the current schema: every
real number is sealed, old rows meet the new rules, and calls route as before."""

from __future__ import annotations

import shutil

import asyncpg

from bridge.crypto import NumberVault, participant_number, period_of
from bridge.sessions import Policy, Sessions
from bridge.store import Store, migrate
from bridge.store.db import SQL_DIR
from bridge.store.number_keys import NumberKeyRepo

SCHEMA = "scratch_migration_from_001"
KEY = "migration-test-key-migration-test-key-01"


async def test_a_001_database_upgrades_without_losing_anything(stack, tmp_path):
    only_001 = tmp_path / "sql"
    only_001.mkdir()
    shutil.copy(SQL_DIR / "001_sessions_and_calls.sql", only_001)
    admin = await asyncpg.connect(stack.database_url)
    await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2,
                                     server_settings={"search_path": SCHEMA})
    assert pool is not None
    vault = NumberVault(KEY)
    try:
        assert await migrate(pool, vault, only_001) == ["001_sessions_and_calls.sql"]
        # What the walking skeleton wrote: a free-text region, a cooling number, an open
        # session, one closed an hour ago and one closed a week ago, and their calls.
        await pool.execute(
            """INSERT INTO pool_numbers (number, region, state) VALUES
               ('+74950000001', 'ru-mow', 'active'), ('+74950000002', 'Moscow', 'active'),
               ('+74950000003', NULL, 'cooling')"""
        )
        sessions = {}
        for name, closed in (("open", None), ("recent", "1 hour"), ("old", "7 days")):
            sessions[name] = await pool.fetchval(
                f"""INSERT INTO sessions (order_id, pool_number, status, created_at, closed_at)
                    VALUES ($1, '+74950000001', $2, now() - interval '8 days',
                            {'NULL' if closed is None else f"now() - interval '{closed}'"}) RETURNING id""",
                name, "open" if closed is None else "closed",
            )
        people = {"open": ("+79160000011", "+79160000012"), "recent": ("+79160000021", "+79160000022"),
                  "old": ("+79160000031", "+79160000032")}
        for name, (courier, client) in people.items():
            live = name == "open"
            await pool.executemany(
                "INSERT INTO participants (session_id, role, real_number, pool_number, live) VALUES ($1, $2, $3, $4, $5)",
                [(sessions[name], "courier", courier, "+74950000001", live),
                 (sessions[name], "client", client, "+74950000001", live)],
            )
            await pool.execute(
                """INSERT INTO calls (id, session_id, pool_number, caller_role, caller_masked, state, outcome,
                                      hangup_by, inbound_channel_id, outbound_channel_id, started_at, answered_at,
                                      ended_at)
                   VALUES (gen_random_uuid(), $1, '+74950000001', 'courier', '+7916***0011', 'ended', 'answered',
                           'caller', 'in', 'out', now() - interval '8 days', now() - interval '8 days',
                           now() - interval '8 days')""",
                sessions[name],
            )

        applied = await migrate(pool, vault)
        assert applied == [p.name for p in sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))][1:]

        columns = {r["column_name"] for r in await pool.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'participants'",
            SCHEMA,
        )}
        assert "real_number" not in columns and {"number_idx", "number_enc"} <= columns
        # Sealed with today's data key (sql/023), each bound to its row; found by the same index.
        keys = NumberVault(KEY, NumberKeyRepo(pool))
        await keys.start()
        assert await pool.fetchval("SELECT count(*) FROM number_data_keys") == 1
        for row in await pool.fetch("SELECT id, number_enc, number_idx FROM participants"):
            assert period_of(row["number_enc"]) is not None, "no number is left in format 1"
            number = await keys.open(row["number_enc"], participant_number(row["id"]))
            assert number is not None and number.startswith("+7916000")
            assert row["number_idx"] == keys.index(number)
        regions = dict(await pool.fetch("SELECT number, region FROM pool_numbers ORDER BY number"))
        assert regions == {"+74950000001": "RU-MOW", "+74950000002": None, "+74950000003": None}
        assert await pool.fetchval("SELECT cooling_until > now() FROM pool_numbers WHERE state = 'cooling'")
        assert await pool.fetchval(
            "SELECT count(*) FROM calls WHERE caller_participant_id IS NOT NULL AND callee_role = 'client'"
        ) == 3

        service = Sessions(Store(pool), keys, Policy())
        route = await service.route(people["open"][0], "+74950000001")
        assert (route.kind, route.callee_number, route.callee_role) == ("connect", people["open"][1], "client")
        # Closed an hour ago: still cooling off, told that the order finished.
        assert (await service.route(people["recent"][1], "+74950000001")).kind == "finished"
        # Closed a week ago: a stranger to the number now.
        assert (await service.route(people["old"][0], "+74950000001")).kind == "unknown"
        events = await pool.fetch("SELECT kind FROM session_events WHERE session_id = $1 ORDER BY id",
                                  sessions["recent"])
        assert [e["kind"] for e in events] == ["opened", "closed"]
        # Masked as issue 15 asks: the last two digits only (the old form kept eight).
        assert {r["caller_masked"] for r in await pool.fetch("SELECT caller_masked FROM calls")} == {"+***11"}
        assert await migrate(pool, vault) == [], "a second start applies nothing"
    finally:
        await pool.close()
        await admin.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
        await admin.close()


async def test_every_foreign_key_has_an_index(db):
    """A delete of the referenced row (a purge, a retention job) checks the referencing
    column: without an index that is a scan of the whole table per row deleted."""
    unindexed = await db.fetch(
        """SELECT c.conrelid::regclass::text AS tbl, a.attname AS col
           FROM pg_constraint c
           JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
           WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
             AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid AND i.indkey[0] = c.conkey[1])"""
    )
    # (languages: two rows the bridge never deletes)
    assert {(r["tbl"], r["col"]) for r in unindexed} <= {("pool_numbers", "language")}, unindexed
