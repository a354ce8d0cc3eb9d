"""Order sessions: one per order, a pool number chosen for the pair, their whole life
(extend, reassign the courier, close with an optional grace period, expiry), and the
routing decision for a call from (real number, pool number)."""

from __future__ import annotations

import secrets
import uuid
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import structlog

from bridge import metrics
from bridge.abuse import QuietHours
from bridge.crypto import NumberVault, participant_number
from bridge.destinations import Destinations
from bridge.errors import (
    Contention, CourierIsClient, InternalError, InvalidInput, OrderCodeTaken, OrderHasOpenSession,
    PoolExhausted, SessionEnded, SessionNotFound, UnknownRegion,
)
from bridge.limits import MAX_PHONE_NUMBER_LENGTH, MAX_SECONDS, SESSION_STATUSES
from bridge.number_keys import NumberKeys, readable
from bridge.phone import InvalidNumber, normalize
from bridge.requests import OpenSession
from bridge.store import Store
from bridge.store.queries import Dialed, NewCall
from bridge.store.errors import CodeTaken, Contended, OrderRace, PairTaken, SessionGone
from bridge.store.sessions import ParticipantRow, RouteRow, Sealed, SessionRow, SessionTerms
from bridge.terms import Terms

log = structlog.get_logger(__name__)

_ATTEMPTS = 20


@dataclass(frozen=True)
class Policy:
    """Defaults and limits of sessions (README, "Settings")."""

    default_region: str = "RU"  # for national-form phone numbers
    session_ttl: int = 24 * 3600
    grace_period: int = 0
    pair_cooloff: int = 24 * 3600
    number_cooling: int = 7 * 24 * 3600
    retention_days: int = 30
    support_number: str | None = None
    destinations: Destinations = field(default_factory=Destinations)  # what the bridge may dial
    default_language: str = "en"  # of announcements, for pool numbers without one
    order_code_length: int = 6  # digits of an order code
    order_code_attempts: int = 3  # wrong codes per call, and within the lockout window, before a lockout
    order_code_lockout: int = 900  # seconds the wrong codes of a caller on a number count
    # The bridge-wide default of every session term (bridge.terms; their MB_ settings).
    terms: Terms = field(default_factory=lambda: Terms.defaults_from_env({}))


@dataclass(frozen=True)
class Route:
    """Where a call from (caller, dialed pool number) goes.

    kind: "connect" (ring callee_number showing shown_number), "finished" (the caller's
    session, or their part in it, has ended: they hear that the order finished), "blocked"
    (the caller or the other side is on the blocklist), "call_limit" / "quiet_hours" (the
    session's abuse controls refuse it) or "unknown" (nothing routes this pair).
    For an order-code number: "order_code" (ask the caller for the code, then route_by_code),
    "locked_out" (too many wrong codes lately: refused without asking); and after a code,
    "wrong_code" (ask again), or "locked_out" (that wrong code was one too many).
    """

    kind: str
    session_id: uuid.UUID | None = None
    caller_role: str | None = None
    caller_participant_id: uuid.UUID | None = None
    callee_role: str | None = None
    callee_participant_id: uuid.UUID | None = None
    callee_number: str | None = None
    shown_number: str | None = None
    pool_known: bool = True  # the dialed number is one of our pool numbers
    known_caller: bool = False  # order_code: the caller is one of the number's orders' people
    language: str = "en"  # of what the caller is told
    terms: Terms = field(default_factory=Terms)  # the session's effective terms (every one resolved; bridge.terms)


def phone_number(field: str, raw: object, region: str) -> str:
    if not isinstance(raw, str):
        raise InvalidInput(f"{field} must be a string holding a phone number", field=field)
    if len(raw) > MAX_PHONE_NUMBER_LENGTH:
        raise InvalidInput(f"{field} is too long to be a phone number", field=field)
    try:
        return normalize(raw, region)
    except InvalidNumber as exc:
        raise InvalidInput(f"{field} is not a valid phone number: {exc}", field=field) from None


def seconds(field: str, raw: object, *, minimum: int = 1, default: int | None = None) -> int | None:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int) or not minimum <= raw <= MAX_SECONDS:
        raise InvalidInput(f"{field} must be a whole number of seconds from {minimum} to {MAX_SECONDS}", field=field)
    return raw


class Sessions:
    def __init__(self, store: Store, vault: NumberVault, policy: Policy | None = None) -> None:
        self.store = store
        self.repo = store.sessions
        self.vault = vault
        self.policy = policy or Policy()

    async def _seal(self, number: str) -> Sealed:
        """The number of a new participant row, sealed for that row (its id made here)."""
        row = uuid.uuid4()
        return Sealed(id=row, idx=self.vault.index(number), enc=await self.vault.seal(number, participant_number(row)))

    def reveal(self, participant: ParticipantRow) -> str | None:
        """The real number of a participant of a session read by this service (which loaded
        its key); None once the retention job removed it, or when it does not open."""
        return readable(self.vault, participant.number_enc, participant_number(participant.id))

    async def _loaded(self, sessions: list[SessionRow]) -> list[SessionRow]:
        """The sessions, with the keys of their participants' numbers in memory (reveal())."""
        await self.vault.load(p.number_enc for s in sessions for p in s.participants)
        return sessions

    # --- open ------------------------------------------------------------------------

    async def open(self, request: OpenSession) -> tuple[SessionRow, bool]:
        """Open the order's session, or return the one already open. Returns (session, created).
        Everything is checked before anything is written. mode "order_code": the session gets
        a shared order-code number and an order code (`order_code`, or a random one)."""
        order_id = request.order_id
        courier = phone_number("courier_number", request.courier_number, self.policy.default_region)
        client = phone_number("client_number", request.client_number, self.policy.default_region)
        self.policy.destinations.check({"courier_number": courier, "client_number": client})
        if courier == client:
            raise InvalidInput("courier_number and client_number are the same number", field="client_number")
        by_code = (request.mode or "direct") == "order_code"
        given_code = self._order_code(request.order_code, by_code)
        terms = SessionTerms(
            region=request.region,
            ttl_seconds=request.ttl_seconds or self.policy.session_ttl,
            idle_timeout_seconds=request.idle_timeout_seconds,
            grace_seconds=self.policy.grace_period if request.grace_seconds is None else request.grace_seconds,
            terms=request.terms().at_open(self.policy.terms),
        )
        if terms.grace_seconds and not self.policy.support_number:
            raise InvalidInput("a grace period needs a support number (MB_SUPPORT_NUMBER)", field="grace_seconds")
        sealed_courier, sealed_client = await self._seal(courier), await self._seal(client)
        for _attempt in range(_ATTEMPTS):
            if by_code:
                terms = dataclasses.replace(terms, order_code=given_code or self._new_code())
            try:
                opening = await self.repo.open(order_id, sealed_courier, sealed_client, terms,
                                               code_given=given_code is not None)
            except (PairTaken, OrderRace, CodeTaken):
                continue  # a racing open took it (or a code of our own met another's): look again
            except Contended:
                log.info("session.open_contended", order_id_length=len(order_id))
                continue  # the database gave up on the statement: nothing was written
            session = opening.session
            if opening.outcome == "open_already" and session is not None:
                if opening.due and await self.repo.end_if_due(session.id, self.policy.pair_cooloff):
                    continue  # it was past its time: the order gets a new session
                await self._loaded([session])
                self._same_people(session, courier, client)
                self._same_mode(session, by_code, given_code)
                return session, False
            if opening.outcome == "opened" and session is not None:
                await self._loaded([session])  # (its numbers' key, for reveal(): in memory, it sealed them)
                log.info("session.opened", session_id=str(session.id), pool_number=session.pool_number,
                         mode=session.mode)
                metrics.SESSIONS_OPENED.labels(session.mode).inc()
                return session, True
            if opening.outcome == "unknown_region":
                raise UnknownRegion(f"no pool number is in region {terms.region}", field="region")
            if opening.outcome == "code_taken":
                raise OrderCodeTaken(field="order_code")
            metrics.POOL_EXHAUSTED.labels("order_code" if by_code else "direct", terms.region or "any").inc()
            if by_code:
                raise PoolExhausted("no active pool number is in mode order_code", active_numbers=0)
            raise await self._exhausted([sealed_courier.idx, sealed_client.idx])
        raise Contention("too many opens raced for the same numbers; try again")

    def _order_code(self, raw: object, by_code: bool) -> str | None:
        """The order system's own code, checked: exactly MB_ORDER_CODE_LENGTH digits."""
        if raw is None:
            return None
        if not by_code:
            raise InvalidInput("order_code is only for sessions in mode order_code", field="order_code")
        length = self.policy.order_code_length
        if not isinstance(raw, str) or len(raw) != length or not raw.isascii() or not raw.isdigit():
            raise InvalidInput(f"order_code must be exactly {length} digits (0-9)", field="order_code")
        return raw

    def _new_code(self) -> str:
        return "".join(secrets.choice("0123456789") for _ in range(self.policy.order_code_length))

    @staticmethod
    def _same_mode(session: SessionRow, by_code: bool, given_code: str | None) -> None:
        if (session.mode == "order_code") != by_code or (given_code and session.order_code != given_code):
            raise OrderHasOpenSession(session_id=str(session.id))

    def _same_people(self, session: SessionRow, courier: str, client: str) -> None:
        """Asking again for an open order must name the people it has: an order system that
        sends other numbers for the same order has a bug we must not paper over. The answer
        does not say who differs: it would tell whether a number is in the order."""
        live = [(session.live(role), given) for role, given in (("courier", courier), ("client", client))]
        # (both compared every time: how long the answer takes does not say who differs either)
        same = [p is not None and self.reveal(p) == given for p, given in live]
        if not all(same):
            raise OrderHasOpenSession(session_id=str(session.id))

    async def _exhausted(self, pair: list[bytes]) -> PoolExhausted:
        counts = [await self.repo.hold_counts(idx) for idx in pair]
        (courier_live, courier_cooling), (client_live, client_cooling) = counts if len(counts) == 2 else (
            counts[0], (0, 0)
        )
        active = await self.repo.active_numbers()
        # With at most n live sessions per participant, each of the two holds at most n-1
        # other numbers when a new session is opened: 2n-1 numbers always leave one free.
        n = max(courier_live, client_live) + 1
        needed = max(2 * n - 1, courier_live + courier_cooling + client_live + client_cooling + 1)
        return PoolExhausted(
            f"the pool is exhausted for this pair: every one of the {active} active numbers is held by the courier "
            f"or the client (live or cooling off). For participants with at most {n} live sessions each, "
            f"{2 * n - 1} numbers always suffice; this pair needs at least {needed} with its cool-offs",
            active_numbers=active,
            courier_holds={"live": courier_live, "cooling": courier_cooling},
            client_holds={"live": client_live, "cooling": client_cooling},
            numbers_needed=needed,
        )

    # --- read ---------------------------------------------------------------------------

    async def get(self, session_id: uuid.UUID) -> SessionRow:
        session = await self.repo.get(session_id)
        if session is None:
            raise SessionNotFound()
        return (await self._loaded([session]))[0]

    async def find(
        self, *, order_id: str | None, status: str | None, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[SessionRow]:
        if status is not None and status not in SESSION_STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(SESSION_STATUSES)}", field="status")
        return await self._loaded(await self.repo.page(order_id=order_id, status=status, after=after, limit=limit))

    async def _live(self, session_id: uuid.UUID, change: str) -> SessionRow:
        """The session, if it is open and not past its time (then it is ended here, and
        a late change cannot bring it back to life)."""
        await self.get(session_id)
        await self.repo.end_if_due(session_id, self.policy.pair_cooloff)
        session = await self.get(session_id)
        if session.status != "open":
            raise SessionEnded(f"only an open session can be {change}: the session is {session.status}")
        return session

    async def events(self, session_id: uuid.UUID) -> list[dict[str, Any]]:
        await self.get(session_id)
        return await self.repo.events(session_id)

    # --- change -------------------------------------------------------------------------

    async def extend(self, session_id: uuid.UUID, ttl_seconds: object, idle_timeout_seconds: object) -> SessionRow:
        ttl = seconds("ttl_seconds", ttl_seconds)
        idle = seconds("idle_timeout_seconds", idle_timeout_seconds)
        if ttl is None and idle is None:
            raise InvalidInput("give ttl_seconds, idle_timeout_seconds or both", field="ttl_seconds")
        await self._live(session_id, "extended")
        try:
            await self.repo.extend(session_id, ttl, idle)
        except SessionGone as exc:
            raise SessionEnded(f"only an open session can be extended: {exc}") from None
        log.info("session.extended", session_id=str(session_id), ttl_seconds=ttl, idle_timeout_seconds=idle)
        return await self.get(session_id)

    async def close(self, session_id: uuid.UUID, grace_seconds: object = None) -> SessionRow:
        """Close the session. With a grace period (given here, or set at open) the client can
        still reach support through the pool number until it ends; the courier cannot."""
        grace = seconds("grace_seconds", grace_seconds, minimum=0)
        if grace and not self.policy.support_number:
            raise InvalidInput("a grace period needs a support number (MB_SUPPORT_NUMBER)", field="grace_seconds")
        await self.get(session_id)
        # A session past its time ends as expired (or inactive), whoever notices first.
        if not await self.repo.end_if_due(session_id, self.policy.pair_cooloff):
            await self.repo.end(session_id, "closed", grace, self.policy.pair_cooloff)
        session = await self.get(session_id)
        log.info("session.closed", session_id=str(session_id), status=session.status)
        return session

    async def reassign_courier(
        self, session_id: uuid.UUID, courier_number: object, field: str = "courier_number"
    ) -> tuple[SessionRow, bool]:
        """A new courier takes the order. The client keeps their number; the new courier is
        given the session's number when it is free for them, another one otherwise.
        Returns (session, whether the courier changed)."""
        courier = phone_number(field, courier_number, self.policy.default_region)
        self.policy.destinations.check({field: courier})
        session = await self._live(session_id, "reassigned")
        client = session.live("client")
        current = session.live("courier")
        if client is None or current is None:  # an open session has both; the data says otherwise
            raise InternalError(f"open session {session_id} lacks a live participant")
        sealed = await self._seal(courier)
        if self.reveal(client) == courier:
            raise CourierIsClient("the new courier's number is the client's number", field=field)
        if self.reveal(current) == courier:
            return session, False  # already theirs: nothing to change
        for _attempt in range(_ATTEMPTS):
            # The client's number when it is free for the new courier: then both dial one number.
            # (An order-code session keeps its shared number: the code tells the orders apart.)
            candidates = [session.pool_number] if session.mode == "order_code" else await self.repo.candidates(
                [sealed.idx], session.region, prefer=client.pool_number)
            if not candidates:
                raise await self._exhausted([sealed.idx])
            try:
                changed = await self.repo.reassign_courier(session_id, sealed, candidates[0], self.policy.pair_cooloff)
            except PairTaken:
                continue
            except Contended:
                log.info("session.reassign_contended", session_id=str(session_id))
                continue
            except SessionGone as exc:
                raise SessionEnded(f"only an open session can be reassigned: {exc}") from None
            if changed:
                log.info("session.courier_reassigned", session_id=str(session_id), pool_number=candidates[0])
            return await self.get(session_id), changed
        raise Contention("too many changes raced for the same numbers; try again")

    # --- routing ------------------------------------------------------------------------

    async def route(
        self, caller: str, pool_number: str, record: NewCall | None = None, *, second_look: bool = False
    ) -> Route:
        """The routing decision for a call; ends a session found past its time on the way,
        so that nothing routes after a session's end, whether or not the sweeper ran.
        `record`: the call's row is written by the lookup itself (state routing, naming the
        session and caller found), in the same round trip."""
        idx = self.vault.index(caller)
        dialed: Dialed | None = None
        if record is not None:
            row, dialed = await self.store.route_and_record(idx, pool_number, record)
        else:
            row = await self.repo.route(idx, pool_number)
        if row is None:
            if dialed is None:
                dialed = Dialed(*await self.store.pools.routing_facts(pool_number))
            known, language, mode = dialed.known, dialed.language, dialed.mode
            language = language or self.policy.default_language
            if mode == "order_code":
                # Shared by many orders: the caller keys the code in, unless locked out.
                locked = await self.repo.wrong_codes(idx, pool_number, self.policy.order_code_lockout) \
                    >= self.policy.order_code_attempts
                return Route("locked_out" if locked else "order_code", language=language,
                             known_caller=dialed.caller_holds)
            return Route("unknown", pool_known=known, language=language)
        return await self._decide(row, lambda: self.route(caller, pool_number, second_look=True), second_look)

    async def route_by_code(
        self, caller: str, pool_number: str, order_code: str, *, second_look: bool = False
    ) -> Route:
        """The routing decision for a call to an order-code number once the caller keyed
        `order_code`: as for a direct call when the caller is a participant of the live
        session with that code on the number. Otherwise the wrong code is recorded (by the
        caller's blind index): "wrong_code", or "locked_out" once there were too many."""
        idx = self.vault.index(caller)
        row = await self.repo.route_by_code(idx, pool_number, order_code) if order_code else None
        if row is None:
            # The session ended between the two looks; or the code is of the caller's own
            # order, ended lately (the pair's cool-off): they hear the order finished, and it
            # is no wrong code (a courier keying a delivered order's code must not lock
            # themselves out of their live orders on the number).
            if second_look or (order_code and await self.repo.ended_with_code(
                    idx, pool_number, order_code, self.policy.pair_cooloff)):
                _known, language, _mode = await self.store.pools.routing_facts(pool_number)
                return Route("finished", language=language or self.policy.default_language)
            wrong = await self.repo.add_wrong_code(idx, pool_number, self.policy.order_code_lockout)
            _known, language, _mode = await self.store.pools.routing_facts(pool_number)
            log.info("order_code.wrong", pool_number=pool_number, wrong_codes=wrong)
            kind = "locked_out" if wrong >= self.policy.order_code_attempts else "wrong_code"
            return Route(kind, language=language or self.policy.default_language)
        return await self._decide(
            row, lambda: self.route_by_code(caller, pool_number, order_code, second_look=True), second_look
        )

    async def _decide(self, row: RouteRow, look_again: Callable[[], Awaitable[Route]], second_look: bool) -> Route:
        """Where the call of the participant `row` goes (the session's state, blocks, caps)."""
        language = row.language or self.policy.default_language
        terms = row.terms.effective(self.policy.terms)
        finished = Route("finished", session_id=row.session_id, caller_role=row.role,
                         caller_participant_id=row.participant_id, language=language)
        if row.caller_blocked or row.other_blocked:
            return Route("blocked", session_id=row.session_id, caller_role=row.role,
                         caller_participant_id=row.participant_id, language=language)
        if row.caller_left:
            return finished
        if row.due is not None:
            # Ended under the session's lock (unless a call or an extend got there first);
            # then decided again on what the database says now.
            await self.repo.end_if_due(row.session_id, self.policy.pair_cooloff)
            return finished if second_look else await look_again()
        if row.status == "grace":
            if row.role == "client" and self.policy.support_number:
                return Route("connect", session_id=row.session_id, caller_role="client",
                             caller_participant_id=row.participant_id, callee_role="support",
                             callee_number=self.policy.support_number, shown_number=row.pool_number,
                             language=language, terms=terms)
            return finished
        if row.status != "open" or row.other_enc is None:
            return finished
        refused = self._abuse_control(row, terms)
        if refused is not None:
            return Route(refused, session_id=row.session_id, caller_role=row.role,
                         caller_participant_id=row.participant_id, language=language)
        callee = None
        if row.other_id:
            await self.vault.load([row.other_enc])
            callee = readable(self.vault, row.other_enc, participant_number(row.other_id), "route")
        if callee is None:  # (its key destroyed, or it does not open: retention never destroys a live one's)
            log.warning("route.callee_number_gone", session_id=str(row.session_id))
            return finished
        if not self.policy.destinations.allows(callee):
            # Opened under a wider MB_ALLOWED_DESTINATIONS: never dialed now; refused as a block is.
            log.warning("route.destination_not_allowed", session_id=str(row.session_id), callee_role=row.other_role)
            return Route("blocked", session_id=row.session_id, caller_role=row.role,
                         caller_participant_id=row.participant_id, language=language)
        # (the call's row, once it rings, marks the session active: see Store.call_put_through)
        return Route("connect", session_id=row.session_id, caller_role=row.role,
                     caller_participant_id=row.participant_id, callee_role=row.other_role,
                     callee_participant_id=row.other_id, callee_number=callee,
                     shown_number=row.other_pool_number, language=language, terms=terms)

    async def block_by_client(self, session_id: uuid.UUID, participant_id: uuid.UUID, by: uuid.UUID) -> None:
        """The client pressed the block keys: `participant_id` reaches no one on this session."""
        if await self.repo.block_participant(session_id, participant_id, by):
            log.info("session.blocked_by_client", session_id=str(session_id), participant_id=str(participant_id))

    @staticmethod
    def _abuse_control(row: RouteRow, terms: Terms) -> str | None:
        """"call_limit" or "quiet_hours" when the session's (effective) terms refuse this call."""
        per_hour, per_day = terms.calls_per_hour, terms.calls_per_day
        if (per_hour and row.calls_last_hour >= per_hour) or (per_day and row.calls_last_day >= per_day):
            return "call_limit"
        quiet = terms.quiet_hours
        if row.other_role == "client" and isinstance(quiet, QuietHours) and quiet.covers(datetime.now(timezone.utc)):
            return "quiet_hours"
        return None

    # --- housekeeping --------------------------------------------------------------------

    async def sweep(self) -> dict[str, int]:
        """End sessions past their time, release cool-offs that ended, retire cooled numbers."""
        ended: dict[str, int] = {}
        for session_id in await self.repo.due():
            kind = await self.repo.end_if_due(session_id, self.policy.pair_cooloff)
            if kind:
                ended[kind] = ended.get(kind, 0) + 1
                log.info("session.ended", session_id=str(session_id), reason=kind)
        counts = {
            **{f"sessions_{k}": v for k, v in ended.items()},
            "holds_released": await self.repo.release_cooled(),
            "wrong_codes_forgotten": await self.repo.forget_wrong_codes(self.policy.order_code_lockout),
            "numbers_retired": await self.store.pools.finish_cooling(),
            "blocks_expired": await self.store.blocklist.remove_expired(),
        }
        return {k: v for k, v in counts.items() if v}

    async def next_due_in(self) -> float | None:
        """Seconds until a session reaches its expiry or the end of its grace period; None: none will."""
        return await self.repo.next_due_in()

    async def purge(self, older_than_days: int | None = None) -> dict[str, int]:
        days = self.policy.retention_days if older_than_days is None else older_than_days
        if days < 1:  # (0 or less would purge today's numbers, and destroy today's key)
            raise InvalidInput("the retention cut-off is at least 1 day", field="older_than_days")
        counts = await self.repo.purge(days)
        # (then the data keys whose time came: the numbers of old row versions, the WAL and backups)
        counts |= await NumberKeys(self.store.number_keys, self.vault).retire(days)
        log.info("retention.purged", older_than_days=days, **counts)
        return counts
