"""Call rows: one per call attempt, written as the call goes."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg

from bridge.store.blocklist import BlocklistRepo
from bridge.store.db import keeps_session_state
from bridge.store.errors import CONNECTION_LOST
from bridge.store.number_keys import NumberKeyRepo
from bridge.store.pools import PoolRepo
from bridge.store.recordings import RecordingRepo
from bridge.store.sessions import ROUTE_SQL, RouteRow, SessionRepo, route_row
from bridge.terms import Terms


# The session terms a call row keeps (bridge.terms: on_call_row), by the same column names.
_CALL_TERMS = Terms.on_call_row_names()

# What the API shows of a call: ids and roles, never the caller's (masked) number.
_CALL_COLUMNS = f"""
    c.id, c.session_id, c.pool_number, c.caller_role, c.caller_participant_id, c.callee_role,
    c.callee_participant_id, c.state, c.outcome, c.hangup_by, c.hangup_cause, c.cut_reason,
    c.started_at, c.answered_at, c.ended_at, c.duration_seconds, {", ".join(f"c.{n}" for n in _CALL_TERMS)}
"""

# After a statement `call` that wrote a call's row: a call put through (someone is rung) is
# its session's activity (the inactivity expiry counts from here), and its call.started
# webhook, when webhooks are on (the parameter {webhooks}).
_PUT_THROUGH = """, hook AS (
        INSERT INTO webhook_outbox (event, payload)
        SELECT 'call.started', maskbridge_call_event(call.r) FROM call
        WHERE {webhooks} AND (call.r).session_id IS NOT NULL AND (call.r).callee_role IS NOT NULL
    )
    UPDATE sessions s SET last_activity_at = now()
    FROM call WHERE s.id = (call.r).session_id AND (call.r).callee_role IS NOT NULL AND s.status = 'open'
"""

# $1-$12 the call's own columns (insert_call), then its terms by name.
_INSERT_CALL = f"""
    WITH call AS (
        INSERT INTO calls (id, session_id, pool_number, caller_role, caller_masked, inbound_channel_id, state,
                           caller_participant_id, callee_role, callee_participant_id, node
                           {"".join(f", {n}" for n in _CALL_TERMS)})
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12
                {"".join(f", ${i}" for i in range(13, 13 + len(_CALL_TERMS)))})
        RETURNING calls AS r
    ){_PUT_THROUGH.format(webhooks="$11")}"""

# The calls of a session that count against its caps (as the route lookup counts them: put
# through in the last hour, and day; the bridge's own failures do not count). $1 the session.
_CAPPED_CALLS = """
    SELECT count(*) FILTER (WHERE c.started_at > now() - interval '1 hour'), count(*)
    FROM calls c WHERE c.session_id = $1 AND c.callee_role IS NOT NULL
      AND c.started_at > now() - interval '1 day' AND c.outcome IS DISTINCT FROM 'failed'
"""


def _caps(terms: Terms | None) -> tuple[int, int] | None:
    """A session's caps on calls put through (per hour, per day), when it has any."""
    if terms is None:
        return None
    per_hour, per_day = terms.calls_per_hour or 0, terms.calls_per_day or 0
    return (per_hour, per_day) if per_hour or per_day else None

# $1-$9 (call_put_through), then the terms by name. A call put through (a callee, $5) is
# ringing from here: its other leg and bridge ($8, $9) are named before the leg is dialed,
# so that a bridge process stopped at any moment leaves a row that says what to hang up.
_PUT_THROUGH_CALL = f"""
    WITH call AS (
        UPDATE calls SET session_id = $2, caller_role = $3, caller_participant_id = $4, callee_role = $5,
                         callee_participant_id = $6, outbound_channel_id = $8, bridge_id = $9,
                         state = CASE WHEN $5::text IS NULL THEN state ELSE 'ringing' END
                         {"".join(f", {n} = ${i}" for i, n in enumerate(_CALL_TERMS, start=10))}
        WHERE id = $1 AND state <> 'ended'
        RETURNING calls AS r
    ){_PUT_THROUGH.format(webhooks="$7")}"""

# The route lookup of a call and its row, in one statement (one round trip on the call's
# critical path): ROUTE_SQL's first row ($1 the caller's blind index, $2 the dialed number),
# what the dialed number is (routing_facts), and the call's row in state routing naming
# the session and the caller the lookup found ($3-$7: id, the dialed number masked, the
# caller masked, the inbound channel, the node; then the call's terms, unset). Whom the
# call rings, if anyone, is written once the flow decided (call_put_through).
# Its commit does not wait for the WAL to reach the disk (synchronous_commit off for this
# statement alone: 0.6 ms less of post-dial delay at the median, measured): every path of a
# call writes its row again within milliseconds (put through, announcing, entering a code,
# ended), with a commit that does wait, and that flushes this one with it. Only a Postgres
# crash between the two could lose the row, and then the second write fails too: the call
# fails as any call does while the database is down.
_ROUTE_AND_RECORD = f"""
    WITH route AS ({ROUTE_SQL} LIMIT 1),
    dialed AS (SELECT language, mode,
                      -- (on an order-code number: whether the caller holds it, i.e. is one of its
                      -- orders' people; the others are strangers there, as unknown callers are)
                      mode = 'order_code' AND EXISTS (
                          SELECT 1 FROM participants h WHERE h.number_idx = $1 AND h.pool_number = $2 AND h.by_code
                            AND h.holds AND (h.held_until IS NULL OR h.held_until > now())) AS caller_holds
               FROM pool_numbers WHERE number = $2),
    call AS (
        INSERT INTO calls (id, session_id, pool_number, caller_role, caller_masked, inbound_channel_id, state,
                           caller_participant_id, node {"".join(f", {n}" for n in _CALL_TERMS)})
        SELECT $3, route.session_id, CASE WHEN EXISTS (SELECT 1 FROM dialed) THEN $2 ELSE $4 END, route.role,
               $5, $6, 'routing', route.participant_id, $7
               {"".join(f", ${i}" for i in range(8, 8 + len(_CALL_TERMS)))}
        FROM (VALUES (1)) AS one (x) LEFT JOIN route ON true
    )
    SELECT route.*, dialed.language AS dialed_language, dialed.mode AS dialed_mode,
           dialed.mode IS NOT NULL AS dialed_known, coalesce(dialed.caller_holds, false) AS dialed_caller_holds,
           set_config('synchronous_commit', 'off', true) AS commit_mode
    FROM (VALUES (1)) AS one (x) LEFT JOIN route ON true LEFT JOIN dialed ON true
"""


@dataclass(frozen=True)
class NewCall:
    """A call's row as the route lookup writes it (Store.route_and_record)."""

    id: uuid.UUID
    pool_masked: str  # the dialed number as the row keeps it when it is none of ours
    caller_masked: str
    inbound_channel_id: str


@dataclass(frozen=True)
class Dialed:
    """What the dialed number is: one of our pool numbers or not, its language and mode."""

    known: bool
    language: str | None
    mode: str
    caller_holds: bool = False  # an order-code number: the caller is one of its orders' people


def _call_terms(terms: Terms | None) -> list[Any]:
    """The values of the call row's term columns (a call routed nowhere has none: no flag set)."""
    kept = (terms or Terms()).on_call_row()
    return [kept[n] if kept[n] is not None else Terms.unset(n) for n in _CALL_TERMS]


class Store:
    """The call rows, plus the pool and session repositories."""

    def __init__(self, pool: asyncpg.Pool, webhooks: bool = False, node: str = "node-1") -> None:
        self.pool = pool
        self.webhooks = webhooks  # write webhook events next to the call rows
        self.node = node  # the node whose calls this process writes (MB_NODE_ID)
        self.pools = PoolRepo(pool)
        self.sessions = SessionRepo(pool)
        self.blocklist = BlocklistRepo(pool)
        self.recordings = RecordingRepo(pool)
        self.number_keys = NumberKeyRepo(pool)

    @contextlib.asynccontextmanager
    async def exclusive(self, key: int) -> AsyncIterator[bool]:
        """Whether this process holds the advisory lock `key` for the body's duration: one
        process of all that share the database runs what it guards, the others skip it."""
        async with self.pool.acquire() as conn:
            keeps_session_state(conn)
            held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            try:
                yield held
            finally:
                if held:
                    # (A connection lost meanwhile took the lock with its session: nothing to
                    # unlock, and the body's own outcome stands.)
                    with contextlib.suppress(*CONNECTION_LOST):
                        await conn.execute("SELECT pg_advisory_unlock($1)", key)

    # --- calls -------------------------------------------------------------------

    async def insert_call(
        self,
        call_id: uuid.UUID,
        *,
        session_id: uuid.UUID | None,
        pool_number: str,
        caller_role: str | None,
        caller_masked: str,
        inbound_channel_id: str,
        state: str,
        caller_participant_id: uuid.UUID | None = None,
        callee_role: str | None = None,
        callee_participant_id: uuid.UUID | None = None,
        terms: Terms | None = None,
    ) -> bool:
        """A new call's row (with the session terms it keeps). A call that is put through is
        the session's activity (its inactivity expiry counts from here): one statement, one
        commit, on the call's critical path. Returns False when the call is to be put
        through but its session reached a cap meanwhile (see _admitted): the row is written
        as a call nobody is rung for."""
        args = [call_id, session_id, pool_number, caller_role, caller_masked, inbound_channel_id, state,
                caller_participant_id, callee_role, callee_participant_id, self.webhooks, self.node,
                *_call_terms(terms)]
        return await self._write_call(_INSERT_CALL, args, callee_at=8, terms=terms)

    async def _write_call(self, sql: str, args: list[Any], callee_at: int, terms: Terms | None) -> bool:
        """Run `sql` (a call's row put through: args[1] its session, args[callee_at] and the
        next the callee's role and participant). On a session with caps it runs under the
        session's lock, and when the caps are reached it is written as a call nobody is rung
        for (returns False)."""
        session_id, callee_role = args[1], args[callee_at]
        caps = _caps(terms) if session_id is not None and callee_role is not None else None
        if caps is None:
            await self.pool.execute(sql, *args)
            return True
        async with self.pool.acquire() as conn, conn.transaction():
            admitted = await self._admitted(conn, session_id, caps)
            if not admitted:
                args[callee_at] = args[callee_at + 1] = None
            await conn.execute(sql, *args)
        return admitted

    @staticmethod
    async def _admitted(conn: asyncpg.Connection, session_id: uuid.UUID, caps: tuple[int, int]) -> bool:
        """Whether one more call may be put through on a session with caps, counted under the
        session's advisory lock (held until the call's row commits): two calls at cap-1 on
        two nodes, or in two tasks of one, cannot both pass. The route lookup counted too, but
        without a lock."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('maskbridge-caps:' || $1::uuid::text, 0))",
                           session_id)
        last_hour, last_day = await conn.fetchrow(_CAPPED_CALLS, session_id)
        per_hour, per_day = caps
        return not ((per_hour and last_hour >= per_hour) or (per_day and last_day >= per_day))

    async def call_entering_code(self, call_id: uuid.UUID) -> None:
        await self.pool.execute(
            "UPDATE calls SET state = 'entering_code' WHERE id = $1 AND state <> 'ended'", call_id
        )

    async def route_and_record(self, idx: bytes, pool_number: str, call: NewCall) -> tuple[RouteRow | None, Dialed]:
        """The route of a call from (caller's blind index, dialed number), what the dialed
        number is, and the call's row written (state routing): one round trip."""
        row = await self.pool.fetchrow(_ROUTE_AND_RECORD, idx, pool_number, call.id, call.pool_masked,
                                       call.caller_masked, call.inbound_channel_id, self.node, *_call_terms(None))
        fields = dict(row) if row is not None else {}  # (one row, whatever matched)
        fields.pop("commit_mode", None)
        dialed = Dialed(bool(fields.pop("dialed_known", False)), fields.pop("dialed_language", None),
                        fields.pop("dialed_mode", None) or "direct", bool(fields.pop("dialed_caller_holds", False)))
        return (route_row(fields) if fields.get("session_id") is not None else None), dialed

    async def call_put_through(
        self,
        call_id: uuid.UUID,
        *,
        session_id: uuid.UUID | None,
        caller_role: str | None,
        caller_participant_id: uuid.UUID | None,
        callee_role: str | None,
        callee_participant_id: uuid.UUID | None,
        terms: Terms | None,
        outbound_channel_id: str,
        bridge_id: str,
    ) -> bool:
        """The call rings the other participant: the row learns who calls whom, its other leg
        and bridge, and says ringing; a call put through is the session's activity and its
        call.started webhook. False: the session reached a cap meanwhile (see _admitted): the
        row names nobody rung and stays routing."""
        args = [call_id, session_id, caller_role, caller_participant_id, callee_role, callee_participant_id,
                self.webhooks, outbound_channel_id, bridge_id, *_call_terms(terms)]
        return await self._write_call(_PUT_THROUGH_CALL, args, callee_at=4, terms=terms)

    async def call_confirming(self, call_id: uuid.UUID) -> None:
        await self.pool.execute("UPDATE calls SET state = 'confirming' WHERE id = $1 AND state <> 'ended'", call_id)

    async def call_connected(self, call_id: uuid.UUID) -> None:
        await self.pool.execute(
            """
            WITH call AS (
                UPDATE calls SET state = 'connected', answered_at = now() WHERE id = $1 AND state <> 'ended'
                RETURNING calls AS r
            )
            INSERT INTO webhook_outbox (event, payload)
            SELECT 'call.answered', maskbridge_call_event(call.r) FROM call
            WHERE $2 AND (call.r).session_id IS NOT NULL
            """,
            call_id, self.webhooks,
        )

    async def call_announcing(
        self, call_id: uuid.UUID, *, session_id: uuid.UUID | None = None, caller_role: str | None = None,
        caller_participant_id: uuid.UUID | None = None,
    ) -> None:
        """The caller is told why the call is not put through; the row names the session
        and the caller the final decision was about (none: an unknown caller)."""
        await self.pool.execute(
            """UPDATE calls SET state = 'announcing', session_id = $2, caller_role = $3, caller_participant_id = $4
               WHERE id = $1 AND state <> 'ended'""",
            call_id, session_id, caller_role, caller_participant_id,
        )

    async def call_ended(
        self, call_id: uuid.UUID, outcome: str, hangup_by: str, cause: int | None, cut_reason: str | None = None,
        *, rung: bool = True, ended_at: datetime | None = None, unanswered: bool = False,
    ) -> bool:
        """The call's end; False when the row had ended already (another write came first: a
        stopped process's statement that Postgres still held, say). `rung` False: it ended
        before its other leg was dialed, so nobody was rung: the row names no callee (it does
        not count against the session's caps).
        `unanswered`: the row said connected, but the caller's leg was never answered (its
        hangup crossed the other phone's answer): no answer time.
        `ended_at`: when it ended, as Asterisk said or the bridge found (never after now, nor
        before the call's start or answer: the clocks of two machines may differ)."""
        return bool(await self.pool.fetchval(
            """
            WITH call AS (
                UPDATE calls SET state = 'ended', outcome = $2,
                                 ended_at = greatest(least(coalesce($8::timestamptz, now()), now()), started_at,
                                                     answered_at),
                                 hangup_by = $3, hangup_cause = $4, cut_reason = $5,
                                 answered_at = CASE WHEN $9 THEN NULL ELSE answered_at END,
                                 callee_role = CASE WHEN $7 THEN callee_role END,
                                 callee_participant_id = CASE WHEN $7 THEN callee_participant_id END
                WHERE id = $1 AND state <> 'ended'
                RETURNING calls AS r
            ), touched AS (
                -- The end of a call put through is the session's activity: its idle timeout
                -- counts from here (maskbridge_session_due).
                UPDATE sessions s SET last_activity_at = now()
                FROM call WHERE s.id = (call.r).session_id AND (call.r).callee_role IS NOT NULL AND s.status = 'open'
            ), told AS (
                INSERT INTO webhook_outbox (event, payload)
                -- call.ended says whether the call was recorded: the recording's id, never a URL
                SELECT e.event, maskbridge_call_event(call.r) || CASE WHEN e.event = 'call.ended' THEN
                           jsonb_build_object('recording_id', (SELECT r.id FROM recordings r
                                                               WHERE r.call_id = (call.r).id)) ELSE '{}' END
                FROM call
                CROSS JOIN LATERAL (VALUES ('call.ended', true),
                                           ('call.blocked', (call.r).outcome = 'blocked'
                                                            OR (call.r).cut_reason IN ('blocked', 'blocked_by_client'))
                                   ) AS e(event, wanted)
                WHERE $6 AND (call.r).session_id IS NOT NULL AND e.wanted
            )
            SELECT EXISTS (SELECT FROM call)
            """,
            call_id, outcome, hangup_by, cause, cut_reason, self.webhooks, rung, ended_at, unanswered,
        ))

    async def recording_started(self, call_id: uuid.UUID, name: str, fmt: str) -> uuid.UUID:
        return await self.recordings.started(call_id, name, fmt)

    async def recording_finished(
        self, call_id: uuid.UUID, duration_ms: int | None, size: int | None
    ) -> None:
        await self.recordings.finished(call_id, duration_ms, size)

    async def recording_discarded(self, call_id: uuid.UUID) -> None:
        await self.recordings.discarded(call_id)

    async def pool_language(self, number: str) -> str | None:
        """The announcement language of a pool number (None: the default), for a resumed call."""
        _known, language, _mode = await self.pools.routing_facts(number)
        return language

    async def ended_calls(self, call_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these calls' rows say they ended."""
        rows = await self.pool.fetch("SELECT id FROM calls WHERE id = ANY($1::uuid[]) AND state = 'ended'", call_ids)
        return {r["id"] for r in rows}

    async def active_calls(self) -> list[dict[str, Any]]:
        """This node's calls in progress (another node's are its bridge's business), with the
        name of the call's recording if it is being recorded: a resumed call finishes it."""
        rows = await self.pool.fetch(
            """SELECT c.*, r.name AS recording_name FROM calls c LEFT JOIN recordings r ON r.call_id = c.id
               WHERE c.state <> 'ended' AND c.node = $1 ORDER BY c.started_at""",
            self.node,
        )
        return [dict(r) for r in rows]

    async def session_calls(
        self, session_ids: list[uuid.UUID], after: tuple[datetime, uuid.UUID] | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Oldest first; `after` is the (started_at, id) of the last row of the previous page.
        Participants appear by id only: the pseudonymous reference that survives retention."""
        rows = await self.pool.fetch(
            f"""
            SELECT {_CALL_COLUMNS} FROM calls c WHERE c.session_id = ANY($1::uuid[])
              AND ($2::timestamptz IS NULL OR (c.started_at, c.id) > ($2, $3::uuid))
            ORDER BY c.started_at, c.id LIMIT $4
            """,
            session_ids, after[0] if after else None, after[1] if after else None, limit,
        )
        return [dict(r) for r in rows]

    async def order_calls(
        self, order_id: str, after: tuple[datetime, uuid.UUID] | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Every call of an order, across all of its sessions, oldest first."""
        rows = await self.pool.fetch(
            f"""
            SELECT {_CALL_COLUMNS} FROM calls c JOIN sessions s ON s.id = c.session_id
            WHERE s.order_id = $1 AND ($2::timestamptz IS NULL OR (c.started_at, c.id) > ($2, $3::uuid))
            ORDER BY c.started_at, c.id LIMIT $4
            """,
            order_id, after[0] if after else None, after[1] if after else None, limit,
        )
        return [dict(r) for r in rows]

    async def get_call(self, call_id: uuid.UUID) -> dict[str, Any] | None:
        row = await self.pool.fetchrow("SELECT * FROM calls WHERE id = $1", call_id)
        return dict(row) if row is not None else None

    # --- metrics ---------------------------------------------------------------------

    async def metrics_snapshot(self) -> dict[str, Any]:
        """What the metrics take from the database (bridge.metrics), in one transaction:
        pool numbers by region, state and mode; per region, the most of its active direct
        numbers one real number holds; live sessions by status; the webhook backlog."""
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            pool_numbers = await conn.fetch(
                "SELECT region, state, mode, count(*) AS count FROM pool_numbers GROUP BY region, state, mode"
            )
            busiest = await conn.fetch(
                """
                SELECT region, max(numbers) AS numbers FROM (
                    SELECT p.region, h.number_idx, count(DISTINCT h.pool_number) AS numbers
                    FROM participants h JOIN pool_numbers p ON p.number = h.pool_number
                    WHERE h.holds AND p.state = 'active' AND p.mode = 'direct'
                    GROUP BY p.region, h.number_idx
                ) held GROUP BY region
                """
            )
            sessions = await conn.fetch(
                "SELECT status, count(*) AS count FROM sessions WHERE status IN ('open', 'grace') GROUP BY status"
            )
            backlog = await conn.fetchrow(
                """
                SELECT count(*) AS waiting,
                       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest
                FROM webhook_outbox WHERE delivered_at IS NULL AND failed_at IS NULL
                """
            )
        return {
            "pool_numbers": [dict(r) for r in pool_numbers],
            "busiest_holders": [dict(r) for r in busiest],
            "sessions": {r["status"]: r["count"] for r in sessions},
            "webhook_backlog": backlog["waiting"],
            "webhook_oldest_seconds": backlog["oldest"],
        }
