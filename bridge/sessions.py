"""Order sessions: open one per order, hand out a pool number, close it."""

from __future__ import annotations

import uuid

import asyncpg
import structlog

from bridge.phone import InvalidNumber, mask, normalize
from bridge.store import Store
from bridge.store.queries import PairTaken, SessionRow

log = structlog.get_logger(__name__)


class SessionError(Exception):
    """Base of the errors the order system can cause; `code` is stable and machine-readable."""

    code = "session_error"
    http_status = 400


class InvalidInput(SessionError):
    code = "invalid_input"
    http_status = 422


class PoolExhausted(SessionError):
    code = "pool_exhausted"
    http_status = 409


class SessionNotFound(SessionError):
    code = "session_not_found"
    http_status = 404


class Sessions:
    def __init__(self, store: Store, default_region: str = "RU") -> None:
        self.store = store
        self.default_region = default_region

    def _number(self, field: str, raw: object) -> str:
        if not isinstance(raw, str):
            raise InvalidInput(f"{field} must be a string holding a phone number")
        try:
            return normalize(raw, self.default_region)
        except InvalidNumber as exc:
            raise InvalidInput(f"{field} is not a valid phone number: {exc}") from None

    async def open(self, order_id: object, courier_number: object, client_number: object) -> tuple[SessionRow, bool]:
        """Open the order's session, or return the one already open. Returns (session, created)."""
        if not isinstance(order_id, str) or not 1 <= len(order_id) <= 200:
            raise InvalidInput("order_id must be a string of 1 to 200 characters")
        courier = self._number("courier_number", courier_number)
        client = self._number("client_number", client_number)
        if courier == client:
            raise InvalidInput("courier_number and client_number are the same number")
        for _attempt in range(20):
            existing = await self.store.open_session_for_order(order_id)
            if existing is not None:
                return existing, False
            candidates = await self.store.free_pool_numbers([courier, client])
            if not candidates:
                raise PoolExhausted(
                    "no pool number is free for both participants: add pool numbers or close sessions"
                )
            try:
                session = await self.store.insert_session(order_id, candidates[0], courier, client)
            except (PairTaken, asyncpg.UniqueViolationError):
                continue  # a racing open took it: look again
            log.info(
                "session.opened",
                session_id=str(session.id),
                pool_number=session.pool_number,
                courier=mask(courier),
                client=mask(client),
            )
            return session, True
        raise PoolExhausted("could not allocate a pool number under contention; try again")

    async def get(self, session_id: uuid.UUID) -> SessionRow:
        session = await self.store.get_session(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id}")
        return session

    async def close(self, session_id: uuid.UUID) -> SessionRow:
        session = await self.store.close_session(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id}")
        log.info("session.closed", session_id=str(session_id))
        return session
