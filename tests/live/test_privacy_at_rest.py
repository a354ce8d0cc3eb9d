"""Real numbers at rest: sealed in the database, found only through the keyed index, and
deleted by the retention job once their sessions are old, while the call records stay."""

from __future__ import annotations

import subprocess
import uuid
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from bridge.devstack import postgres
from tests.live.conftest import Harness, opening


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
            caller_masked="+7916***0000", inbound_channel_id="in-1", state="routing",
            caller_participant_id=courier.id,
        )
        await h.store.call_connected(call_id)
        await h.store.call_ended(call_id, "answered", "caller", 16)
        unrouted = uuid.uuid4()
        await h.store.insert_call(
            unrouted, session_id=None, pool_number=old.pool_number, caller_role=None,
            caller_masked="+7999***0000", inbound_channel_id="in-2", state="routing",
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
        assert counts == {"participants": 3, "sessions": 2, "calls": 2}
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
        assert all(h.sessions.reveal(p.number_enc) is None for p in session.participants)
        assert [e["kind"] for e in await h.sessions.events(old.id)] == ["opened", "closed", "purged"]
        # The purge is idempotent.
        assert await h.sessions.purge() == {"participants": 0, "sessions": 0, "calls": 0}
        # A pair whose cool-off still runs keeps its number, however long ago it left: the
        # former participant must go on hearing that the order finished.
        await h.pool.execute(
            "UPDATE participants SET left_at = left_at - interval '40 days' WHERE session_id = $1", recent.id
        )
        assert await h.sessions.purge() == {"participants": 0, "sessions": 0, "calls": 0}

    harness.run(scenario())
