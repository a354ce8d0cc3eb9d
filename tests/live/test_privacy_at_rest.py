"""Real numbers at rest: sealed in the database, found only through the keyed index, and
deleted by the retention job once their sessions are old, while the call records stay."""

from __future__ import annotations

import subprocess
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from structlog.testing import capture_logs

from bridge import metrics
from bridge.api.http import render_session
from bridge.phone import mask
from bridge.blocklist import Blocklist
from bridge.crypto import MasterKeys, NumberVault, VaultError, participant_number
from bridge.devstack import postgres
from bridge.number_keys import NumberKeys
from bridge.sessions import Sessions
from bridge.store.number_keys import NumberKeyRepo
from tests.live.conftest import SCRATCH_KEY, Harness, opening


@pytest.fixture(scope="module")
def harness(scratch_db) -> Harness:
    return scratch_db


async def test_no_real_number_is_stored_in_plaintext_anywhere(api, real_number, stack):
    """A dump of the whole database (every table, every column, the events' JSON too) holds
    none of the real numbers of a session that was opened, reassigned and closed."""
    courier, client, second = real_number(), real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    await api.request("POST", f"/v1/sessions/{session['id']}/participants", json={"role": "courier", "number": second})
    await api.close_session(session["id"])
    dump = subprocess.run(
        postgres.dump_command(stack), capture_output=True, text=True, check=True, errors="replace"
    ).stdout
    assert session["id"] in dump, "the dump is of the right database"
    for number in (courier, client, second):
        assert number[2:] not in dump, "a real number is in the database in plaintext"
    # Nor is it kept under an unkeyed hash of any usual form.
    import hashlib

    for number in (courier, client):
        for form in (number, number[1:], number[2:]):
            for algo in ("md5", "sha1", "sha256"):
                assert hashlib.new(algo, form.encode()).hexdigest() not in dump


def test_retention_removes_old_real_numbers_and_keeps_the_call_records(harness: Harness) -> None:
    async def scenario() -> None:
        h = harness
        await h.pool.execute(
            "TRUNCATE recording_access, recordings, calls, session_events, participants, sessions, pool_numbers"
        )
        await h.pools.import_numbers([{"number": f"+749511100{i:02d}"} for i in range(4)])
        people = [f"+79161110{i:03d}" for i in range(8)]
        old, recent, still_open, reassigned = [
            (await h.sessions.open(opening(f"order-{i}", people[2 * i], people[2 * i + 1])))[0] for i in range(4)
        ]
        # The old session's courier called; its call ended 31 days ago with the session.
        courier = old.live("courier")
        assert courier is not None
        call_id = uuid.uuid4()
        await h.store.insert_call(
            call_id, session_id=old.id, pool_number=old.pool_number, caller_role="courier",
            caller_masked="+***00", inbound_channel_id="in-1", state="routing",
            caller_participant_id=courier.id,
        )
        await h.store.call_connected(call_id)
        await h.store.call_ended(call_id, "answered", "caller", 16)
        unrouted = uuid.uuid4()
        await h.store.insert_call(
            unrouted, session_id=None, pool_number=old.pool_number, caller_role=None,
            caller_masked="+***00", inbound_channel_id="in-2", state="routing",
        )
        await h.store.call_ended(unrouted, "unknown_caller", "system", None)
        await h.sessions.close(old.id)
        await h.sessions.close(recent.id)
        await h.sessions.reassign_courier(reassigned.id, "+79161119999")
        back = timedelta(days=31)
        await h.pool.execute(
            "UPDATE participants SET left_at = left_at - $2::interval, held_until = held_until - $2::interval "
            "WHERE session_id = $1", old.id, back,
        )
        await h.pool.execute("UPDATE sessions SET closed_at = closed_at - $2::interval WHERE id = $1", old.id, back)
        await h.pool.execute("UPDATE calls SET ended_at = ended_at - $1::interval", back)
        await h.pool.execute(
            "UPDATE participants SET left_at = left_at - interval '29 days' WHERE session_id = $1", recent.id
        )
        await h.pool.execute(
            "UPDATE participants SET left_at = left_at - $2::interval, held_until = held_until - $2::interval "
            "WHERE session_id = $1 AND left_at IS NOT NULL",
            reassigned.id, back,
        )

        with capture_logs() as logs:
            counts = await h.sessions.purge()
        assert counts == {"participants": 3, "sessions": 2, "calls": 2, "keys_destroyed": 0, "numbers_resealed": 0,
                          "numbers_unreadable": 0}
        assert [e for e in logs if e["event"] == "retention.purged"] == [
            {"event": "retention.purged", "log_level": "info", "older_than_days": 30, **counts}
        ]

        rows = {r["id"]: r for r in await h.pool.fetch("SELECT * FROM participants")}
        purged = {i for i, r in rows.items() if r["purged_at"] is not None}
        assert purged == {p.id for p in old.participants} | {reassigned.live("courier").id}  # type: ignore[union-attr]
        for i in purged:
            assert rows[i]["number_enc"] is None and rows[i]["number_idx"] is None and not rows[i]["holds"]
        for i in set(rows) - purged:
            assert rows[i]["number_enc"] is not None, "recent and live participants keep their numbers"
        # The call records stay, with their pseudonymous references, without the masked number.
        call = await h.store.get_call(call_id)
        assert call is not None and call["caller_participant_id"] == courier.id and call["caller_masked"] is None
        assert call["outcome"] == "answered" and call["duration_seconds"] is not None
        assert (await h.store.get_call(unrouted))["caller_masked"] is None  # type: ignore[index]
        # The API shows a purged participant without a number; the session and its history stay.
        session = await h.sessions.get(old.id)
        assert all(h.sessions.reveal(p) is None for p in session.participants)
        assert [e["kind"] for e in await h.sessions.events(old.id)] == ["opened", "closed", "purged"]
        # The purge is idempotent.
        assert await h.sessions.purge() == {"participants": 0, "sessions": 0, "calls": 0, "keys_destroyed": 0,
                                           "numbers_resealed": 0, "numbers_unreadable": 0}
        # A pair whose cool-off still runs keeps its number, however long ago it left: the
        # former participant must go on hearing that the order finished.
        await h.pool.execute(
            "UPDATE participants SET left_at = left_at - interval '40 days' WHERE session_id = $1", recent.id
        )
        assert await h.sessions.purge() == {"participants": 0, "sessions": 0, "calls": 0, "keys_destroyed": 0,
                                           "numbers_resealed": 0, "numbers_unreadable": 0}

    harness.run(scenario())


def _month_ago(h: Harness) -> tuple[datetime, NumberVault, Sessions]:
    """A bridge of 31 days ago over the harness's database: (then, its vault, its sessions)."""
    month_ago = datetime.now(timezone.utc) - timedelta(days=31)
    then = NumberVault(SCRATCH_KEY, h.store.number_keys, clock=lambda: month_ago)
    return month_ago, then, Sessions(h.store, then, h.sessions.policy)


async def _start_over(h: Harness, pool_prefix: str) -> None:
    """Every row of the scratch schema gone, four pool numbers imported."""
    await h.pool.execute(
        "TRUNCATE recording_access, recordings, calls, session_events, participants, sessions, pool_numbers, "
        "blocked_numbers"
    )
    await h.pools.import_numbers([{"number": f"{pool_prefix}{i:02d}"} for i in range(4)])


async def _swap_numbers(db: asyncpg.Connection | asyncpg.Pool, a: uuid.UUID, b: uuid.UUID) -> None:
    """Two participants' sealed numbers swapped, as a bad restore or a hand edit would: each
    ciphertext is bound to its own row, so neither opens any more."""
    await db.execute(
        """UPDATE participants p SET number_enc = o.number_enc FROM participants o
           WHERE (p.id, o.id) IN (($1::uuid, $2::uuid), ($2::uuid, $1::uuid))""", a, b)


def test_an_unreadable_number_is_skipped_by_retention_and_does_not_keep_other_keys(harness: Harness) -> None:
    """Two rows' ciphertexts swapped: retention logs and counts them (table and row id, no
    number), re-seals every other number of their day, and destroys the day's key all the
    same (what does not open cannot be re-sealed, and is unreadable with or without its key).
    Reading them meanwhile shows null, as a purged number, never an error."""
    h = harness
    month_ago, _then, before = _month_ago(h)

    async def scenario() -> None:
        await _start_over(h, "+749511300")
        damaged, _ = await before.open(opening("order-damaged", "+79161130001", "+79161130002"))
        lasting, _ = await before.open(opening("order-lasting", "+79161130003", "+79161130004"))
        courier, client = damaged.live("courier"), damaged.live("client")
        assert courier is not None and client is not None
        await _swap_numbers(h.pool, courier.id, client.id)

        # Read: null, logged by row, never a 500.
        with capture_logs() as logs:
            rows = await h.sessions.find(order_id=None, status=None, after=None, limit=10)
            rendered = {s.order_id: render_session(h.sessions, s) for s in rows}
        assert {p["number"] for p in rendered["order-damaged"]["participants"].values()} == {None}
        assert {p["number"] for p in rendered["order-lasting"]["participants"].values()} == {
            mask("+79161130003"), mask("+79161130004")}
        unreadable = [e for e in logs if e["event"] == "number.unreadable"]
        assert {(e["table"], e["row_id"], e["where"]) for e in unreadable} == {
            ("participants", str(courier.id), "read"), ("participants", str(client.id), "read")}
        assert "+7916113" not in str(logs)

        # Retention: the other numbers of the day re-sealed, the bad ones skipped, the key gone.
        counted = metrics.NUMBERS_UNREADABLE.labels("participants", "retention")._value.get()
        with capture_logs() as logs:
            counts = await h.sessions.purge()
        assert counts == {"participants": 0, "sessions": 0, "calls": 0, "keys_destroyed": 1, "numbers_resealed": 2,
                          "numbers_unreadable": 2}
        assert metrics.NUMBERS_UNREADABLE.labels("participants", "retention")._value.get() == counted + 2
        assert {(e["table"], e["row_id"]) for e in logs if e["event"] == "number.unreadable"} == {
            ("participants", str(courier.id)), ("participants", str(client.id))}
        assert "+7916113" not in str(logs)
        assert await h.pool.fetchval("SELECT count(*) FROM number_data_keys WHERE period = $1",
                                     month_ago.date()) == 0
        live = await h.sessions.get(lasting.id)
        assert {h.sessions.reveal(p) for p in live.participants} == {"+79161130003", "+79161130004"}
        assert {h.sessions.reveal(p) for p in (await h.sessions.get(damaged.id)).participants} == {None}
        # The next run finds nothing left to do.
        assert (await h.sessions.purge())["numbers_unreadable"] == 0

    h.run(scenario())


async def test_a_listing_with_an_unreadable_number_answers_200_with_null(api, real_number, db):
    courier, client = real_number(), real_number()
    order = f"order-{uuid.uuid4()}"
    session = await api.open_session(order, courier, client)
    ids = [p["id"] for p in session["participants"].values()]
    await _swap_numbers(db, uuid.UUID(ids[0]), uuid.UUID(ids[1]))
    status, listing = await api.request("GET", f"/v1/sessions?order_id={order}")
    assert status == 200
    assert [p["number"] for p in listing["items"][0]["participants"].values()] == [None, None]
    status, one = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert status == 200 and [p["number"] for p in one["participants"].values()] == [None, None]


def test_a_backup_taken_before_retention_holds_no_purged_number_the_current_keys_open(
    harness: Harness, stack
) -> None:
    """Crypto-shredding (issue 15): numbers are sealed with their day's data key, and
    retention destroys the key of a day whose numbers are all past retention. A dump taken
    before retention, restored into a fresh database, still holds the purged numbers'
    ciphertexts (as old row versions and the WAL do): the current keys open none of them,
    while they open every number retention keeps. The dump's own copy of the day key, wrapped
    by master key version 1, is shredded when version 1 is retired after a rotation."""
    h = harness
    schema = f"scratch_{__name__.rsplit('.', 1)[-1]}"
    month_ago, then, before = _month_ago(h)  # (a bridge of 31 days ago)
    restored_db = "privacy_restored"

    async def scenario() -> None:
        await _start_over(h, "+749511200")
        # Opened 31 days ago: one ended then, one still open (an order that lasts); one recent.
        old, _ = await before.open(opening("order-old", "+79161120001", "+79161120002"))
        lasting, _ = await before.open(opening("order-lasting", "+79161120003", "+79161120004"))
        recent, _ = await h.sessions.open(opening("order-recent", "+79161120005", "+79161120006"))
        blocked, _ = await Blocklist(h.store, then).add("+79161120007")
        await h.sessions.close(old.id)
        await h.sessions.close(recent.id)
        await h.pool.execute(
            "UPDATE participants SET left_at = left_at - interval '31 days', held_until = held_until - interval "
            "'31 days' WHERE session_id = $1", old.id)
        dump = subprocess.run(postgres.dump_command(stack, schema), capture_output=True, check=True).stdout

        counts = await h.sessions.purge()
        assert counts == {"participants": 2, "sessions": 1, "calls": 0, "keys_destroyed": 1,
                          "numbers_resealed": 3, "numbers_unreadable": 0}, "the lasting session and the blocked number were re-sealed"
        assert await h.pool.fetchval("SELECT count(*) FROM number_data_keys WHERE period = $1",
                                     month_ago.date()) == 0

        url = postgres.fresh_database(stack, restored_db)
        subprocess.run(postgres.restore_command(url), input=dump, capture_output=True, check=True)
        restored = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            in_dump = {r["id"]: r["number_enc"] for r in await restored.fetch("SELECT id, number_enc FROM participants")}
            # The current keys (the live database's, unwrapped by the configured master key):
            current = NumberVault(SCRATCH_KEY, h.store.number_keys)
            for p in old.participants + lasting.participants:
                assert in_dump[p.id] is not None, "the dump holds the ciphertext retention since emptied"
                assert await current.open(in_dump[p.id], participant_number(p.id)) is None
            for p in recent.participants:
                assert await current.open(in_dump[p.id], participant_number(p.id)) == h.sessions.reveal(p)
            live = await h.sessions.get(lasting.id)
            assert {h.sessions.reveal(p) for p in live.participants} == {"+79161120003", "+79161120004"}, \
                "a session still open keeps its numbers (re-sealed with today's key)"
            assert [Blocklist(h.store, current).number_of(e) for e in await Blocklist(h.store, current).find(None, 9)] \
                == ["+79161120007"] and blocked.id

            # The dump's own key table still wraps the destroyed day key with master version 1 ...
            dumped_keys = NumberVault(SCRATCH_KEY, NumberKeyRepo(restored))
            assert await dumped_keys.open(in_dump[old.participants[0].id], participant_number(old.participants[0].id))
            # ... until version 1 is retired: version 2 is configured, made active, every key
            # rewrapped (maskbridge-admin keys rewrap), and version 1 removed.
            rotated = MasterKeys({1: SCRATCH_KEY, 2: "second-master-key-second-master-key-0123"})
            done = await NumberKeys(h.store.number_keys, NumberVault(rotated, h.store.number_keys)).rewrap()
            assert (done.active_version, done.previous_version) == (2, 1) and done.keys_rewrapped == 2
            only_v2 = MasterKeys({2: "second-master-key-second-master-key-0123"})
            now_current = NumberVault(only_v2, h.store.number_keys)
            await now_current.start()
            for p in recent.participants:  # (the dump's copies)
                assert await now_current.open(in_dump[p.id], participant_number(p.id)) is not None
            for p in live.participants:  # (the live database's)
                assert await now_current.open(p.number_enc, participant_number(p.id)) is not None
            with pytest.raises(VaultError, match="version 1 is not configured"):
                await NumberVault(only_v2, NumberKeyRepo(restored)).open(
                    in_dump[old.participants[0].id], participant_number(old.participants[0].id))
        finally:
            await restored.close()
            postgres.drop_database(stack, restored_db)

    h.run(scenario())

