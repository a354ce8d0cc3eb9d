"""Sessions, their participants and events, number holds, routing lookups and retention.

Real numbers never reach this module in plaintext: it stores and compares the sealed
number (`number_enc`) and its keyed blind index (`number_idx`) computed by bridge.crypto.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from bridge import metrics
from bridge.requester import request_token
from bridge.store.db import LONG_STATEMENT
from bridge.store.errors import CodeTaken, Contended, OrderRace, PairTaken, SessionGone
from bridge.terms import Terms


@dataclass(frozen=True)
class Sealed:
    """A real number as stored: its blind index and its ciphertext, sealed for the
    participant row `id` (bridge.crypto binds it to that row)."""

    id: uuid.UUID
    idx: bytes
    enc: bytes


@dataclass(frozen=True)
class SessionTerms:
    """What a new session is opened with: its own terms (bridge.terms, as stored) and the
    rest of what it is opened with."""

    region: str | None
    ttl_seconds: int
    idle_timeout_seconds: int | None
    grace_seconds: int
    # As stored: the terms that take their default at open have it (bridge.terms).
    terms: Terms = field(default_factory=lambda: Terms().at_open(Terms.defaults_from_env({})))
    order_code: str | None = None  # set: an order-code session (mode order_code)


@dataclass(frozen=True)
class ParticipantRow:
    id: uuid.UUID
    role: str
    number_enc: bytes | None  # None once purged by the retention job
    pool_number: str
    joined_at: datetime
    left_at: datetime | None
    held_until: datetime | None


@dataclass(frozen=True)
class SessionRow:
    id: uuid.UUID
    order_id: str
    pool_number: str
    status: str
    region: str | None
    created_at: datetime
    expires_at: datetime
    idle_timeout_seconds: int | None
    last_activity_at: datetime
    grace_seconds: int
    grace_until: datetime | None
    closed_at: datetime | None
    end_reason: str | None
    mode: str
    order_code: str | None
    terms: Terms  # as stored: a term left null takes the bridge's default at each call
    participants: tuple[ParticipantRow, ...]

    def live(self, role: str) -> ParticipantRow | None:
        return next((p for p in self.participants if p.role == role and p.left_at is None), None)


@dataclass(frozen=True)
class RouteRow:
    """What the database knows about a call from (number, pool number)."""

    session_id: uuid.UUID
    participant_id: uuid.UUID
    role: str
    pool_number: str
    caller_left: bool
    status: str
    due: str | None  # the session is past its time: how it ends (maskbridge_session_due)
    other_id: uuid.UUID | None
    other_role: str | None
    other_enc: bytes | None
    other_pool_number: str | None
    caller_blocked: bool
    other_blocked: bool
    calls_last_hour: int
    calls_last_day: int
    language: str | None
    terms: Terms  # as stored


@dataclass(frozen=True)
class Opening:
    """What an open found (maskbridge_open_session, sql/027 and 028).

    outcome: "opened" (`session` as written), "open_already" (the order's open session;
    `due`: how it ends if it is past its time), "unknown_region", "exhausted" (nothing is free
    for the pair, or no order-code number is active) or "code_taken" (every order-code number
    has a live session with the given code)."""

    outcome: str
    session: SessionRow | None = None
    due: str | None = None


# NOTIFY when participants leave a session: "<reason> <participant id>,<participant id>..."
# (reason: the cut's, "reassigned" or "session_ended"). The bridge ends their calls.
PARTICIPANTS_LEFT = "maskbridge_participants_left"

# Every term of bridge.terms is a column of sessions by the same name.
_TERM_COLUMNS = ", ".join(f"s.{name}" for name in Terms.names())

_SESSION_COLUMNS = f"""
    s.id, s.order_id, s.pool_number, s.status, s.region, s.created_at, s.expires_at,
    s.idle_timeout_seconds, s.last_activity_at, s.grace_seconds, s.grace_until, s.closed_at, s.end_reason,
    s.mode, s.order_code, {_TERM_COLUMNS}
"""

# A hold that still counts: live, or in a cool-off that has not ended.
_HOLDING = "h.holds AND (h.held_until IS NULL OR h.held_until > now())"

# Holds of a pair (courier, client) that the same pair may take over: their own cooling
# holds from an earlier session together. Parameter $1 is the pair's two blind indexes.
_OWN_COOLING_HOLD = """
    h.left_at IS NOT NULL AND EXISTS (
        SELECT 1 FROM participants o WHERE o.session_id = h.session_id AND o.role <> h.role
          AND o.number_idx = ANY($1::bytea[]) AND o.number_idx <> h.number_idx)
"""


_ROUTE_SELECT = f"""
    SELECT h.session_id, h.id AS participant_id, h.role, h.pool_number,
           h.left_at IS NOT NULL AS caller_left, s.status, maskbridge_session_due(s) AS due,
           o.id AS other_id, o.role AS other_role, o.number_enc AS other_enc,
           o.pool_number AS other_pool_number,
           EXISTS (SELECT 1 FROM live_blocked_numbers b WHERE b.number_idx = h.number_idx)
               OR h.blocked_at IS NOT NULL AS caller_blocked,
           EXISTS (SELECT 1 FROM live_blocked_numbers b WHERE b.number_idx = o.number_idx) AS other_blocked,
           cap.last_hour AS calls_last_hour, cap.last_day AS calls_last_day,
           (SELECT n.language FROM pool_numbers n WHERE n.number = h.pool_number) AS language,
           {_TERM_COLUMNS}
    FROM participants h
    JOIN sessions s ON s.id = h.session_id
    -- (A subquery with LIMIT, looked up for the caller's session: a plain join was planned, with
    -- statistics taken before the live participants were there, as a scan of every live
    -- participant; issue 14's bench. There is one live other side at most.)
    LEFT JOIN LATERAL (
        SELECT * FROM participants o WHERE o.session_id = h.session_id AND o.role <> h.role AND o.left_at IS NULL
        LIMIT 1
    ) o ON true
    -- Calls put through in the last hour and day count against the caps; the bridge's own
    -- failures do not.
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE c.started_at > now() - interval '1 hour') AS last_hour,
               count(*) AS last_day
        FROM calls c WHERE c.session_id = h.session_id AND c.callee_role IS NOT NULL
          AND c.started_at > now() - interval '1 day' AND c.outcome IS DISTINCT FROM 'failed'
    ) cap
"""

# The routing lookup of every call ($1 the caller's blind index, $2 the dialed pool number).
# Participants of order-code sessions are reached by their code (ROUTE_BY_CODE_SQL) only.
ROUTE_SQL = f"""{_ROUTE_SELECT}
    WHERE h.number_idx = $1 AND h.pool_number = $2 AND {_HOLDING} AND NOT h.by_code
"""

# The lookup of a call to an order-code number once the caller keyed a code ($3): the
# caller's participation in the live session that has this code on this number. (The
# unique index sessions_live_order_code makes the session unambiguous; a participant who
# left and came back has two rows: the live one first.)
ROUTE_BY_CODE_SQL = f"""{_ROUTE_SELECT}
    WHERE h.number_idx = $1 AND h.pool_number = $2 AND {_HOLDING} AND h.by_code
      AND s.order_code = $3 AND s.status IN ('open', 'grace')
    ORDER BY h.left_at IS NOT NULL, h.joined_at DESC LIMIT 1
"""


_SESSION_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRow) if f.name not in ("terms", "participants"))


def _session_row(r: asyncpg.Record, participants: tuple[ParticipantRow, ...]) -> SessionRow:
    return SessionRow(**{k: r[k] for k in _SESSION_FIELDS}, terms=Terms.from_columns(r), participants=participants)


def _participant_row(p: asyncpg.Record) -> ParticipantRow:
    """A participant from a whole row of participants (held_until only while it holds)."""
    return ParticipantRow(id=p["id"], role=p["role"], number_enc=p["number_enc"], pool_number=p["pool_number"],
                          joined_at=p["joined_at"], left_at=p["left_at"],
                          held_until=p["held_until"] if p["holds"] else None)


def route_row(r: asyncpg.Record | dict[str, Any]) -> RouteRow:
    fields = {k: v for k, v in dict(r).items() if k not in Terms.names()}
    return RouteRow(**fields, terms=Terms.from_columns(r))


def _affected(status: str) -> int:
    return int(status.split()[-1])


# Opens that arrive while earlier ones' statements run go to the database together, up to
# OPENS_PER_STATEMENT in one statement (sql/029: each in a subtransaction of its own). At most
# as many statements run at once as the pool has connections, as before.
OPENS_PER_STATEMENT = 16

_Waiting = tuple[tuple[Any, ...], "asyncio.Future[asyncpg.Record]"]
_WOULD_WAIT = "55P03"  # lock_not_available: an open after a batch's first would have waited (sql/029)


class _OpenBatches:
    """Session opens, batched: an open goes at once when a statement may start (fewer running
    than the pool's connections), else it waits for the next one, with those that came
    meanwhile. Each open gets its own row, or its own error: the error maskbridge_open_session
    raised for it (asyncpg's class for its SQLSTATE), or the statement's, for all of them. An
    open after a statement's first that would have waited for a lock goes first in the next."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.waiting: list[_Waiting] = []
        self.running: set[asyncio.Task[None]] = set()

    async def open(self, args: tuple[Any, ...]) -> asyncpg.Record:
        done: asyncio.Future[asyncpg.Record] = asyncio.get_running_loop().create_future()
        self.waiting.append((args, done))
        self._start()
        return await done

    def _start(self) -> None:
        while self.waiting and len(self.running) < self.pool.get_max_size():
            batch = self.waiting[:OPENS_PER_STATEMENT]
            del self.waiting[:OPENS_PER_STATEMENT]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.running.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self._start()

    async def _run(self, batch: list[_Waiting]) -> None:
        metrics.SESSION_OPENS_PER_STATEMENT.observe(len(batch))
        columns = [list(column) for column in zip(*(args for args, _ in batch), strict=True)]
        try:
            rows = await self.pool.fetch(
                "SELECT * FROM maskbridge_open_sessions($1, $2, $3, $4, $5, $6, $7, $8::jsonb[], $9, $10)", *columns)
        except Exception as exc:  # noqa: BLE001 - passed on: every open of the batch gets the statement's error
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except BaseException:  # (cancelled: the loop is closing)
            for _, done in batch:
                done.cancel()
            raise
        if len(rows) != len(batch):  # (one row per open, in order, by construction: else none can be trusted)
            wrong = RuntimeError(f"maskbridge_open_sessions answered {len(rows)} rows for {len(batch)} opens")
            for _, done in batch:
                if not done.done():
                    done.set_exception(wrong)
            return
        again: list[_Waiting] = []
        for position, (row, (args, done)) in enumerate(zip(rows, batch, strict=True)):
            if done.done():
                continue  # (its request went away: what it opened stays, as it would have)
            if row["failed"] is None:
                done.set_result(row)
            elif row["failed"] == _WOULD_WAIT and position > 0:
                again.append((args, done))  # (nothing of it was written: it goes first next time)
            else:
                done.set_exception(asyncpg.PostgresError.new(
                    {"C": row["failed"], "M": row["failed_message"], "n": row["failed_constraint"] or None}))
        self.waiting[:0] = again


class SessionRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._batches = _OpenBatches(pool)

    # --- reading -------------------------------------------------------------------

    async def _read(self, conn: asyncpg.Connection | asyncpg.Pool, where: str, *args: Any) -> list[SessionRow]:
        rows = await conn.fetch(f"SELECT {_SESSION_COLUMNS} FROM sessions s WHERE {where}", *args)
        if not rows:
            return []
        parts = await conn.fetch(
            """
            SELECT session_id, id, role, number_enc, pool_number, joined_at, left_at,
                   CASE WHEN holds THEN held_until END AS held_until
            FROM participants WHERE session_id = ANY($1::uuid[]) ORDER BY joined_at, role
            """,
            [r["id"] for r in rows],
        )
        by_session: dict[uuid.UUID, list[ParticipantRow]] = {}
        for p in parts:
            fields = dict(p)
            by_session.setdefault(fields.pop("session_id"), []).append(ParticipantRow(**fields))
        return [_session_row(r, tuple(by_session.get(r["id"], []))) for r in rows]

    async def get(self, session_id: uuid.UUID) -> SessionRow | None:
        found = await self._read(self.pool, "s.id = $1", session_id)
        return found[0] if found else None

    async def page(
        self, *, order_id: str | None, status: str | None, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[SessionRow]:
        """Newest first; `after` is the (created_at, id) of the last row of the previous page."""
        return await self._read(
            self.pool,
            """($1::text IS NULL OR s.order_id = $1) AND ($2::text IS NULL OR s.status = $2)
               AND ($3::timestamptz IS NULL OR (s.created_at, s.id) < ($3, $4::uuid))
               ORDER BY s.created_at DESC, s.id DESC LIMIT $5""",
            order_id, status, after[0] if after else None, after[1] if after else None, limit,
        )

    async def events(self, session_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT at, kind, detail, token FROM session_events WHERE session_id = $1 ORDER BY id", session_id
        )
        return [{"at": r["at"], "kind": r["kind"], "detail": json.loads(r["detail"]), "token": r["token"]}
                for r in rows]

    # --- choosing a pool number ------------------------------------------------------

    async def candidates(
        self, pair: list[bytes], region: str | None, limit: int = 8, prefer: str | None = None
    ) -> list[str]:
        """Active pool numbers free for every number of `pair` (blind indexes), best first:
        `prefer` if it is free, the number the same pair had last time, then the region's,
        then the least loaded; ties are broken at random so that racing opens spread out."""
        sticky = """
            SELECT s.pool_number FROM participants a
            JOIN participants b ON b.session_id = a.session_id AND b.role <> a.role AND b.number_idx = $1[2]
            JOIN sessions s ON s.id = a.session_id
            WHERE a.number_idx = $1[1] ORDER BY s.created_at DESC LIMIT 1
        """ if len(pair) == 2 else "SELECT NULL::text AS pool_number"
        # Tiers, best first: `prefer`, the pair's last number, the region's least loaded, the
        # least loaded of any region. A number's load is pool_numbers.holders (exact: sql/027),
        # read in order from an index; ties are broken at random among the few least loaded read.
        # (An open does the same in maskbridge_open_session, sql/027 and 028.)
        rows = await self.pool.fetch(
            f"""
            WITH blocked AS (SELECT unnest(maskbridge_numbers_held($1::bytea[])) AS pool_number),
            sticky AS ({sticky}),
            free AS NOT MATERIALIZED (
                SELECT p.number, p.region, p.holders FROM pool_numbers p
                WHERE p.state = 'active' AND p.mode = 'direct' AND p.number NOT IN (SELECT pool_number FROM blocked)
            ), tiers AS (
                (SELECT f.number, 0 AS load, 0 AS tier FROM free f WHERE f.number = $4)
                UNION ALL
                (SELECT f.number, 0, 1 FROM free f WHERE f.number = (SELECT pool_number FROM sticky))
                UNION ALL
                (SELECT f.number, f.holders, 2 FROM free f WHERE $2::text IS NOT NULL AND f.region = $2
                 ORDER BY f.holders LIMIT $3 * 4)
                UNION ALL
                (SELECT f.number, f.holders, 3 FROM free f ORDER BY f.holders LIMIT $3 * 4)
            )
            SELECT number FROM (SELECT DISTINCT ON (number) number, load, tier FROM tiers ORDER BY number, tier) best
            ORDER BY tier, load, random()
            LIMIT $3
            """,
            pair, region, limit, prefer,
        )
        return [r["number"] for r in rows]

    async def hold_counts(self, idx: bytes) -> tuple[int, int]:
        """(live, cooling) pool numbers this real number holds."""
        row = await self.pool.fetchrow(
            f"""SELECT count(*) FILTER (WHERE h.left_at IS NULL) AS live,
                       count(*) FILTER (WHERE h.left_at IS NOT NULL) AS cooling
                FROM participants h WHERE h.number_idx = $1 AND {_HOLDING}""",
            idx,
        )
        return (int(row["live"]), int(row["cooling"])) if row is not None else (0, 0)

    async def active_numbers(self) -> int:
        """Active numbers the direct allocator hands out (order-code numbers are shared)."""
        return int(await self.pool.fetchval(
            "SELECT count(*) FROM pool_numbers WHERE state = 'active' AND mode = 'direct'"))

    # --- changing sessions -------------------------------------------------------------

    @staticmethod
    async def _free_pairs(conn: asyncpg.Connection, pair: list[bytes], pool_number: str) -> None:
        """Release holds that no longer count: cool-offs that ended, and the pair's own
        cooling holds on this number (a pair may come back to its number at once)."""
        await conn.execute(
            f"""
            UPDATE participants h SET holds = false
            WHERE h.number_idx = ANY($1::bytea[]) AND h.holds AND h.left_at IS NOT NULL
              AND (h.held_until <= now() OR (h.pool_number = $2 AND {_OWN_COOLING_HOLD}))
            """,
            pair, pool_number,
        )

    @staticmethod
    async def _still_active(conn: asyncpg.Connection, pool_number: str, mode: str = "direct") -> None:
        """The number is still active and in `mode`, and stays so until this transaction ends
        (a retire or a mode change waits for it): a session is never opened on a number being
        retired, nor a direct session on a number becoming shared."""
        # (A direct number's row is updated by this transaction anyway, its holders counted
        # in place: locked for that at once, so that two changes on it queue instead of
        # deadlocking. A shared order-code number's holders are not counted.)
        lock = "FOR NO KEY UPDATE" if mode == "direct" else "FOR SHARE"
        if not await conn.fetchval(
            f"SELECT true FROM pool_numbers WHERE number = $1 AND state = 'active' AND mode = $2 {lock}",
            pool_number, mode,
        ):
            raise PairTaken(pool_number)

    @staticmethod
    async def _event(conn: asyncpg.Connection, session_id: uuid.UUID, kind: str, **detail: Any) -> None:
        await conn.execute(
            "INSERT INTO session_events (session_id, kind, detail, token) VALUES ($1, $2, $3::jsonb, $4)",
            session_id, kind, json.dumps(detail, default=str), request_token(),  # (the API token's name)
        )

    async def open(
        self, order_id: str, courier: Sealed, client: Sealed, terms: SessionTerms, *, code_given: bool = False
    ) -> Opening:
        """Open the order's session, or find the one open already: one statement (sql/027;
        how it locks the number, sql/028) that picks the pool number (see `candidates` for the
        order of preference), writes the session, its two participants and its event, and
        returns them as written; sent with the opens that came meanwhile (_OpenBatches,
        sql/029), each in a subtransaction of its own.

        Raises PairTaken when a racing open took the number for one of the two, OrderRace
        when the order got an open session meanwhile, CodeTaken when a racing order-code
        session on the number has the same code, and Contended when the database gave up on
        the open (a deadlock): nothing of it is written then, and looking again is safe.
        """
        session = {
            "region": terms.region, "idle_timeout_seconds": terms.idle_timeout_seconds,
            "grace_seconds": terms.grace_seconds, "mode": "direct" if terms.order_code is None else "order_code",
            "order_code": terms.order_code, **terms.terms.to_api(),
            "token": request_token(),  # (who opened it: the event names it, sql/027)
        }
        try:
            row = await self._batches.open((order_id, courier.id, courier.idx, courier.enc, client.id, client.idx,
                                            client.enc, json.dumps(session), terms.ttl_seconds, code_given))
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "participants_held_pair":
                raise PairTaken(exc.constraint_name) from exc
            if exc.constraint_name == "sessions_one_open_per_order":
                raise OrderRace(order_id) from exc
            if exc.constraint_name == "sessions_live_order_code":
                raise CodeTaken(exc.constraint_name) from exc
            raise
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
            raise Contended(str(exc)) from exc
        if row is None or row["session"] is None:
            return Opening(row["outcome"] if row is not None else "exhausted")
        members = tuple(_participant_row(p) for p in row["members"] or ())
        return Opening(row["outcome"], _session_row(row["session"], members), row["due"])

    async def _lock(self, conn: asyncpg.Connection, session_id: uuid.UUID) -> asyncpg.Record:
        row = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1 FOR UPDATE", session_id)
        if row is None:
            raise SessionGone("no such session")
        return row

    async def extend(self, session_id: uuid.UUID, ttl_seconds: int | None, idle_timeout_seconds: int | None) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await self._lock(conn, session_id)
            if row["status"] != "open":
                raise SessionGone(f"the session is {row['status']}")
            await conn.execute(
                """
                UPDATE sessions SET
                    expires_at = CASE WHEN $2::int IS NULL THEN expires_at ELSE now() + make_interval(secs => $2) END,
                    idle_timeout_seconds = coalesce($3, idle_timeout_seconds),
                    last_activity_at = now()
                WHERE id = $1
                """,
                session_id, ttl_seconds, idle_timeout_seconds,
            )
            await self._event(
                conn, session_id, "extended", ttl_seconds=ttl_seconds, idle_timeout_seconds=idle_timeout_seconds
            )

    @staticmethod
    async def _leave(conn: asyncpg.Connection, session_id: uuid.UUID, role: str | None, cooloff: int,
                     why: str = "session_ended") -> None:
        """The live participants of a session (or of one role) leave it. Their calls in
        progress are ended by the bridge (`why` is the cut's reason), told on commit."""
        await conn.execute(
            """
            WITH left_now AS (
                UPDATE participants SET left_at = now(), held_until = now() + make_interval(secs => $3),
                                        holds = $3 > 0
                WHERE session_id = $1 AND left_at IS NULL AND ($2::text IS NULL OR role = $2)
                RETURNING id
            )
            SELECT pg_notify($4, $5 || ' ' || string_agg(id::text, ',')) FROM left_now HAVING count(*) > 0
            """,
            session_id, role, cooloff, PARTICIPANTS_LEFT, why,
        )

    async def end_if_due(self, session_id: uuid.UUID, cooloff: int) -> str | None:
        """End a session whose time is up: an open one past its absolute or inactivity
        expiry, or one whose grace period is over. Decided under the session's lock, so a
        call or an extend that lands first keeps it alive."""
        return await self.end(session_id, "due", 0, cooloff)

    async def end(self, session_id: uuid.UUID, reason: str, grace_seconds: int | None, cooloff: int) -> str | None:
        """End an open session (reason closed), or the grace period of one. With a grace
        period, only the courier leaves now and the client keeps the number until it ends.
        reason "due": only what is due ends (see end_if_due). Returns the event recorded
        (grace_started, closed, expired, inactive), None when nothing changed."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await self._lock(conn, session_id)
            if reason == "due":
                due = await conn.fetchval(
                    "SELECT maskbridge_session_due(s) FROM sessions s WHERE s.id = $1", session_id
                )
                if due is None:
                    return None
                reason, grace_seconds = due, 0
            grace = row["grace_seconds"] if grace_seconds is None else grace_seconds
            if row["status"] == "open" and reason == "closed" and grace > 0:
                await conn.execute(
                    """UPDATE sessions SET status = 'grace', end_reason = $2,
                       grace_until = now() + make_interval(secs => $3) WHERE id = $1""",
                    session_id, reason, grace,
                )
                await self._leave(conn, session_id, "courier", cooloff)
                await self._event(conn, session_id, "grace_started", grace_seconds=grace)
                return "grace_started"
            if row["status"] == "closed":
                return None
            await conn.execute(
                """UPDATE sessions SET status = 'closed', closed_at = now(), grace_until = NULL,
                   end_reason = coalesce(end_reason, $2) WHERE id = $1""",
                session_id, reason,
            )
            await self._leave(conn, session_id, None, cooloff)
            kind = reason if row["status"] == "open" else "closed"
            await self._event(conn, session_id, kind)
            return kind

    async def reassign_courier(
        self, session_id: uuid.UUID, courier: Sealed, pool_number: str, cooloff: int
    ) -> bool:
        """The live courier leaves (its pair cools off) and `courier` joins on `pool_number`.
        Returns False when `courier` is the live courier already (a repeated request).
        Raises PairTaken when the new courier cannot have that number (retry with another)."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await self._lock(conn, session_id)
                if row["status"] != "open":
                    raise SessionGone(f"the session is {row['status']}")
                old = await conn.fetchrow(
                    """SELECT id, number_idx FROM participants
                       WHERE session_id = $1 AND role = 'courier' AND left_at IS NULL""",
                    session_id,
                )
                if old is not None and old["number_idx"] == courier.idx:
                    return False
                by_code = row["mode"] == "order_code"
                if not by_code:  # an order-code session keeps its shared number
                    await self._still_active(conn, pool_number)
                await self._leave(conn, session_id, "courier", cooloff, why="reassigned")
                if not by_code:
                    await self._free_pairs(conn, [courier.idx], pool_number)
                new: uuid.UUID = await conn.fetchval(
                    """INSERT INTO participants (id, session_id, role, number_idx, number_enc, pool_number, by_code)
                       VALUES ($1, $2, 'courier', $3, $4, $5, $6) RETURNING id""",
                    courier.id, session_id, courier.idx, courier.enc, pool_number, by_code,
                )
                await self._event(
                    conn, session_id, "courier_reassigned", previous=old["id"] if old else None, participant=new,
                    pool_number=pool_number,
                )
                return True
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "participants_held_pair":
                raise PairTaken(pool_number) from exc
            raise
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
            raise Contended(str(exc)) from exc

    # --- routing -------------------------------------------------------------------------

    async def route(self, idx: bytes, pool_number: str) -> RouteRow | None:
        """The holder of (number, pool number), with its session and the live other side.
        One indexed lookup: the unique hold index makes the answer unambiguous."""
        row = await self.pool.fetchrow(ROUTE_SQL, idx, pool_number)
        return route_row(row) if row is not None else None

    async def route_by_code(self, idx: bytes, pool_number: str, order_code: str) -> RouteRow | None:
        """The caller's part in the live session with this code on this order-code number."""
        row = await self.pool.fetchrow(ROUTE_BY_CODE_SQL, idx, pool_number, order_code)
        return route_row(row) if row is not None else None

    async def ended_with_code(self, idx: bytes, pool_number: str, order_code: str, within: int) -> bool:
        """Whether the caller took part in a session with this code on this number that
        ended in the last `within` seconds (their own order, delivered)."""
        return bool(await self.pool.fetchval(
            """SELECT EXISTS (
                   SELECT 1 FROM participants p JOIN sessions s ON s.id = p.session_id
                   WHERE p.number_idx = $1 AND p.pool_number = $2 AND p.by_code AND s.order_code = $3
                     AND s.status NOT IN ('open', 'grace')
                     AND s.closed_at > now() - make_interval(secs => $4))""",
            idx, pool_number, order_code, within,
        ))

    async def wrong_codes(self, idx: bytes, pool_number: str, window: int) -> int:
        """Wrong codes this caller keyed on this number in the last `window` seconds."""
        return int(await self.pool.fetchval(
            """SELECT count(*) FROM order_code_failures
               WHERE number_idx = $1 AND pool_number = $2 AND at > now() - make_interval(secs => $3)""",
            idx, pool_number, window,
        ))

    async def add_wrong_code(self, idx: bytes, pool_number: str, window: int) -> int:
        """Record a wrong code; returns how many this caller keyed on this number in the
        last `window` seconds, this one included."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO order_code_failures (number_idx, pool_number) VALUES ($1, $2)", idx, pool_number
            )
            return int(await conn.fetchval(
                """SELECT count(*) FROM order_code_failures
                   WHERE number_idx = $1 AND pool_number = $2 AND at > now() - make_interval(secs => $3)""",
                idx, pool_number, window,
            ))

    async def forget_wrong_codes(self, window: int) -> int:
        """Wrong codes older than the lockout window count for nothing any more: deleted."""
        return _affected(await self.pool.execute(
            "DELETE FROM order_code_failures WHERE at <= now() - make_interval(secs => $1)", window
        ))

    async def block_participant(self, session_id: uuid.UUID, participant_id: uuid.UUID, by: uuid.UUID) -> bool:
        """The other party blocked this participant for the session (from the keypad)."""
        async with self.pool.acquire() as conn, conn.transaction():
            blocked = await conn.fetchval(
                """UPDATE participants SET blocked_at = now()
                   WHERE id = $1 AND session_id = $2 AND blocked_at IS NULL RETURNING true""",
                participant_id, session_id,
            )
            if blocked:
                await self._event(conn, session_id, "blocked_by_client", participant=participant_id, by=by)
        return bool(blocked)

    # --- housekeeping ----------------------------------------------------------------------

    async def due(self) -> list[uuid.UUID]:
        """Sessions whose time looks up (end_if_due decides, under the lock)."""
        rows = await self.pool.fetch(
            "SELECT id FROM sessions s WHERE s.status IN ('open', 'grace') AND maskbridge_session_due(s) IS NOT NULL"
        )
        return [r["id"] for r in rows]

    async def next_due_in(self) -> float | None:
        """Seconds until the next open session reaches its expiry, or the next grace period
        ends (0 if one is past it already); None if none will. Two index lookups: the
        housekeeping asks every second. (Idle timeouts are left to the sweep: a session with a
        call in progress is not idle, so ending one cuts no call.)"""
        return await self.pool.fetchval(
            """
            SELECT greatest(extract(epoch FROM least(
                (SELECT min(expires_at) FROM sessions WHERE status = 'open'),
                (SELECT min(grace_until) FROM sessions WHERE status = 'grace')
            ) - now()), 0)::float8
            """
        )

    async def left_among(self, participant_ids: set[uuid.UUID]) -> dict[uuid.UUID, str]:
        """Which of these participants have left their session, with the reason a call of
        theirs is cut for: "reassigned" (their session goes on without them) or "session_ended"."""
        rows = await self.pool.fetch(
            """SELECT p.id, s.status = 'open' AS session_open FROM participants p JOIN sessions s ON s.id = p.session_id
               WHERE p.id = ANY($1::uuid[]) AND p.left_at IS NOT NULL""",
            list(participant_ids),
        )
        return {r["id"]: "reassigned" if r["session_open"] else "session_ended" for r in rows}

    async def release_cooled(self) -> int:
        return _affected(
            await self.pool.execute(
                "UPDATE participants SET holds = false WHERE holds AND left_at IS NOT NULL AND held_until <= now()"
            )
        )

    async def purge(self, older_than_days: int) -> dict[str, int]:
        """Delete the real numbers of participants who left more than N days ago, and the
        masked caller numbers of calls that ended before then. Sessions and calls stay,
        linked by participant ids."""
        async with self.pool.acquire() as conn, conn.transaction():
            purged = await conn.fetch(
                """
                UPDATE participants SET number_idx = NULL, number_enc = NULL, holds = false, purged_at = now()
                WHERE purged_at IS NULL AND left_at < now() - make_interval(days => $1)
                  AND (NOT holds OR held_until <= now())  -- a cool-off still running is kept
                RETURNING session_id
                """,
                older_than_days, timeout=LONG_STATEMENT,
            )
            sessions: dict[uuid.UUID, int] = {}
            for r in purged:
                sessions[r["session_id"]] = sessions.get(r["session_id"], 0) + 1
            for session_id, count in sessions.items():
                await self._event(conn, session_id, "purged", participants=count)
            calls = _affected(
                await conn.execute(
                    """UPDATE calls SET caller_masked = NULL
                       WHERE caller_masked IS NOT NULL AND ended_at < now() - make_interval(days => $1)""",
                    older_than_days, timeout=LONG_STATEMENT,
                )
            )
        return {"participants": len(purged), "sessions": len(sessions), "calls": calls}
