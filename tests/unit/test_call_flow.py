"""The call flow (bridge/calls) end to end against a scripted ARI fake.

The real StasisDispatcher, MaskedCall, AriClient and EventStream talk HTTP and websocket to
tests/unit/ari_fake.py; the store is an in-memory fake that keeps the call rows the way the
SQL in bridge/store/queries.py does. Every wait is on a condition with a timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import sys
import time
import types
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
import structlog
from structlog.testing import capture_logs

from ari_fake import AriFake, Bridge
from bridge.ari import AriClient, AriError, AriNotFound, EventStream
from bridge import metrics
from bridge.calls import flow, outcomes, stasis
from bridge.calls.events import WANTED_EVENTS, Answered, Hangup, read
from bridge.calls.flow import CUT_CAUSE_TO_CALLER, FlowSettings, MaskedCall
from bridge.calls.stasis import StasisDispatcher
from bridge.sessions import Route
from bridge.store.queries import NewCall
from bridge.terms import Terms

APP = "maskbridge"
CALLER = "+79161234567"  # a courier's real number
CALLEE = "+79261112233"  # the client's real number
POOL = "+74950001122"  # the pool number both of them see
# The national significant digits: no form of a real number may show them in full.
REAL_DIGITS = ("9161234567", "9261112233")

FAST = FlowSettings(ring_timeout=30.0, stasis_start_timeout=2.0, announcement_timeout=5.0)
WAIT = 10.0  # only a guard against hangs: every wait ends on its condition

OUTCOMES = set(outcomes.OUTCOMES)
STATES = set(outcomes.STATES)


# --- the store ------------------------------------------------------------------------


def _call_terms(terms: Terms | None) -> dict[str, Any]:
    """The session terms a call row keeps, a column each (as bridge/store/queries.py writes them)."""
    kept = (terms or Terms()).on_call_row()
    return {name: value if value is not None else Terms.unset(name) for name, value in kept.items()}


class FakeStore:
    """The CallStore protocol of bridge/calls/flow.py plus active_calls(), in memory.

    Updates follow the SQL in queries.py (connected/announcing/ended leave an ended row
    alone); every call is recorded in `ops`, applied or not.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.closed_sessions: dict[tuple[str, str], uuid.UUID] = {}
        self.lookups: list[tuple[str, str]] = []
        self.pool_numbers: set[str] = {POOL}
        self.rows: dict[uuid.UUID, dict[str, Any]] = {}
        self.recordings: dict[uuid.UUID, dict[str, Any]] = {}  # call id -> its recording
        self.states: dict[uuid.UUID, list[str]] = {}
        self.ops: list[tuple[str, uuid.UUID | None, dict[str, Any]]] = []
        self.route_gate: asyncio.Event | None = None
        self.route_error: Exception | None = None  # raised once by route (nothing written)
        self.full = False  # every session at its cap when the call is put through (call_put_through answers False)
        self.order_codes: dict[tuple[str, str], Route] = {}  # (pool, code) -> route, for its caller
        self.code_callers: dict[tuple[str, str], str] = {}  # (pool, code) -> the caller it routes
        self.wrong_codes: list[tuple[str, str]] = []  # (caller, pool) of every wrong code
        self.lockout_after = 3
        self.code_gate: asyncio.Event | None = None  # holds route_by_code until set
        self.active_calls_error: Exception | None = None  # raised once by active_calls
        self.active_calls_gate: asyncio.Event | None = None  # the next active_calls (not failing) waits for it
        self.active_calls_errors: list[Exception] = []  # then raised by the next active_calls, one each
        self.recording_started_error: Exception | None = None  # raised once by recording_started
        self.call_ended_errors: list[Exception] = []  # raised by the next call_ended, one each
        self.call_ended_gate: asyncio.Event | None = None  # the next call_ended waits for it
        # call id -> the end another writer commits just before this process's call_ended (a
        # killed process's statement that Postgres held behind a lock)
        self.ended_meanwhile: dict[uuid.UUID, dict[str, Any]] = {}
        self.languages: dict[str, str] = {}  # pool number -> its announcement language
        self.blocked: set[uuid.UUID] = set()  # participants blocked (cut_departed reads them)
        self.departed: dict[uuid.UUID, str] = {}  # participant -> why it left its order
        self.blocklist = types.SimpleNamespace(blocked_among=self._blocked_among)
        self.sessions = types.SimpleNamespace(left_among=self._left_among)
        self._changed = asyncio.Condition()

    async def _blocked_among(self, ids: set[uuid.UUID]) -> set[uuid.UUID]:
        return ids & self.blocked

    async def _left_among(self, ids: set[uuid.UUID]) -> dict[uuid.UUID, str]:
        return {pid: why for pid, why in self.departed.items() if pid in ids}

    def add_route(self, caller: str, pool: str, callee: str, role: str = "courier") -> Route:
        route = Route(
            "connect",
            session_id=uuid.uuid4(),
            caller_role=role,
            caller_participant_id=uuid.uuid4(),
            callee_role="client" if role == "courier" else "courier",
            callee_participant_id=uuid.uuid4(),
            callee_number=callee,
            shown_number=pool,
        )
        self.routes[(caller, pool)] = route
        return route

    async def _op(self, name: str, call_id: uuid.UUID | None, **args: Any) -> None:
        self.ops.append((name, call_id, args))
        async with self._changed:
            self._changed.notify_all()

    def _set_state(self, call_id: uuid.UUID, state: str) -> None:
        assert state in STATES
        self.rows[call_id]["state"] = state
        self.states[call_id].append(state)

    # CallStore

    async def block_by_client(self, session_id: uuid.UUID, participant_id: uuid.UUID, by: uuid.UUID) -> None:
        await self._op("block_by_client", None, session_id=session_id, participant_id=participant_id, by=by)

    async def route(self, caller: str, pool_number: str, record: NewCall | None = None) -> Route:
        """The Router protocol (bridge.sessions.Sessions.route in the bridge): with `record`,
        the call's row is written by the lookup, naming the session and caller it found."""
        self.lookups.append((caller, pool_number))
        await self._op("route", None, caller=caller, pool_number=pool_number)
        if self.route_gate is not None:
            await self.route_gate.wait()
        error, self.route_error = self.route_error, None
        if error is not None:
            raise error
        route = self._route(caller, pool_number)
        if record is not None:
            known = pool_number in self.pool_numbers or any(p == pool_number for _c, p in self.routes)
            await self.insert_call(
                record.id, session_id=route.session_id, pool_number=pool_number if known else record.pool_masked,
                caller_role=route.caller_role, caller_masked=record.caller_masked,
                inbound_channel_id=record.inbound_channel_id, state="routing",
                caller_participant_id=route.caller_participant_id, callee_role=None, callee_participant_id=None,
                terms=None,
            )
        return route

    def _route(self, caller: str, pool_number: str) -> Route:
        if (caller, pool_number) in self.closed_sessions:
            return Route("finished", session_id=self.closed_sessions[(caller, pool_number)], caller_role="courier")
        if any(pool == pool_number for pool, _code in self.order_codes):
            locked = self.wrong_codes.count((caller, pool_number)) >= self.lockout_after
            return Route("locked_out" if locked else "order_code",
                         known_caller=caller in self.code_callers.values())
        return self.routes.get((caller, pool_number), Route("unknown", pool_known=pool_number in self.pool_numbers))

    async def route_by_code(self, caller: str, pool_number: str, order_code: str) -> Route:
        """The Router protocol: a code keyed on an order-code number."""
        await self._op("route_by_code", None, caller=caller, pool_number=pool_number, order_code=order_code)
        if self.code_gate is not None:
            await self.code_gate.wait()
        route = self.order_codes.get((pool_number, order_code))
        if route is not None and self.code_callers[(pool_number, order_code)] == caller:
            return route
        self.wrong_codes.append((caller, pool_number))
        locked = self.wrong_codes.count((caller, pool_number)) >= self.lockout_after
        return Route("locked_out" if locked else "wrong_code")

    def add_order_code(self, caller: str, pool: str, code: str, callee: str) -> Route:
        route = Route(
            "connect", session_id=uuid.uuid4(), caller_role="courier", caller_participant_id=uuid.uuid4(),
            callee_role="client", callee_participant_id=uuid.uuid4(), callee_number=callee, shown_number=pool,
        )
        self.order_codes[(pool, code)] = route
        self.code_callers[(pool, code)] = caller
        return route

    async def insert_call(self, call_id: uuid.UUID, **fields: Any) -> bool:
        assert call_id not in self.rows
        fields = {"caller_participant_id": None, "callee_role": None, "callee_participant_id": None, "terms": None,
                  **fields}
        assert set(fields) == {
            "session_id", "pool_number", "caller_role", "caller_masked", "inbound_channel_id", "state",
            "caller_participant_id", "callee_role", "callee_participant_id", "terms",
        }
        assert fields["pool_number"] and fields["caller_masked"] and fields["inbound_channel_id"]
        self.rows[call_id] = {
            "id": call_id,
            **fields,
            **_call_terms(fields["terms"]),  # as the store keeps them: a column each
            "outcome": None,
            "hangup_by": None,
            "hangup_cause": None,
            "outbound_channel_id": None,
            "bridge_id": None,
            "started_at": datetime.now(timezone.utc),
            "answered_at": None,
            "ended_at": None,
        }
        self.states[call_id] = [fields["state"]]
        await self._op("insert_call", call_id, **fields)
        return True

    async def call_put_through(self, call_id: uuid.UUID, **fields: Any) -> bool:
        """As Store.call_put_through: who is rung (unless the session is at its cap: `full`),
        the other leg and bridge, and state ringing."""
        assert set(fields) == {
            "session_id", "caller_role", "caller_participant_id", "callee_role", "callee_participant_id", "terms",
            "outbound_channel_id", "bridge_id",
        }
        admitted = not (self.full and fields["callee_role"] is not None)
        if not admitted:
            fields = {**fields, "callee_role": None, "callee_participant_id": None}
        row = self.rows[call_id]
        if row["state"] != "ended":
            row.update(fields, **_call_terms(fields["terms"]))
            if fields["callee_role"] is not None:
                self._set_state(call_id, "ringing")
        await self._op("call_put_through", call_id, **fields)
        return admitted

    async def call_connected(self, call_id: uuid.UUID) -> None:
        row = self.rows[call_id]
        if row["state"] != "ended":
            row["answered_at"] = datetime.now(timezone.utc)
            self._set_state(call_id, "connected")
        await self._op("call_connected", call_id)

    async def call_confirming(self, call_id: uuid.UUID) -> None:
        if self.rows[call_id]["state"] != "ended":
            self._set_state(call_id, "confirming")
        await self._op("call_confirming", call_id)

    async def call_announcing(self, call_id: uuid.UUID, **fields: Any) -> None:
        assert set(fields) == {"session_id", "caller_role", "caller_participant_id"}
        if self.rows[call_id]["state"] != "ended":
            self.rows[call_id].update(fields)
            self._set_state(call_id, "announcing")
        await self._op("call_announcing", call_id, **fields)

    async def recording_started(self, call_id: uuid.UUID, name: str, fmt: str) -> uuid.UUID:
        error, self.recording_started_error = self.recording_started_error, None
        if error is not None:
            await self._op("recording_started", call_id, recording=name, fmt=fmt, failed=True)
            raise error
        assert call_id not in self.recordings, "one recording row per call"
        recording_id = uuid.uuid4()
        self.recordings[call_id] = {"id": recording_id, "name": name, "format": fmt, "duration_ms": None,
                                    "bytes": None}
        await self._op("recording_started", call_id, recording=name, fmt=fmt)
        return recording_id

    async def recording_finished(self, call_id: uuid.UUID, duration_ms: int | None, size: int | None) -> None:
        self.recordings[call_id].update(duration_ms=duration_ms, bytes=size)
        await self._op("recording_finished", call_id, duration_ms=duration_ms, size=size)

    async def recording_discarded(self, call_id: uuid.UUID) -> None:
        self.recordings.pop(call_id, None)
        await self._op("recording_discarded", call_id)

    async def pool_language(self, number: str) -> str | None:
        return self.languages.get(number)
    async def ended_calls(self, call_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        return {i for i in call_ids if i in self.rows and self.rows[i]["state"] == "ended"}

    async def call_entering_code(self, call_id: uuid.UUID) -> None:
        if self.rows[call_id]["state"] != "ended":
            self._set_state(call_id, "entering_code")
        await self._op("call_entering_code", call_id)

    async def call_ended(
        self, call_id: uuid.UUID, outcome: str, hangup_by: str, cause: int | None, cut_reason: str | None = None,
        *, rung: bool = True, ended_at: datetime | None = None, unanswered: bool = False,
    ) -> bool:
        assert outcome in OUTCOMES, outcome
        assert hangup_by in {"caller", "callee", "system"}, hangup_by
        if call_id in self.ended_meanwhile:
            self.rows[call_id].update(self.ended_meanwhile.pop(call_id))
            self._set_state(call_id, "ended")
        if self.call_ended_gate is not None:
            gate, self.call_ended_gate = self.call_ended_gate, None
            await self._op("call_ended", call_id, outcome=outcome, hangup_by=hangup_by, cause=cause, waiting=True)
            await gate.wait()
        if self.call_ended_errors:
            await self._op("call_ended", call_id, outcome=outcome, hangup_by=hangup_by, cause=cause, failed=True,
                           ended_at=ended_at)
            raise self.call_ended_errors.pop(0)
        row = self.rows[call_id]
        ended = row["state"] != "ended"
        if ended:
            row.update(outcome=outcome, hangup_by=hangup_by, hangup_cause=cause, cut_reason=cut_reason,
                       ended_at=ended_at or datetime.now(timezone.utc), ended_at_given=ended_at)
            if not rung:  # (as the SQL: nobody was rung, the row names no callee)
                row.update(callee_role=None, callee_participant_id=None)
            if unanswered:  # (as the SQL: the caller was never answered)
                row.update(answered_at=None)
            self._set_state(call_id, "ended")
        await self._op("call_ended", call_id, outcome=outcome, hangup_by=hangup_by, cause=cause)
        return ended

    async def active_calls(self) -> list[dict[str, Any]]:
        error, self.active_calls_error = self.active_calls_error, None
        if error is None and self.active_calls_errors:
            error = self.active_calls_errors.pop(0)
        await self._op("active_calls", None, failed=error is not None)
        if error is not None:
            raise error
        if self.active_calls_gate is not None:
            gate, self.active_calls_gate = self.active_calls_gate, None
            await self._op("active_calls", None, waiting=True)
            await gate.wait()
        rows = [dict(r) for r in self.rows.values() if r["state"] != "ended"]
        return sorted(rows, key=lambda r: r["started_at"])

    # test helpers

    def add_row(self, **fields: Any) -> dict[str, Any]:
        """A call row left behind by an earlier bridge process."""
        call_id = fields.pop("id", None) or uuid.uuid4()
        row = {
            "id": call_id,
            "session_id": uuid.uuid4(),
            "pool_number": POOL,
            "caller_role": "courier",
            "caller_masked": "+***67",
            "inbound_channel_id": "",
            "outbound_channel_id": None,
            "bridge_id": None,
            "state": "ringing",
            "outcome": None,
            "hangup_by": None,
            "hangup_cause": None,
            "started_at": datetime.now(timezone.utc),
            "answered_at": None,
            "ended_at": None,
            **_call_terms(None),
            **fields,
        }
        self.rows[call_id] = row
        self.states[call_id] = [row["state"]]
        return row

    def calls_of(self, name: str, call_id: uuid.UUID) -> list[dict[str, Any]]:
        return [args for op, cid, args in self.ops if op == name and cid == call_id]

    async def wait(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        async with self._changed:
            try:
                return await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"store: timed out after {timeout}s waiting for {what}; ops={self.ops}") from None

    def _row_of(self, inbound_id: str) -> dict[str, Any] | None:
        for row in self.rows.values():
            if row["inbound_channel_id"] == inbound_id:
                return row
        return None

    async def row(self, inbound_id: str) -> dict[str, Any]:
        return await self.wait(lambda: self._row_of(inbound_id), f"the call of {inbound_id}")

    async def state(self, inbound_id: str, state: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            row = self._row_of(inbound_id)
            return row if row is not None and state in self.states[row["id"]] else None

        return await self.wait(reached, f"the call of {inbound_id} to be {state}")

    async def ended(self, inbound_id: str) -> dict[str, Any]:
        return await self.state(inbound_id, "ended")


# --- the harness ----------------------------------------------------------------------


class Harness:
    """Fake ARI + real AriClient/EventStream/StasisDispatcher + fake store."""

    def __init__(self, settings: FlowSettings) -> None:
        self.settings = settings
        self.fake = AriFake(app=APP, user="bridge", password="secret")
        self.store = FakeStore()
        self.task: asyncio.Task[None] | None = None
        self.handled: list[dict[str, Any]] = []  # events the dispatcher has been given
        self._handled_changed = asyncio.Condition()

    async def _handle(self, event: dict[str, Any]) -> None:
        await self.dispatcher.handle(event)
        self.handled.append(event)
        async with self._handled_changed:
            self._handled_changed.notify_all()

    async def handled_event(self, kind: str, channel_id: str, timeout: float = WAIT) -> dict[str, Any]:
        """Until the dispatcher has been handed this event."""

        def seen() -> Any:
            for event in self.handled:
                if event.get("type") == kind and (event.get("channel") or {}).get("id") == channel_id:
                    return event
            return None

        async with self._handled_changed:
            try:
                return await asyncio.wait_for(self._handled_changed.wait_for(seen), timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"timed out waiting for {kind} of {channel_id} to be handled") from None

    async def handled_playback_finished(self, playback_id: str, timeout: float = WAIT) -> None:
        """Until the dispatcher has been handed the end of this playback."""

        def seen() -> bool:
            return any(e.get("type") == "PlaybackFinished" and e["playback"]["id"] == playback_id
                       for e in self.handled)

        async with self._handled_changed:
            try:
                await asyncio.wait_for(self._handled_changed.wait_for(seen), timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"timed out waiting for the end of {playback_id} to be handled") from None

    async def start(self) -> None:
        await self.fake.start()
        self.ari = AriClient(self.fake.base_url, "bridge", "secret", APP, request_timeout=5.0)
        self.dispatcher = StasisDispatcher(self.ari, self.store, self.settings, router=self.store)
        self.stream = EventStream(
            self.ari, self._handle, on_connected=self.dispatcher.reconcile, min_backoff=0.01, max_backoff=0.05,
            check_every=3600,  # (the application watch has tests of its own: test_event_stream.py)
            event_types=WANTED_EVENTS,  # as the bridge asks: every flow here works on these events alone
        )
        self.task = asyncio.create_task(self.stream.run(), name="test-ari-events")
        await self.fake.wait_connected(1)
        # The first reconcile has asked the store (events are read once it is done).
        await self.store.wait(lambda: any(op == "active_calls" for op, _, _ in self.store.ops), "reconcile")

    async def caught_up(self, timeout: float = WAIT) -> None:
        """Until the catch-up after a reconcile the database failed has finished."""
        task = self.dispatcher._catching_up
        assert task is not None, "no catch-up was started"
        await asyncio.wait_for(asyncio.shield(task), timeout)

    def left_behind_talking(self, inbound_id: str) -> tuple[uuid.UUID, str]:
        """A call an earlier process left connected: its row, both legs up in the application
        and in its bridge (before start()). Returns (call id, outbound id)."""
        call_id = uuid.uuid4()
        outbound = f"{call_id}-callee"
        self.store.add_row(id=call_id, state="connected", inbound_channel_id=inbound_id, outbound_channel_id=outbound,
                           bridge_id=str(call_id), answered_at=datetime.now(timezone.utc))
        self.fake.add_channel(inbound_id, CALLER, POOL, state="Up", args=["inbound", POOL])
        self.fake.add_channel(outbound, POOL, "s", state="Up", args=["outbound", str(call_id)])
        self.fake.bridges[str(call_id)] = Bridge(str(call_id), channels=[inbound_id, outbound])
        return call_id, outbound

    async def settle(self, timeout: float = WAIT) -> None:
        """Until every call task has finished (bridge destroyed, channels unregistered)."""
        tasks = list(self.dispatcher._tasks)
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            assert not pending, f"call tasks still running: {pending}"
            for task in done:
                assert task.exception() is None, task.exception()
        assert not self.dispatcher.calls, self.dispatcher.calls

    async def close(self) -> None:
        if self.task is not None:
            self.stream.stop()
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await self.dispatcher.shutdown()
            await self.ari.close()
        await self.fake.stop()

    def requests_text(self) -> str:
        return "\n".join(r.text() for r in self.fake.requests)

    async def ringing_call(self, inbound_id: str = "in-1") -> tuple[dict[str, Any], str]:
        """A routed call whose outbound leg has been dialed. Returns (row, outbound id)."""
        if (CALLER, POOL) not in self.store.routes:
            self.store.add_route(CALLER, POOL, CALLEE)
        await self.fake.inbound_call(inbound_id, CALLER, POOL)
        create = await self.fake.wait_request("POST", "/ari/channels/create")
        outbound = create.query["channelId"]
        await self.fake.wait_request("POST", f"/ari/channels/{outbound}/dial")
        return await self.store.state(inbound_id, "ringing"), outbound

    async def connected_call(self, inbound_id: str = "in-1") -> tuple[dict[str, Any], str]:
        row, outbound = await self.ringing_call(inbound_id)
        await self.fake.answer(outbound)
        await self.fake.wait_request("POST", f"/ari/channels/{inbound_id}/answer")
        return await self.store.state(inbound_id, "connected"), outbound


@pytest.fixture(autouse=True)
def logs():
    """Every log event of every test; none may carry a real number in full."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as entries:
        yield entries
    leaks = [e for e in entries if any(d in repr(e) for d in REAL_DIGITS)]
    assert not leaks, f"real numbers in logs: {leaks}"


@pytest.fixture
async def harness():
    made: list[Harness] = []

    async def make(settings: FlowSettings = FAST, start: bool = True) -> Harness:
        h = Harness(settings)
        made.append(h)
        if start:
            await h.start()
        return h

    yield make
    for h in made:
        await h.close()
        # Whatever the test did: the caller's real number never went to Asterisk.
        assert REAL_DIGITS[0] not in h.requests_text()


@pytest.fixture
async def h(harness) -> Harness:
    return await harness()


# --- the fake itself ------------------------------------------------------------------


async def test_fake_answers_404_for_unknown_channels_and_bridges(h: Harness) -> None:
    for attempt in (
        h.ari.hangup("no-such-channel"),
        h.ari.answer("no-such-channel"),
        h.ari.ring("no-such-channel"),
        h.ari.dial("no-such-channel", timeout=5),
        h.ari.set_variable("no-such-channel", "X", "1"),
        h.ari.play("no-such-channel", "sound:beep", "pb-1"),
        h.ari.add_to_bridge("no-such-bridge", "no-such-channel"),
        h.ari.destroy_bridge("no-such-bridge"),
    ):
        with pytest.raises(AriNotFound):
            await attempt
    assert (await h.ari.application())["channel_ids"] == []


async def test_fake_hangup_by_request_emits_asterisk_events_with_the_cause(h: Harness) -> None:
    await h.ari.create_channel("PJSIP/+70000000000@trunk", "leg-1", ["outbound", "x"], {"CALLERID(num)": POOL})
    assert (await h.ari.application())["channel_ids"] == ["leg-1"]
    with pytest.raises(AriError) as bad:
        await h.ari.hangup("leg-1", "not-a-reason")
    assert bad.value.status == 400
    mark = len(h.fake.sent_events)

    await h.ari.hangup("leg-1", "busy")
    sent = h.fake.sent_events[mark:]
    # (As Asterisk: the request is soft, its cause the reason EXPLICIT; the channel's end
    # carries the cause asked for.)
    assert [(e["type"], e.get("cause"), e.get("soft")) for e in sent] == [
        ("ChannelHangupRequest", 32, True),
        ("StasisEnd", None, None),
        ("ChannelDestroyed", 17, None),
    ]
    assert all(e["channel"]["id"] == "leg-1" and e["application"] == APP for e in sent)
    assert (await h.ari.application())["channel_ids"] == []


# --- routed calls ---------------------------------------------------------------------


async def test_routed_call_outbound_leg_shows_only_the_pool_number(h: Harness) -> None:
    h.store.add_route(CALLER, POOL, CALLEE)
    await h.fake.inbound_call("in-1", CALLER, POOL)

    create = await h.fake.wait_request("POST", "/ari/channels/create")
    outbound = create.query["channelId"]
    row = await h.store.row("in-1")
    assert create.query["endpoint"] == f"PJSIP/{CALLEE}@trunk"
    assert create.query["app"] == APP
    assert create.query["appArgs"] == f"outbound,{row['id']}"
    assert "originator" not in create.query
    assert create.body == {
        "variables": {
            "CALLERID(num)": POOL,
            "CALLERID(name)": POOL,
            "CONNECTEDLINE(num)": POOL,
            "CONNECTEDLINE(name)": POOL,
            # Every later update of the other side's identity is rewritten to the pool
            # number before Asterisk sends it on this leg (extensions.conf, [mb-identity]).
            "MASK_NUMBER": POOL,
            "CONNECTED_LINE_SEND_SUB": "mb-identity,connected,1",
            "REDIRECTING_SEND_SUB": "mb-identity,redirecting,1",
        }
    }
    dial = await h.fake.wait_request("POST", f"/ari/channels/{outbound}/dial")
    assert "caller" not in dial.query
    assert set(dial.query) == {"timeout"}

    # The caller's leg was masked by the dialplan before Stasis; once the other phone's
    # INVITE has left, its caller ID (the caller's real number) is replaced by the pool
    # number: nothing of the caller's identity stays on any channel of the bridge.
    await h.fake.wait_request("POST", "/ari/channels/in-1/variable")
    assert h.fake.channels["in-1"].variables == {"CALLERID(all)": f'"{POOL}" <{POOL}>'}
    creation = h.fake.find("POST", "/ari/channels/create")[0].index
    assert h.fake.find("POST", "/ari/channels/in-1/variable")[0].index > creation
    assert h.fake.find("POST", "/ari/channels/in-1/variable")[0].index > dial.index  # (not on the setup's way)

    bridge_id = str(row["id"])
    adds = h.fake.find("POST", f"/ari/bridges/{bridge_id}/addChannel")
    # Both legs in one request, before the other phone is dialed.
    assert [a.query["channel"] for a in adds] == [f"in-1,{outbound}"]
    assert adds[0].index < dial.index
    assert all(a.query["inhibitConnectedLineUpdates"] == "true" for a in adds)
    assert h.fake.bridges[bridge_id].channels == ["in-1", outbound]

    # Nothing that reached Asterisk carries the caller's real number, in any form.
    assert REAL_DIGITS[0] not in h.requests_text()
    assert row["caller_masked"] == "+***67"
    assert row["session_id"] == h.store.routes[(CALLER, POOL)].session_id
    assert row["caller_role"] == "courier"

    await h.fake.hangup("in-1")
    await h.store.ended("in-1")
    await h.settle()


async def test_an_end_the_database_did_not_take_is_written_once_it_does(h: Harness, monkeypatch) -> None:
    """The database stalls as the call ends: the row is written when it answers again (not left
    saying the call goes on until a bridge reconnects to Asterisk), with the moment it ended."""
    monkeypatch.setattr(flow, "LATE_WRITE_FIRST_WAIT", 0.01)
    row, outbound = await h.ringing_call()
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    await h.store.state("in-1", "connected")
    h.store.call_ended_errors = [TimeoutError(), asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
                                 asyncpg.QueryCanceledError("canceling statement due to statement timeout")]
    ended = datetime.now(timezone.utc)

    await h.fake.hangup("in-1", 16)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "caller", 16)
    attempts = h.store.calls_of("call_ended", row["id"])
    assert len(attempts) == 4
    assert [a.get("failed", False) for a in attempts] == [True, True, True, False]
    # Sent again with the moment it ended (here Asterisk's, of the hangup), not when it got through.
    assert attempts[0]["ended_at"] is not None and attempts[1]["ended_at"] == attempts[0]["ended_at"]
    assert abs(attempts[1]["ended_at"] - ended) < timedelta(seconds=1)
    assert row["ended_at_given"] == attempts[1]["ended_at"]
    await h.settle()
    assert h.fake.channels == {} and h.fake.bridges == {}


async def test_a_reconcile_leaves_an_end_still_to_be_written_alone(h: Harness, monkeypatch) -> None:
    """The event stream reconnects while the database still refuses a call's end: the reconcile
    does not finish the row as the system's (it is the caller's, and is written once it can)."""
    monkeypatch.setattr(flow, "LATE_WRITE_FIRST_WAIT", 0.01)
    monkeypatch.setattr(flow, "LATE_WRITE_LONGEST_WAIT", 0.02)
    row, outbound = await h.connected_call()
    h.store.call_ended_errors = [TimeoutError()] * 1000
    await h.fake.hangup("in-1", 16)
    await h.store.wait(lambda: len(h.store.calls_of("call_ended", row["id"])) >= 3, "the end sent again")
    mark = h.fake.mark()
    await h.fake.drop(refuse=False)
    await h.fake.wait_connected(2)
    await h.fake.wait_request("GET", f"/ari/applications/{APP}", since=mark)
    await h.store.wait(lambda: sum(op == "active_calls" for op, _, _ in h.store.ops) >= 2, "the second reconcile")
    assert {a["hangup_by"] for a in h.store.calls_of("call_ended", row["id"])} == {"caller"}
    h.store.call_ended_errors = []
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "caller", 16)
    assert not flow.ends_pending()


async def pending_end(h: Harness) -> dict[str, Any]:
    """A connected call the caller hangs up while the database refuses its end."""
    row, _outbound = await h.connected_call()
    h.store.call_ended_errors = [asyncpg.QueryCanceledError("canceling statement due to user request")]
    await h.fake.hangup("in-1", 16)
    async with asyncio.timeout(WAIT):
        while row["id"] not in flow.ends_pending():
            await asyncio.sleep(0.01)  # wait-ok: polling for the end's write to be put off
    return row


async def test_the_bridges_stop_sends_the_ends_still_to_be_written_once_more(h: Harness, monkeypatch) -> None:
    monkeypatch.setattr(flow, "LATE_WRITE_FIRST_WAIT", 60.0)  # (its next try would come long after)
    row = await pending_end(h)
    with capture_logs() as logs:
        await h.dispatcher.shutdown()
    row = h.store.rows[row["id"]]
    assert (row["state"], row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("ended", "answered", "caller", 16)
    assert not flow.ends_pending()
    assert [(e["written"], e["lost"]) for e in logs if e["event"] == "call.ends_at_stop"] == [(1, 0)]


async def test_the_bridges_stop_sends_an_end_whose_first_write_it_cut_short_once_more(h: Harness) -> None:
    """The stop comes while a call's end waits on the database the first time (adversary,
    issue 14: it was lost, and the next bridge wrote the call as the system's)."""
    row, _outbound = await h.connected_call()
    h.store.call_ended_gate = asyncio.Event()  # (never set: the database does not answer)
    await h.fake.hangup("in-1", 16)
    await h.store.wait(lambda: any(a.get("waiting") for a in h.store.calls_of("call_ended", row["id"])),
                       "the end waiting on the database")
    with capture_logs() as logs:
        await h.dispatcher.shutdown()
    row = h.store.rows[row["id"]]
    assert (row["state"], row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("ended", "answered", "caller", 16)
    assert [(e["written"], e["lost"]) for e in logs if e["event"] == "call.ends_at_stop"] == [(1, 0)]


async def test_an_end_the_database_still_refuses_at_the_stop_is_left_to_the_next_bridge(
        h: Harness, monkeypatch) -> None:
    monkeypatch.setattr(flow, "LATE_WRITE_FIRST_WAIT", 60.0)
    monkeypatch.setattr(flow, "LATE_WRITE_LAST_TRY", 0.2)
    row = await pending_end(h)
    h.store.call_ended_errors = [TimeoutError()]
    with capture_logs() as logs:
        await h.dispatcher.shutdown()
    assert h.store.rows[row["id"]]["state"] == "connected"  # (the next bridge's reconcile finishes it)
    stop = [e for e in logs if e["event"] == "call.ends_at_stop"]
    assert [(e["written"], e["lost"], e["call_ids"]) for e in stop] == [(0, 1, [str(row["id"])])]
    assert not flow.ends_pending()


async def test_an_end_the_database_refuses_is_not_sent_again(h: Harness, monkeypatch) -> None:
    monkeypatch.setattr(flow, "LATE_WRITE_FIRST_WAIT", 0.01)
    row, outbound = await h.ringing_call()
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    await h.store.state("in-1", "connected")
    h.store.call_ended_errors = [asyncpg.exceptions.CheckViolationError("no")]
    await h.fake.hangup("in-1", 16)
    await h.settle()
    assert len(h.store.calls_of("call_ended", row["id"])) == 1  # a statement that failed fails again
    assert h.fake.channels == {} and h.fake.bridges == {}


async def test_callee_answer_answers_caller_and_caller_hangup_ends_call(h: Harness) -> None:
    row, outbound = await h.ringing_call()
    # Not answered while the other phone rings: the caller hears it ring.
    assert h.fake.find("POST", "/ari/channels/in-1/answer") == []

    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    await h.store.state("in-1", "connected")
    mark = h.fake.mark()

    await h.fake.hangup("in-1", 16)
    delete = await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}", since=mark)
    assert delete.query["reason"] == "normal"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "caller", 16)
    assert row["answered_at"] is not None
    assert h.store.states[row["id"]] == ["routing", "ringing", "connected", "ended"]
    assert len(h.store.calls_of("call_ended", row["id"])) == 1

    await h.settle()
    await h.fake.wait_request("DELETE", f"/ari/bridges/{row['id']}")
    assert h.fake.channels == {} and h.fake.bridges == {}


@pytest.mark.parametrize("status, message", [(500, "Failed to answer channel"), (404, "Channel not found")])
async def test_a_caller_leaving_as_the_other_phone_answers_ends_as_cancelled(h: Harness, status, message) -> None:
    """The caller's hangup crosses the other phone's answer: Asterisk reports the answer
    first, then refuses to answer the caller's leg, whose hangup is pending (500), or gone
    (404). The caller never heard the other phone: the call ends as the caller's cancel, by
    the caller, with no answer time, the other phone hung up; not as an answered call of no
    length, nor as a failure of the bridge. (It happened in a `make test` run: the live test
    of an answer after the caller left read 'answered'.)"""
    row, outbound = await h.ringing_call()
    mark = h.fake.mark()
    h.fake.fail("POST", "/ari/channels/in-1/answer", status, message)
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    await h.fake.hangup("in-1", 16)
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["answered_at"]) == ("caller_cancelled", "caller", None)
    assert h.fake.find("DELETE", f"/ari/channels/{outbound}", since=mark)


async def test_a_caller_asterisk_answered_before_its_hangup_counts_as_answered(h: Harness) -> None:
    """With both legs in the bridge, Asterisk's core answers the caller as soon as the other
    phone answers: the caller got its 200 OK, then hung up within milliseconds, and the
    bridge's own answer request is refused (a hangup pending). The caller was connected: the
    call is answered, by the caller (as the wire says; the carrier bills it so)."""
    row, outbound = await h.ringing_call()
    h.fake.fail("POST", "/ari/channels/in-1/answer", 500, "Failed to answer channel")
    await h.fake.answer(outbound)
    await h.fake.answer("in-1")  # (Asterisk's ChannelStateChange: the caller's leg is Up)
    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    await h.fake.hangup("in-1", 16)
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "caller", 16)
    assert row["answered_at"] is not None


async def test_a_caller_leg_that_refuses_its_answer_and_stays_is_connected_all_the_same(
        h: Harness, monkeypatch) -> None:
    """No caller hangup follows the refused answer (a 500 for another reason): the call is a
    connected one, as before (here the other phone's hangup ends it as answered)."""
    monkeypatch.setattr(flow, "CALLER_GONE_SECONDS", 0.2)
    row, outbound = await h.ringing_call()
    h.fake.fail("POST", "/ari/channels/in-1/answer", 500, "Failed to answer channel")
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    mark = h.fake.mark()
    await h.fake.hangup(outbound, 16)  # (later: handled by the connected call)
    await h.fake.wait_request("DELETE", "/ari/channels/in-1", since=mark)
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "callee", 16)
    assert row["answered_at"] is not None


async def test_callee_hangup_first_hangs_up_caller(h: Harness) -> None:
    row, outbound = await h.connected_call()
    mark = h.fake.mark()

    await h.fake.hangup(outbound, 16)
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1", since=mark)
    assert delete.query["reason"] == "normal"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "callee", 16)
    assert len(h.store.calls_of("call_ended", row["id"])) == 1
    await h.settle()
    assert h.fake.find("DELETE", f"/ari/bridges/{row['id']}")
    assert h.fake.find("DELETE", f"/ari/channels/{outbound}") == []  # it was gone already


async def test_national_number_forms_are_normalised_before_lookup(h: Harness) -> None:
    h.store.add_route("+79161234567", "+74951234567", CALLEE)
    await h.fake.inbound_call("in-1", "89161234567", "74951234567")

    create = await h.fake.wait_request("POST", "/ari/channels/create")
    assert h.store.lookups == [("+79161234567", "+74951234567")]
    assert create.body["variables"]["CALLERID(num)"] == "+74951234567"
    row = await h.store.row("in-1")
    assert row["pool_number"] == "+74951234567"
    assert row["caller_masked"] == "+***67"

    await h.fake.hangup("in-1")
    await h.store.ended("in-1")
    await h.settle()


@pytest.mark.parametrize(
    ("cause", "outcome"),
    [(17, "busy"), (19, "no_answer"), (21, "rejected"), (27, "unreachable"), (1, "unreachable"), (34, "failed")],
)
async def test_callee_refusal_before_answer_hangs_up_caller_with_the_same_cause(
    h: Harness, cause: int, outcome: str
) -> None:
    row, outbound = await h.ringing_call()

    await h.fake.hangup(outbound, cause)
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason_code"] == str(cause) and "reason" not in delete.query
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == (outcome, "callee", cause)
    assert row["answered_at"] is None
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/in-1/answer") == []


@pytest.mark.parametrize(("cause", "outcome", "caller_cause"), [
    (23, "redirected", 20),  # a 302: not followed; the caller hears "unavailable" (480), never a 3xx
    (22, "failed", 34),  # number changed (410): no hint of the other side's number reaches the caller
    (31, "failed", 34),
    (16, "failed", 34),
])
async def test_a_refusal_the_caller_must_not_hear_as_such_is_a_plain_failure(
    h: Harness, cause: int, outcome: str, caller_cause: int
) -> None:
    row, outbound = await h.ringing_call()

    await h.fake.hangup(outbound, cause)
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason_code"] == str(caller_cause)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == (outcome, "callee", cause)
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/in-1/answer") == []


async def test_a_call_whose_leg_the_dialplan_did_not_mask_is_refused(h: Harness, logs) -> None:
    """An extensions.conf older than the bridge hands calls to Stasis without masking the
    caller's leg (no 'masked' argument): the bridge puts nobody through (fail closed), the
    caller hears that the service is unavailable and is hung up with cause 34."""
    h.store.add_route(CALLER, POOL, CALLEE)
    channel = h.fake.add_channel("in-1", CALLER, POOL, args=["inbound", POOL])
    await h.fake.send({"type": "StasisStart", "args": list(channel.args), "channel": channel.json()})
    play = await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    assert play.query["media"] == "sound:all-circuits-busy-now"
    await h.fake.finish_playback(play.path.rsplit("/", 1)[1])
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason_code"] == "34"
    await h.settle()
    assert h.store.lookups == [] and h.fake.find("POST", "/ari/channels/create") == []
    assert any(e["event"] == "call.refused_unmasked_leg" and e["log_level"] == "error" for e in logs)


# --- races ----------------------------------------------------------------------------


async def test_caller_hangup_while_ringing_cancels_outbound_leg(h: Harness) -> None:
    row, outbound = await h.ringing_call()

    await h.fake.hangup("in-1", 16)
    delete = await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    assert delete.query["reason"] == "normal"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")
    assert h.store.states[row["id"]] == ["routing", "ringing", "ended"]
    await h.settle()
    assert h.fake.find("DELETE", "/ari/channels/in-1") == []
    assert h.fake.channels == {} and h.fake.bridges == {}


async def test_callee_answer_after_caller_left_is_hung_up_not_connected(h: Harness) -> None:
    row, outbound = await h.ringing_call()

    await h.fake.hangup("in-1", 16)
    await h.fake.answer(outbound)  # the 200 OK crossed the caller's BYE

    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")
    assert h.fake.find("POST", "/ari/channels/in-1/answer") == []
    assert h.store.calls_of("call_connected", row["id"]) == []
    assert len(h.store.calls_of("call_ended", row["id"])) == 1
    assert row["answered_at"] is None


async def test_caller_hangup_before_outbound_stasis_start(h: Harness) -> None:
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.auto_stasis_start = False
    await h.fake.inbound_call("in-1", CALLER, POOL)
    create = await h.fake.wait_request("POST", "/ari/channels/create")
    outbound = create.query["channelId"]
    assert outbound in h.fake.held_stasis_starts

    await h.fake.hangup("in-1", 16)
    delete = await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    assert delete.query["reason"] == "normal"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")
    await h.settle()
    assert h.fake.find("POST", f"/ari/channels/{outbound}/dial") == []
    # Neither leg joined the bridge: both join together once the new leg is in Stasis.
    assert h.fake.find("POST", f"/ari/bridges/{row['id']}/addChannel") == []
    assert outbound not in h.fake.channels


async def test_a_caller_gone_as_both_legs_join_is_a_cancelled_call_and_the_other_phone_is_hung_up(
        h: Harness) -> None:
    """The two legs join the bridge in one request; Asterisk refuses it when one of them is
    gone (it checks every channel first). The dial went out in the same write, and ran after
    the join: the other phone is hung up at once. The flow finds out which leg is gone: the
    caller's, so the call ends as the caller's (and names the phone it rang)."""
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.fail("POST", re.compile(r"/ari/bridges/.+/addChannel"), 400, "Channel not found", times=2)
    await h.fake.inbound_call("in-1", CALLER, POOL)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")
    assert row["callee_role"] == "client", "it rang the other phone, however briefly"
    await h.settle()
    outbound = h.fake.find("POST", "/ari/channels/create")[0].query["channelId"]
    adds = h.fake.find("POST", f"/ari/bridges/{row['id']}/addChannel")
    assert [a.query["channel"] for a in adds] == [f"in-1,{outbound}", "in-1"]
    dial = h.fake.find("POST", f"/ari/channels/{outbound}/dial")
    delete = h.fake.find("DELETE", f"/ari/channels/{outbound}")
    assert len(dial) == 1 and delete and adds[0].index < dial[0].index < delete[0].index


async def test_a_refused_join_of_both_legs_is_retried_one_by_one(h: Harness) -> None:
    """A join refused for a passing reason (both legs are still there) is made one leg at a
    time, and the call rings as any other."""
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.fail("POST", re.compile(r"/ari/bridges/.+/addChannel"), 422, "Channel not in Stasis application")
    row, outbound = await h.ringing_call()
    path = f"/ari/bridges/{row['id']}/addChannel"
    first = await h.fake.wait_request("POST", path)
    second = await h.fake.wait_request("POST", path, since=first.index + 1)
    third = await h.fake.wait_request("POST", path, since=second.index + 1)
    assert [a.query["channel"] for a in (first, second, third)] == [f"in-1,{outbound}", "in-1", outbound]
    assert h.fake.bridges[str(row["id"])].channels == ["in-1", outbound]
    await h.fake.hangup("in-1")
    await h.store.ended("in-1")
    await h.settle()


async def test_a_deadline_noticed_late_waits_for_what_the_event_stream_has_not_read_yet() -> None:
    """The bridge frozen (SIGSTOP, its loop held up) past a deadline, the ring timeout say,
    while the other phone answered or refused: once it runs again, the timer and the event's
    bytes in the socket are ready at once, and the timer won (a phone that had answered was cut,
    one that refused was told no_answer: adversary finding). A deadline noticed LATE_SECONDS or
    more late waits CATCH_UP_SECONDS at most for what the stream delivers first; one noticed in
    time does not wait."""
    call = MaskedCall(uuid.uuid4(), {"id": "in-1"}, POOL, None, None, FAST,  # type: ignore[arg-type]
                      lambda _channel, _call: None)
    now = time.monotonic()
    asyncio.get_running_loop().call_later(0.2, call.feed, {"type": "ChannelStateChange",
                                                           "channel": {"id": "out-1", "state": "Up"}})
    assert await call._next(now - flow.LATE_SECONDS - 1) == Answered("out-1")
    began = time.monotonic()
    assert await call._next(now - 0.1) is None and time.monotonic() - began < 0.1, "in time: no wait"
    began = time.monotonic()
    assert await call._next(now - flow.LATE_SECONDS - 1) is None
    assert time.monotonic() - began >= flow.CATCH_UP_SECONDS, "late, and nothing came: the deadline holds"


async def test_ring_timeout_hangs_up_both_legs_with_no_answer(harness) -> None:
    h = await harness(FlowSettings(ring_timeout=0.3, stasis_start_timeout=2.0))
    row, outbound = await h.ringing_call()

    out_delete = await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    in_delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert out_delete.query["reason"] == "no_answer"
    assert in_delete.query["reason"] == "no_answer"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("no_answer", "system", 19)
    await h.settle()
    assert h.fake.channels == {} and h.fake.bridges == {}


# --- calls that are not put through ---------------------------------------------------


async def test_unknown_caller_hears_announcement_then_is_hung_up(h: Harness) -> None:
    await h.fake.inbound_call("in-1", CALLER, POOL)

    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    play = await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    assert play.query == {"media": "sound:ss-noservice", "lang": "en"}
    row = await h.store.state("in-1", "announcing")
    # The caller hears the whole announcement before being hung up.
    assert h.fake.find("DELETE", "/ari/channels/in-1") == []

    await h.fake.finish_playback(play.path.rsplit("/", 1)[1])
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason"] == "normal"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("unknown_caller", "system")
    assert row["session_id"] is None
    assert h.store.states[row["id"]] == ["routing", "announcing", "ended"]
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/create") == []
    assert h.fake.bridges == {}


async def test_caller_of_a_closed_session_hears_announcement(h: Harness) -> None:
    h.store.closed_sessions[(CALLER, POOL)] = uuid.uuid4()
    h.fake.auto_finish_playback = True
    await h.fake.inbound_call("in-1", CALLER, POOL)

    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("session_closed", "system")
    play = h.fake.find("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    assert [p.query["media"] for p in play] == ["sound:ss-noservice"]
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/create") == []


async def test_a_call_whose_session_reached_its_cap_as_its_row_was_written_is_refused(h: Harness) -> None:
    """The route lookup saw the session under its cap, but another call (on another node)
    took the last one before this call was put through: it is refused as over the cap. Its
    other leg was made meanwhile (at the same time as the row's write) but never dialed:
    nobody was rung, the leg and the bridge are gone, and the caller heard why."""
    h.store.add_route(CALLER, POOL, CALLEE)
    h.store.full = True
    h.fake.auto_finish_playback = True
    await h.fake.inbound_call("in-1", CALLER, POOL)

    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["callee_role"]) == ("call_limit", "system", None)
    await h.settle()
    outbound = [r.query["channelId"] for r in h.fake.find("POST", "/ari/channels/create")]
    assert h.fake.find("POST", re.compile(r"/ari/channels/.+/dial")) == [], "nobody was rung"
    assert all(h.fake.find("DELETE", f"/ari/channels/{leg}") for leg in outbound), "the undialed leg is hung up"
    play = h.fake.find("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    assert [p.query["media"] for p in play] == ["sound:im-sorry,sound:pls-try-call-later"]
    assert h.store.states[row["id"]] == ["routing", "announcing", "ended"]


async def test_caller_hangup_during_announcement_ends_call_by_caller(h: Harness) -> None:
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+"))

    await h.fake.hangup("in-1")
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("unknown_caller", "caller")
    await h.settle()
    assert h.fake.find("DELETE", "/ari/channels/in-1") == []


async def test_ari_failure_creating_outbound_leg_hangs_up_caller_with_congestion(h: Harness, logs) -> None:
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.fail("POST", "/ari/channels/create", status=500)
    await h.fake.inbound_call("in-1", CALLER, POOL)

    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason"] == "congestion"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("failed", "system")
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/create")[0].status == 500
    assert h.fake.find("DELETE", f"/ari/bridges/{row['id']}")
    assert h.fake.bridges == {}
    assert any(e["event"] == "call.outbound_failed" for e in logs)


async def test_outbound_leg_that_never_enters_stasis_fails_the_call(harness) -> None:
    """Nothing was dialed: the caller is told the service is unavailable (not left with
    silence, then a bare 503), and the call ends as failed, naming no callee."""
    h = await harness(FlowSettings(stasis_start_timeout=0.3))
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.auto_stasis_start = False
    h.fake.auto_finish_playback = True
    await h.fake.inbound_call("in-1", CALLER, POOL)
    create = await h.fake.wait_request("POST", "/ari/channels/create")
    outbound = create.query["channelId"]

    in_delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert in_delete.query["reason_code"] == "34"  # no circuit/channel available
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    play = h.fake.find("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    assert [p.query["media"] for p in play] == ["sound:all-circuits-busy-now"]
    assert h.fake.find("POST", f"/ari/channels/{outbound}/dial") == []
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["callee_role"]) == ("failed", "system", None)
    await h.settle()
    assert h.fake.channels == {} and h.fake.bridges == {}


# --- the event websocket --------------------------------------------------------------


async def test_reconnect_reconcile_ends_call_whose_channel_vanished(h: Harness) -> None:
    row, outbound = await h.connected_call()
    mark = h.fake.mark()

    await h.fake.drop(refuse=True)
    await h.fake.hangup(outbound, 16)  # nobody hears it: the socket is down
    assert [e["type"] for e in h.fake.lost_events][-1] == "ChannelDestroyed"
    assert h.store.rows[row["id"]]["state"] == "connected"

    h.fake.accept()
    await h.fake.wait_connected(2)
    app = await h.fake.wait_request("GET", f"/ari/applications/{APP}", since=mark)
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1", since=app.index)
    assert delete.query["reason"] == "normal"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("answered", "callee")
    await h.settle()
    assert h.stream.connected.is_set()
    assert h.fake.channels == {} and h.fake.bridges == {}


async def test_a_calls_bridge_left_empty_while_asterisk_did_not_answer_is_destroyed_at_the_reconnect(
        h: Harness) -> None:
    """A call that ended while Asterisk was frozen could not destroy its bridge (the request
    timed out): the reconcile after the reconnect does. A live call's bridge, a bridge with a
    channel in it and a bridge that is no call's stay."""
    row, _outbound = await h.connected_call()
    live_bridge = str(row["id"])
    h.fake.bridges["gone-1"] = Bridge("gone-1", "call-gone-1")
    h.fake.bridges["busy-1"] = Bridge("busy-1", "call-busy-1", channels=["someone"])
    h.fake.bridges["other-1"] = Bridge("other-1", "conference")
    mark = h.fake.mark()
    await h.fake.drop(refuse=False)
    await h.fake.wait_connected(2)
    await h.fake.wait_request("DELETE", "/ari/bridges/gone-1", since=mark)
    ended = h.fake.mark()
    await h.fake.hangup("in-1", 16)  # (the live call ends as it would: its own bridge goes then)
    assert (await h.store.ended("in-1"))["outcome"] == "answered"
    await h.settle()
    assert set(h.fake.bridges) == {"busy-1", "other-1"}
    assert all(r.index >= ended for r in h.fake.find("DELETE", f"/ari/bridges/{live_bridge}"))


@pytest.mark.parametrize("state", ["connected", "ringing"])
async def test_a_call_whose_asterisk_was_restarted_meanwhile_ends_as_node_lost_not_as_anyones_hangup(
        h: Harness, state: str) -> None:
    """Asterisk killed and started again while the socket was down: the call's channels are
    gone with nobody hanging up. The row says the system lost it (node_lost), not that the
    caller hung up (what support would have read before)."""
    row, _outbound = await (h.connected_call() if state == "connected" else h.ringing_call())
    mark = h.fake.mark()
    await h.fake.drop(refuse=True)
    h.fake.restart()
    h.fake.accept()
    await h.fake.wait_connected(2)
    await h.fake.wait_request("GET", "/ari/asterisk/info", since=mark)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("node_lost", "system", None)
    await h.settle()
    assert h.stream.connected.is_set()


async def test_a_ring_timeout_while_asterisk_is_down_waits_for_it_and_a_restarted_one_says_node_lost(
        harness) -> None:
    """The ring timeout falls due while Asterisk is killed (the socket down, requests refused):
    the call is not taken for unanswered (no_answer, the other phone's doing). Asterisk comes
    back, started again, before the event stream has reconnected: the call ends as node_lost
    (adversary finding: it said no_answer)."""
    h = await harness(FlowSettings(ring_timeout=0.3, stasis_start_timeout=2.0))
    row, _outbound = await h.ringing_call()
    mark = h.fake.mark()
    await h.fake.drop(refuse=True)
    h.fake.restart()
    h.fake.fail("GET", "/ari/asterisk/info", status=503, times=None)
    first = await h.fake.wait_request("GET", "/ari/asterisk/info", since=mark)  # the ring timeout fell due
    await h.fake.wait_request("GET", "/ari/asterisk/info", since=first.index + 1)  # and again, still down
    assert h.store.rows[row["id"]]["state"] == "ringing"
    h.fake.clear_failures()  # back, another process; the socket still refused
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("node_lost", "system")
    assert row["ended_at_given"] is not None and row["ended_at_given"] == h.ari.lost_at  # (when the stream lost it)
    assert h.fake.connects == 1, "decided before the event stream reconnected"
    h.fake.accept()
    await h.fake.wait_connected(2)
    await h.settle()


@pytest.mark.parametrize("state", ["connected", "ringing"])
async def test_a_call_cut_by_asterisk_shutting_down_ends_as_node_lost_not_as_the_callers_hangup(
        h: Harness, state: str) -> None:
    """`core restart now` (or `core stop now`) mid-call: Asterisk hangs every channel up itself,
    each hangup request soft, its "cause" 4 the SHUTDOWN reason, no Q.850 cause. The row said
    the caller hung up with cause 4 (adversary finding); it says node_lost, by the system."""
    row, _outbound = await (h.connected_call() if state == "connected" else h.ringing_call())
    await h.fake.shut_down()
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("node_lost", "system", None)
    await h.settle()


@pytest.mark.parametrize("leg", ["caller", "callee"])
@pytest.mark.parametrize("state", ["connected", "ringing"])
async def test_a_leg_hung_up_by_asterisk_itself_is_the_systems_doing_not_a_phones(
        h: Harness, state: str, leg: str) -> None:
    """An operator's `channel request hangup` (or another ARI client's DELETE) on either leg: a
    soft hangup request, reason EXPLICIT (32), which no phone sends. The call ends by the system,
    without a cause (32 is none; the channel's end says 16), and the other leg is hung up; a
    caller not answered yet hears "unavailable". (It said the caller or the callee hung up: on
    the callee's leg as it rang, a failure of the other phone, and with reason=busy a busy
    phone. The bridge's own hangups are soft too: they stay what the flow says, as every other
    test here shows.)"""
    row, outbound = await (h.connected_call() if state == "connected" else h.ringing_call())
    gone, other = ("in-1", outbound) if leg == "caller" else (outbound, "in-1")
    await h.fake.hang_up_from_asterisk(gone, cause=17)  # (as `DELETE ...?reason=busy` would)
    hangup = await h.fake.wait_request("DELETE", f"/ari/channels/{other}")
    if state == "ringing" and leg == "callee":
        assert hangup.query["reason_code"] == str(CUT_CAUSE_TO_CALLER)
    row = await h.store.ended("in-1")
    expected = "answered" if state == "connected" else "failed"
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == (expected, "system", None)
    await h.settle()


async def test_the_other_phones_leg_hung_up_by_asterisk_while_it_is_asked_to_confirm_is_no_unconfirmed_answer(
        harness) -> None:
    """The callee's leg hung up by Asterisk itself during the press-1 prompt: not an answer
    that was never confirmed (not_confirmed, by the callee, as a voicemail's), a failure of the
    system's; the caller hears "unavailable"."""
    h = await harness(CONFIRMING)
    row, outbound, _prompt = await _answered_and_asked(h)
    await h.fake.hang_up_from_asterisk(outbound)
    hangup = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert hangup.query["reason_code"] == str(CUT_CAUSE_TO_CALLER)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("failed", "system", None)
    await h.settle()


async def test_a_call_lost_with_a_restarted_asterisk_ends_when_the_bridge_lost_it_not_when_it_found_out(
        h: Harness) -> None:
    """Its end is the moment the event stream lost Asterisk (a killed Asterisk closes it at
    once), not the reconnect seconds later."""
    row, _outbound = await h.connected_call()
    before = datetime.now(timezone.utc)
    await h.fake.drop(refuse=True)
    async with asyncio.timeout(WAIT):
        while h.ari.lost_at is None:
            await asyncio.sleep(0.01)  # wait-ok: the stream's reader notices the close on its own
    lost = h.ari.lost_at
    assert before <= lost <= datetime.now(timezone.utc)
    h.fake.restart()
    h.fake.accept()
    await h.fake.wait_connected(2)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["ended_at_given"]) == ("node_lost", lost)
    await h.settle()
    assert h.ari.lost_at is None, "cleared once connected again"


@pytest.mark.parametrize("started", ["before", "after"])
async def test_a_call_left_behind_from_before_asterisks_start_ends_as_node_lost(harness, started: str) -> None:
    """The bridge and its Asterisk killed together: the next bridge finds the row of a call
    whose channels are gone. Started before this Asterisk did, the call went down with the one
    before: node_lost, ended no later than this one started. (It said failed, or answered, by
    the system.) A call started after it still ends as before."""
    h = await harness(start=False)
    pbx_started = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)  # the fake's startup time
    began = pbx_started + (timedelta(minutes=-5) if started == "before" else timedelta(minutes=5))
    row = h.store.add_row(state="connected", inbound_channel_id="in-stale", outbound_channel_id="gone-callee",
                          started_at=began, answered_at=began + timedelta(seconds=10))
    await h.start()
    row = await h.store.ended("in-stale")
    if started == "before":
        assert (row["outcome"], row["hangup_by"], row["ended_at_given"]) == ("node_lost", "system", pbx_started)
    else:
        assert (row["outcome"], row["hangup_by"], row["ended_at_given"]) == ("answered", "system", None)


@pytest.mark.parametrize("state", ["connected", "ringing"])
async def test_a_call_another_nodes_reaper_ended_while_this_bridge_was_silent_is_hung_up_and_its_row_kept(
        h: Harness, state: str) -> None:
    """This node was frozen long enough for another to give it up: the reaper ended the call's
    row (node_lost, its call.ended sent), but the phones were still up when it came back, talking
    unrecorded (adversary finding). Once the heartbeat is back, the bridge hangs them up; the
    row stays as the reaper wrote it (no second end, no other outcome)."""
    row, outbound = await (h.connected_call() if state == "connected" else h.ringing_call())
    reaped = h.store.rows[row["id"]]
    reaped.update(state="ended", outcome="node_lost", hangup_by="system", hangup_cause=None)
    ends_before = [op for op in h.store.ops if op[0] == "call_ended"]
    await h.dispatcher.end_reaped()
    caller = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    if state == "ringing":
        assert caller.query["reason_code"] == str(CUT_CAUSE_TO_CALLER)  # (unavailable)
    await h.settle()
    assert (reaped["outcome"], reaped["hangup_by"]) == ("node_lost", "system")
    assert [op for op in h.store.ops if op[0] == "call_ended"] == ends_before
    assert h.fake.channels == {} and h.fake.bridges == {}


async def test_calls_whose_rows_are_live_are_left_alone_after_a_silence(h: Harness) -> None:
    row, outbound = await h.connected_call()
    await h.dispatcher.end_reaped()
    await h.dispatcher.end_reaped()
    assert h.fake.find("DELETE", "/ari/channels/in-1") == [] and h.store.rows[row["id"]]["state"] == "connected"
    await h.fake.hangup("in-1")
    await h.store.ended("in-1")
    await h.settle()


async def test_a_hangup_read_late_ends_the_call_when_asterisk_says_it_happened(h: Harness) -> None:
    """The bridge busy or frozen a while: the caller's hangup is read 3 s after it happened. The
    row's end is the event's own time, as Asterisk stamped it, not when the bridge read it (a
    frozen bridge made a 3.7 s call 13.7 s long: adversary finding). A stamp that is no time
    leaves it to the bridge's clock."""
    row, _outbound = await h.connected_call()
    then = (datetime.now(timezone.utc) - timedelta(seconds=3)).replace(microsecond=123000)
    channel = h.fake.channels["in-1"].json()
    await h.fake.send({"type": "ChannelHangupRequest", "cause": 16, "channel": channel,
                       "timestamp": then.strftime("%Y-%m-%dT%H:%M:%S.123+0000")})
    row = await h.store.ended("in-1")
    assert (row["hangup_by"], row["ended_at_given"]) == ("caller", then)
    await h.settle()
    assert read({"type": "ChannelDestroyed", "channel": {"id": "x"}, "timestamp": "yesterday"}) == \
        Hangup("x", None, final=True)


async def test_a_caller_gone_while_the_socket_was_down_is_still_the_callers_hangup(h: Harness) -> None:
    """The same vanishing on the same Asterisk (no restart): the caller's leg went, so the caller
    hung up, and the other phone is hung up by the bridge."""
    row, outbound = await h.connected_call()
    mark = h.fake.mark()
    await h.fake.drop(refuse=True)
    h.fake.vanish("in-1")
    h.fake.accept()
    await h.fake.wait_connected(2)
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}", since=mark)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")
    await h.settle()


async def test_an_answer_while_the_websocket_was_down_is_caught_up_with_at_reconnect(h: Harness) -> None:
    """The other phone answers while the socket is down (its event sent to nobody): once
    connected again, the bridge reads the channels' states and the call is connected, not left
    ringing until the ring timeout cuts two people talking."""
    row, outbound = await h.ringing_call()
    await h.fake.drop(refuse=True)
    await h.fake.answer(outbound)  # nobody hears it: the socket is down
    lost = h.fake.lost_events[-1]
    assert (lost["type"], lost["channel"]["id"], lost["channel"]["state"]) == ("ChannelStateChange", outbound, "Up")
    assert h.store.rows[row["id"]]["state"] == "ringing"

    h.fake.accept()
    await h.fake.wait_connected(2)
    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    await h.store.wait(lambda: h.store.rows[row["id"]]["state"] == "connected", "the call connected")
    await h.fake.hangup("in-1", 16)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "caller", 16)
    await h.settle()


async def test_call_survives_websocket_drop_when_its_channels_live(h: Harness) -> None:
    row, outbound = await h.connected_call()
    mark = h.fake.mark()

    await h.fake.drop(refuse=False)
    await h.fake.wait_connected(2)
    await h.fake.wait_request("GET", f"/ari/applications/{APP}", since=mark)
    assert h.store.rows[row["id"]]["state"] == "connected"

    await h.fake.hangup("in-1", 16)
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}", since=mark)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "caller", 16)
    await h.settle()
    assert h.fake.find("DELETE", "/ari/channels/in-1") == []


async def test_reconcile_resumes_connected_call_left_by_earlier_process(harness) -> None:
    h = await harness(start=False)
    call_id = uuid.uuid4()
    outbound = f"{call_id}-callee"
    h.store.add_row(
        id=call_id,
        state="connected",
        inbound_channel_id="in-old",
        outbound_channel_id=outbound,
        bridge_id=str(call_id),
        answered_at=datetime.now(timezone.utc),
    )
    h.fake.add_channel("in-old", CALLER, POOL, state="Up", args=["inbound", POOL])
    h.fake.add_channel(outbound, POOL, "s", state="Up", args=["outbound", str(call_id)])
    h.fake.bridges[str(call_id)] = Bridge(str(call_id), channels=["in-old", outbound])
    await h.start()
    await h.fake.wait_request("GET", f"/ari/applications/{APP}")  # reconcile saw both legs live

    await h.fake.hangup("in-old", 16)  # the event is read after reconcile has run
    delete = await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    assert delete.query["reason"] == "normal"
    row = await h.store.ended("in-old")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "caller", 16)
    await h.settle()
    assert h.fake.find("DELETE", f"/ari/bridges/{call_id}")


@pytest.mark.parametrize("outbound_state", ["Up", "Ringing"])
async def test_reconcile_of_a_call_stopped_between_answer_and_its_database_write(harness, outbound_state) -> None:
    """The row still says ringing: an answered other leg means the call is up and is resumed;
    a leg still ringing is finished (nobody supervises its ring timeout any more)."""
    h = await harness(start=False)
    call_id = uuid.uuid4()
    outbound = f"{call_id}-callee"
    h.store.add_row(
        id=call_id, state="ringing", inbound_channel_id="in-mid", outbound_channel_id=outbound,
        bridge_id=str(call_id),
    )
    h.fake.add_channel("in-mid", CALLER, POOL, state="Up", args=["inbound", POOL])
    h.fake.add_channel(outbound, POOL, "s", state=outbound_state, args=["outbound", str(call_id)])
    h.fake.bridges[str(call_id)] = Bridge(str(call_id), channels=["in-mid", outbound])
    await h.start()
    await h.fake.wait_request("GET", f"/ari/channels/{outbound}")

    if outbound_state == "Up":
        await h.fake.hangup(outbound, 16)  # the client hangs up the resumed call
        await h.fake.wait_request("DELETE", "/ari/channels/in-mid")
        row = await h.store.ended("in-mid")
        assert (row["outcome"], row["hangup_by"]) == ("answered", "callee")
        assert row["answered_at"] is not None
    else:
        await h.fake.wait_request("DELETE", "/ari/channels/in-mid")
        row = await h.store.ended("in-mid")
        assert (row["outcome"], row["hangup_by"]) == ("failed", "system")


async def test_reconcile_finishes_stale_call_left_by_earlier_process(harness) -> None:
    h = await harness(start=False)
    row = h.store.add_row(state="ringing", inbound_channel_id="in-stale", outbound_channel_id="gone-callee")
    h.fake.add_channel("in-stale", CALLER, POOL, args=["inbound", POOL])
    await h.start()

    await h.fake.wait_request("DELETE", "/ari/channels/in-stale")
    row = await h.store.ended("in-stale")
    assert (row["outcome"], row["hangup_by"]) == ("failed", "system")
    assert h.fake.find("DELETE", "/ari/channels/gone-callee") == []


async def test_a_stale_call_a_stopped_process_ended_meanwhile_keeps_its_end_and_is_not_counted_again(
        harness) -> None:
    """A process killed while Postgres held its end statement behind a lock: the statement
    commits after the next process read the row as left behind. That end stands (the caller's
    hangup), and the reconcile neither says it finished the call nor counts it (adversary,
    issue 14: it logged finished_stale_call and counted a failed call by the system)."""
    h = await harness(start=False)
    row = h.store.add_row(state="connected", inbound_channel_id="in-stale", outbound_channel_id="gone-callee",
                          answered_at=datetime.now(timezone.utc), caller_role="courier", callee_role="client")
    h.store.ended_meanwhile[row["id"]] = {"outcome": "answered", "hangup_by": "caller", "hangup_cause": 16}
    counted = {o: metrics.CALLS.labels(o, "courier_to_client")._value.get() for o in ("answered", "failed")}
    with capture_logs() as logs:
        await h.start()
        row = await h.store.ended("in-stale")
        await h.store.wait(lambda: h.store.calls_of("call_ended", row["id"]), "the reconcile's end")
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "caller", 16)
    events = [e["event"] for e in logs]
    assert "reconcile.stale_call_ended_meanwhile" in events and "reconcile.finished_stale_call" not in events
    assert {o: metrics.CALLS.labels(o, "courier_to_client")._value.get() for o in counted} == counted


async def test_calls_left_behind_are_finished_once_the_database_answers_after_a_failed_reconcile(
        harness, monkeypatch) -> None:
    """A bridge started while the database stalled: its reconcile fails, and the rows an
    earlier process left (one still talking, one that went with it) are looked at again until
    the database answers, not only at the next reconnect (adversary, issue 14)."""
    monkeypatch.setattr(stasis, "RECONCILE_RETRY_FIRST_WAIT", 0.01)
    h = await harness(start=False)
    stale = h.store.add_row(state="ringing", inbound_channel_id="in-stale", outbound_channel_id="gone-callee")
    _call_id, outbound = h.left_behind_talking("in-old")
    h.store.active_calls_error = TimeoutError()
    with capture_logs() as logs:
        await h.start()
        row = await h.store.ended("in-stale")
        await h.caught_up()
    assert "reconcile.store_failed" in [e["event"] for e in logs]
    assert row["id"] == stale["id"] and (row["outcome"], row["hangup_by"]) == ("failed", "system")
    assert "reconcile.caught_up" in [e["event"] for e in logs]
    # The call still talking was resumed: the caller's hangup ends it as the caller's.
    await h.fake.hangup("in-old", 16)
    row = await h.store.ended("in-old")
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")


async def test_a_catch_up_looks_again_at_least_every_five_seconds(harness, monkeypatch) -> None:
    """A caller the catch-up is to take up waits in silence until it runs: while the database
    fails, it looks again after 1, 2, 4, then every 5 seconds, not up to a minute later (a
    caller was dropped by its own network first: adversary, issue 14)."""
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any) -> None:
        if sys._getframe(1).f_code.co_name == "_catch_up":  # (the catch-up's waits; not others')
            waits.append(seconds)
            seconds = 0
        await real_sleep(seconds, *args)  # wait-ok: other code's own waits, passed on unchanged

    monkeypatch.setattr(stasis.asyncio, "sleep", sleep)
    h = await harness(start=False)
    h.store.active_calls_error = TimeoutError()
    h.store.active_calls_errors = [TimeoutError() for _ in range(5)]
    await h.start()
    await h.caught_up()
    assert waits[:6] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


async def test_a_catch_up_also_takes_up_a_caller_no_row_names_and_destroys_left_bridges(
        harness, monkeypatch) -> None:
    """The catch-up after a reconcile the database failed does all of the reconcile's
    database part: a caller in the application that no row names (its StasisStart came
    while the event stream was down) is routed as any call, and a call's bridge left empty
    is destroyed, not left until the next reconnect (review, issue 14: the catch-up only
    finished rows and passed on cuts). The orphan is taken up only after the rows were read:
    the stalled read adopts nobody."""
    monkeypatch.setattr(stasis, "RECONCILE_RETRY_FIRST_WAIT", 0.01)
    h = await harness(start=False)
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.add_channel("in-orphan", CALLER, POOL, args=["inbound", POOL, "masked"])
    h.fake.bridges["gone-1"] = Bridge("gone-1", "call-gone-1")
    h.store.active_calls_error = TimeoutError()
    with capture_logs() as logs:
        await h.start()
        create = await h.fake.wait_request("POST", "/ari/channels/create")
        await h.fake.wait_request("DELETE", "/ari/bridges/gone-1")
        row = await h.store.state("in-orphan", "ringing")
        await h.caught_up()
    events = [e["event"] for e in logs]
    assert events.index("reconcile.store_failed") < events.index("reconcile.adopted_caller")
    assert events.count("reconcile.adopted_caller") == 1 and "reconcile.caught_up" in events
    assert row["callee_role"] == "client" and create.query["channelId"] == f"{row['id']}-callee"
    await h.fake.hangup("in-orphan")
    await h.store.ended("in-orphan")
    await h.settle()


async def test_a_call_that_ended_while_a_catch_up_read_the_rows_is_not_taken_for_an_orphan(
        h: Harness, monkeypatch) -> None:
    """A catch-up runs while calls come and go. A call of this process that ends while the
    catch-up reads the rows, its caller's leg still in the application (Asterisk failed the
    hangup, or was slow to let it go), is no orphan: it is not taken up as a new call (it would
    ring the other phone again, and leave a second row). (The calls of this process are
    taken before the rows are read: taken after, this test fails. The ones it held before the
    application's channels were read are left out too, for the instants in between.)"""
    monkeypatch.setattr(stasis, "RECONCILE_RETRY_FIRST_WAIT", 0.01)
    row, outbound = await h.connected_call()
    h.store.active_calls_error = TimeoutError()  # (the reconcile at the reconnect fails...)
    gate = h.store.active_calls_gate = asyncio.Event()  # (...and its catch-up waits for the rows)
    with capture_logs() as logs:
        await h.fake.drop(refuse=False)
        await h.fake.wait_connected(2)
        await h.store.wait(lambda: any(a.get("waiting") for op, _, a in h.store.ops if op == "active_calls"),
                           "the catch-up reading the rows")
        # (Asterisk answers the caller's hangup "not found" and keeps the leg a moment longer)
        h.fake.fail("DELETE", "/ari/channels/in-1", status=404, message="Channel not found", times=None)
        await h.fake.hangup(outbound, 16)  # (the call ends; its caller's leg stays)
        assert (await h.store.ended("in-1"))["outcome"] == "answered"
        await h.settle()
        gate.set()
        await h.caught_up()
    events = [e["event"] for e in logs]
    assert "reconcile.caught_up" in events and "reconcile.adopted_caller" not in events
    assert [r["id"] for r in h.store.rows.values() if r["inbound_channel_id"] == "in-1"] == [row["id"]]
    assert len(h.fake.find("POST", "/ari/channels/create")) == 1, "the other phone was rung once"
    h.fake.clear_failures()


async def test_a_call_that_begins_while_a_catch_up_reads_the_rows_is_left_alone(h: Harness, monkeypatch) -> None:
    """A catch-up runs while calls come and go: a call that begins while it reads the rows,
    its row written by then, is this process's own, not one left behind (it was finished:
    its bridge destroyed and its row ended by the system while both phones talked on:
    adversary, issue 14)."""
    monkeypatch.setattr(stasis, "RECONCILE_RETRY_FIRST_WAIT", 0.01)
    h.store.active_calls_error = TimeoutError()
    gate = h.store.active_calls_gate = asyncio.Event()
    with capture_logs() as logs:
        await h.fake.drop(refuse=False)
        await h.fake.wait_connected(2)
        await h.store.wait(lambda: any(a.get("waiting") for op, _, a in h.store.ops if op == "active_calls"),
                           "the catch-up reading the rows")
        row, outbound = await h.ringing_call("in-new")
        gate.set()
        await h.caught_up()
    events = [e["event"] for e in logs]
    assert "reconcile.caught_up" in events and "reconcile.finished_stale_call" not in events
    assert h.store.rows[row["id"]]["state"] == "ringing"
    assert h.fake.find("DELETE", f"/ari/bridges/{row['id']}") == []
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", "/ari/channels/in-new/answer")
    await h.store.state("in-new", "connected")
    await h.fake.hangup("in-new", 16)
    ended = await h.store.ended("in-new")
    assert (ended["outcome"], ended["hangup_by"]) == ("answered", "caller")


@pytest.mark.parametrize("other_leg", ["never made", "made, not dialed"])
async def test_a_caller_whose_call_never_got_past_its_lookup_is_taken_up_again(harness, other_leg: str) -> None:
    """An earlier process wrote the call's row with its route lookup, then stopped (killed
    while Postgres held the statement, which committed after it died; or while the write that
    takes the row to ringing waited, the other leg made but not dialed): nothing was rung, the
    caller still waits. The row is finished as the system's failure (its undialed leg hung
    up) and the caller is taken up as a new call, not hung up (adversary, issue 14: the caller
    was cut though nothing had ever rung)."""
    h = await harness(start=False)
    h.store.add_route(CALLER, POOL, CALLEE)
    stale = h.store.add_row(state="routing", inbound_channel_id="in-stale")
    h.fake.add_channel("in-stale", CALLER, POOL, args=["inbound", POOL, "masked"])
    if other_leg == "made, not dialed":
        h.fake.add_channel(f"{stale['id']}-callee", "", CALLEE, state="Down", args=["outbound", str(stale["id"])])
    with capture_logs() as logs:
        await h.start()
        create = await h.fake.wait_request("POST", "/ari/channels/create")
        new = await h.store.wait(lambda: next((r for r in h.store.rows.values() if r["id"] != stale["id"]
                                               and "ringing" in h.store.states[r["id"]]), None), "the new call")
    assert (stale["state"], stale["outcome"], stale["hangup_by"]) == ("ended", "failed", "system")
    assert new["inbound_channel_id"] == "in-stale" and create.query["channelId"] == f"{new['id']}-callee"
    assert h.fake.find("DELETE", "/ari/channels/in-stale") == []
    assert [e["event"] for e in logs].count("reconcile.adopted_caller") == 1
    assert f"{stale['id']}-callee" not in h.fake.channels
    await h.fake.hangup("in-stale")
    await h.store.wait(lambda: h.store.rows[new["id"]]["state"] == "ended", "the new call's end")
    await h.settle()


async def test_a_stale_row_naming_a_leg_a_call_of_this_process_holds_does_not_hang_it_up(h: Harness) -> None:
    """A row left behind can name a caller's leg that a call of this process holds now (taken
    up as an orphan while that row's statement was still held by Postgres): finishing the row
    leaves the live call alone."""
    row, _outbound = await h.connected_call()
    stale = h.store.add_row(state="ringing", inbound_channel_id="in-1", outbound_channel_id="gone-callee")
    mark = h.fake.mark()
    await h.fake.drop(refuse=False)
    await h.fake.wait_connected(2)
    await h.store.wait(lambda: stale["state"] == "ended", "the stale row finished")
    assert (stale["outcome"], stale["hangup_by"]) == ("failed", "system")
    assert h.fake.find("DELETE", "/ari/channels/in-1", since=mark) == []
    assert h.store.rows[row["id"]]["state"] == "connected"
    await h.fake.hangup("in-1", 16)
    await h.store.wait(lambda: h.store.rows[row["id"]]["state"] == "ended", "the live call's end")
    assert (h.store.rows[row["id"]]["outcome"], h.store.rows[row["id"]]["hangup_by"]) == ("answered", "caller")


async def test_a_call_left_behind_whose_caller_hangs_up_while_a_catch_up_reads_the_rows_ends(
        harness, monkeypatch) -> None:
    """A catch-up reads the rows while events come: the caller of a call left behind hangs up
    meanwhile, before the call is taken up (its end reaches nobody). The call is resumed, and
    finds its caller gone: it ends, and the other phone is hung up, not left in silence
    (adversary, issue 14)."""
    monkeypatch.setattr(stasis, "RECONCILE_RETRY_FIRST_WAIT", 0.01)
    h = await harness(start=False)
    _call_id, outbound = h.left_behind_talking("in-old")
    h.store.active_calls_error = TimeoutError()
    gate = h.store.active_calls_gate = asyncio.Event()
    await h.start()
    await h.store.wait(lambda: any(a.get("waiting") for op, _, a in h.store.ops if op == "active_calls"),
                       "the catch-up reading the rows")
    await h.fake.hangup("in-old", 16)
    await h.handled_event("ChannelDestroyed", "in-old")
    gate.set()
    await h.caught_up()
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    row = await h.store.ended("in-old")
    assert row["outcome"] == "answered"
    await h.settle()


async def test_a_row_that_names_no_other_leg_yet_has_its_leg_and_bridge_cleaned_up(harness) -> None:
    """An earlier process stopped while the other leg and the bridge were being made, before
    the row named them: the next one finds them by the call's id, hangs the leg up (never
    dialed) and destroys the bridge. (Its caller is taken up again as a new call: the test
    above.)"""
    h = await harness(start=False)
    h.store.add_route(CALLER, POOL, CALLEE)
    row = h.store.add_row(state="routing", inbound_channel_id="in-stale")
    outbound, bridge = f"{row['id']}-callee", str(row["id"])
    h.fake.add_channel("in-stale", CALLER, POOL, args=["inbound", POOL, "masked"])
    h.fake.add_channel(outbound, "", CALLEE, state="Down", args=["outbound", str(row["id"])])
    h.fake.bridges[bridge] = Bridge(bridge)
    await h.start()

    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    await h.fake.wait_request("DELETE", f"/ari/bridges/{bridge}")
    row = await h.store.ended("in-stale")
    assert (row["outcome"], row["hangup_by"]) == ("failed", "system")
    assert outbound not in h.fake.channels and bridge not in h.fake.bridges
    await h.fake.wait_request("POST", "/ari/channels/create")  # (the caller, taken up again)
    await h.fake.hangup("in-stale")
    await h.store.wait(lambda: all(r["state"] == "ended" for r in h.store.rows.values()), "every call's end")
    await h.settle()
    assert h.fake.channels == {} and h.fake.bridges == {}


async def test_a_caller_left_in_stasis_with_no_row_is_taken_up_as_a_new_call(harness) -> None:
    """An earlier process took the call in (its StasisStart is gone with it) and stopped
    before its row was written: after the restart the caller is not left in silence, the call
    is routed as any other and leaves its row."""
    h = await harness(start=False)
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.add_channel("in-orphan", CALLER, POOL, args=["inbound", POOL, "masked"])
    await h.start()

    create = await h.fake.wait_request("POST", "/ari/channels/create")
    outbound = create.query["channelId"]
    await h.fake.wait_request("POST", f"/ari/channels/{outbound}/dial")
    row = await h.store.state("in-orphan", "ringing")
    assert row["callee_role"] == "client"
    await h.fake.hangup("in-orphan")
    await h.store.ended("in-orphan")
    await h.settle()


async def test_a_leg_in_stasis_that_no_call_owns_is_hung_up(harness) -> None:
    h = await harness(start=False)
    h.fake.add_channel("nobodys-callee", "", CALLEE, state="Down", args=["outbound", str(uuid.uuid4())])
    await h.start()
    await h.fake.wait_request("DELETE", "/ari/channels/nobodys-callee")
    assert h.store.rows == {}


async def test_a_cut_that_comes_while_the_legs_are_made_is_honoured_before_the_dial(h: Harness) -> None:
    """A block (or the session's end) applied while the other leg and the bridge were being
    made: the other phone is never dialed, and the row names nobody rung."""
    route = h.store.add_route(CALLER, POOL, CALLEE)
    await h.fake.inbound_call("in-1", CALLER, POOL)
    # (the new leg's StasisStart is on its way, or queued already: the cut comes after it)
    create = await h.fake.wait_request("POST", "/ari/channels/create")
    outbound = create.query["channelId"]
    assert h.dispatcher.cut_calls({route.callee_participant_id}, "blocked") == 1
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["cut_reason"], row["callee_role"]) == ("blocked", "blocked", None)
    await h.settle()
    assert h.fake.find("POST", f"/ari/channels/{outbound}/dial") == []


async def test_a_caller_who_leaves_before_the_dial_uses_up_no_call_of_the_session(h: Harness) -> None:
    """A caller who hangs up while the call is being set up rang nobody: the row names no
    callee, so it does not count against the session's caps."""
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.auto_stasis_start = False
    await h.fake.inbound_call("in-1", CALLER, POOL)
    create = await h.fake.wait_request("POST", "/ari/channels/create")
    outbound = create.query["channelId"]
    await h.fake.hangup("in-1", 16)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["callee_role"]) == ("caller_cancelled", "caller", None)
    await h.settle()
    assert h.fake.find("POST", f"/ari/channels/{outbound}/dial") == []


async def test_a_route_lookup_that_fails_leaves_a_row_and_an_announcement(h: Harness) -> None:
    """The database failed the lookup (the statement that writes the row too): the caller
    hears the service is unavailable, and the attempt is kept as a failed call."""
    h.store.route_error = TimeoutError()
    h.fake.auto_finish_playback = True
    await h.fake.inbound_call("in-1", CALLER, POOL)
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["session_id"]) == ("failed", "system", None)
    play = h.fake.find("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    assert [p.query["media"] for p in play] == ["sound:all-circuits-busy-now"]
    await h.settle()


# --- logs -----------------------------------------------------------------------------


async def test_json_logs_show_no_real_number(h: Harness, logs) -> None:
    """The production log pipeline (bridge.logs.configure) over a routed and an unknown call."""
    from bridge.logs import configure

    saved = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access")
    saved_access = access.level
    out = io.StringIO()
    try:
        configure("info", out)
        h.store.add_route(CALLER, POOL, CALLEE)
        row, outbound = await h.ringing_call("in-1")
        await h.fake.answer(outbound)
        await h.store.state("in-1", "connected")
        await h.fake.hangup(outbound)
        await h.store.ended("in-1")

        h.fake.auto_finish_playback = True
        await h.fake.inbound_call("in-2", "+79167654321", POOL)
        await h.store.ended("in-2")
        await h.settle()
    finally:
        structlog.configure(**saved)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        access.setLevel(saved_access)

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("call.started") == 2 and events.count("call.ended") == 2
    assert "call.connected" in events
    text = out.getvalue()
    for digits in (*REAL_DIGITS, "9167654321"):
        assert digits not in text
    assert "+***67" in text and "+***33" in text


# --- bugs -----------------------------------------------------------------------------


async def test_caller_hangup_during_route_lookup_is_caller_cancelled(h: Harness, logs) -> None:
    h.store.add_route(CALLER, POOL, CALLEE)
    h.store.route_gate = asyncio.Event()
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await h.store.wait(lambda: h.store.lookups, "the route lookup")

    await h.fake.hangup("in-1", 16)  # while the database is being asked
    # The call has been told the caller left before its lookup returns.
    await h.handled_event("ChannelDestroyed", "in-1")
    h.store.route_gate.set()

    row = await h.store.ended("in-1")
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/create") == []
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")
    assert not any(e["event"] == "call.failed" for e in logs)


async def test_outbound_leg_created_despite_failed_request_is_hung_up(h: Harness) -> None:
    h.store.add_route(CALLER, POOL, CALLEE)
    h.fake.cut("POST", "/ari/channels/create")
    await h.fake.inbound_call("in-1", CALLER, POOL)

    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason"] == "congestion"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("failed", "system")
    await h.settle()
    outbound = f"{row['id']}-callee"
    assert h.fake.find("POST", "/ari/channels/create")[0].status == 0  # created, answer lost
    assert outbound not in h.fake.channels, "the outbound leg was left behind in Stasis"

async def test_store_error_during_reconcile_does_not_kill_the_event_stream(h: Harness) -> None:
    h.store.active_calls_error = asyncpg.exceptions.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"
    )
    await h.fake.drop(refuse=False)  # the bridge reconnects at once and reconciles
    await h.store.wait(lambda: any(op == "active_calls" and a["failed"] for op, _, a in h.store.ops), "reconcile")

    await h.fake.inbound_call("in-1", CALLER, POOL)  # unknown caller: answered at once
    stream = h.task
    assert stream is not None
    answered: asyncio.Task[Any] = asyncio.create_task(h.fake.wait_request("POST", "/ari/channels/in-1/answer"))
    done, _ = await asyncio.wait({stream, answered}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    answered.cancel()
    assert stream not in done, f"the event stream died: {stream.exception()!r}"
    assert answered in done


async def test_cancelled_call_task_stops_even_when_an_event_arrives_at_once(harness) -> None:
    h = await harness(FlowSettings(ring_timeout=0.5, stasis_start_timeout=2.0))
    row, outbound = await h.ringing_call()
    await h.handled_event("ChannelStateChange", outbound)  # the last event of the dial
    call = h.dispatcher.calls["in-1"]
    (task,) = h.dispatcher._tasks
    # Until the call task idles in its ring loop with nothing queued; no event tells that.
    for _ in range(1000):
        if call._events.empty() and call._events._getters:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0)  # wait-ok: yield to the call task
    else:
        raise AssertionError("the call task never idled")
    mark = h.fake.mark()

    # The process stops (StasisDispatcher.shutdown) as an event for the call comes in.
    call.feed({"type": "ChannelVarset", "variable": "X", "value": "1", "channel": {"id": outbound}})
    task.cancel()
    await asyncio.wait({task}, timeout=WAIT)

    assert task.cancelled(), "the call went on after its task was cancelled"
    assert h.fake.find("DELETE", re.compile(r"/ari/channels/.*"), since=mark) == []
    assert h.store.rows[row["id"]]["state"] == "ringing"  # left for the next process


# --- calls the bridge itself ends (blocklist, maximum duration, the client's keypad) ----------


def _participants(h: Harness) -> set[uuid.UUID]:
    route = h.store.routes[(CALLER, POOL)]
    return {route.caller_participant_id, route.callee_participant_id}  # type: ignore[arg-type]


async def test_a_block_while_ringing_cancels_the_other_phone_and_refuses_the_caller(h: Harness) -> None:
    row, outbound = await h.ringing_call()
    assert h.dispatcher.cut_calls(_participants(h), "blocked") == 1
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("blocked", "system", "blocked")
    assert h.fake.find("DELETE", f"/ari/channels/{outbound}") and h.fake.find("DELETE", "/ari/channels/in-1")


async def test_a_block_while_connected_ends_the_call(h: Harness) -> None:
    row, outbound = await h.connected_call()
    h.dispatcher.cut_calls(_participants(h), "blocked")
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "blocked")


async def test_a_block_applied_while_the_route_was_looked_up_refuses_the_call(h: Harness) -> None:
    """The block commits after the lookup read the database, and its notice arrives before
    the lookup returns: the call must not ring."""
    h.store.add_route(CALLER, POOL, CALLEE)
    h.store.route_gate = asyncio.Event()
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await h.store.wait(lambda: h.store.lookups, "the route lookup")
    assert h.dispatcher.cut_calls(_participants(h), "blocked") == 0  # not known to be on a call yet
    h.store.route_gate.set()

    row = await h.store.ended("in-1")
    await h.settle()
    assert row["outcome"] == "blocked"
    assert h.fake.find("POST", "/ari/channels/create") == [], "the other phone never rang"


async def test_a_block_applied_before_the_lookup_does_not_outlive_an_unblock(h: Harness) -> None:
    h.dispatcher.cut_calls({uuid.uuid4()}, "blocked")  # someone else's block, earlier
    h.store.add_route(CALLER, POOL, CALLEE)
    h.dispatcher.cut_calls(_participants(h), "blocked")  # then unblocked: the route says connect
    await h.ringing_call()  # a new lookup, begun after the block: it rings
    await h.fake.hangup("in-1", 16)
    await h.store.ended("in-1")
    await h.settle()


async def test_the_maximum_duration_ends_a_connected_call(h: Harness) -> None:
    route = h.store.add_route(CALLER, POOL, CALLEE)
    h.store.routes[(CALLER, POOL)] = dataclasses.replace(route, terms=Terms(max_call_seconds=1))
    row, outbound = await h.connected_call()
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "max_duration")
    assert h.fake.find("POST", f"/ari/bridges/{row['bridge_id']}/play/{row['id']}-warning")


def _dtmf(channel_id: str, digit: str) -> dict[str, Any]:
    return {"type": "ChannelDtmfReceived", "digit": digit, "duration_ms": 100, "channel": {"id": channel_id}}


async def test_the_client_keys_the_block_code(h: Harness) -> None:
    """The courier called; the client (the called leg) keys *9: the courier's leg goes, the
    client hears the confirmation, the block is reported to the session."""
    row, outbound = await h.connected_call()
    await h.fake.send(_dtmf(outbound, "1"), _dtmf(outbound, "*"), _dtmf(outbound, "9"))
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    play = await h.fake.wait_request("POST", f"/ari/channels/{outbound}/play/{row['id']}-blocked")
    assert play.query["media"] == "sound:auth-thankyou"
    await h.fake.finish_playback(f"{row['id']}-blocked")
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "blocked_by_client")
    route = h.store.routes[(CALLER, POOL)]
    blocks = [op for op in h.store.ops if op[0] == "block_by_client"]
    assert [(b[2]["participant_id"], b[2]["by"]) for b in blocks] == [
        (route.caller_participant_id, route.callee_participant_id)
    ]
    assert delete is not None


async def test_a_client_calling_back_keys_the_block_code_while_it_rings(h: Harness) -> None:
    """The client calls and keys *9 before the courier answers (over early media): the
    ringing is cancelled, the unanswered client hears the confirmation, the call is blocked."""
    h.store.add_route(CALLER, POOL, CALLEE, role="client")
    row, outbound = await h.ringing_call()
    await h.fake.send(_dtmf("in-1", "*"), _dtmf("in-1", "9"))
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    await h.fake.wait_request("POST", f"/ari/channels/in-1/play/{row['id']}-blocked")
    assert not h.fake.find("POST", "/ari/channels/in-1/answer"), "the client's call is never answered"
    await h.fake.finish_playback(f"{row['id']}-blocked")
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("blocked", "system", "blocked_by_client")
    assert [op[0] for op in h.store.ops].count("block_by_client") == 1


async def test_the_courier_keying_the_code_blocks_no_one(h: Harness) -> None:
    row, outbound = await h.connected_call()
    await h.fake.send(_dtmf("in-1", "*"), _dtmf("in-1", "9"))
    await h.handled_event("ChannelDtmfReceived", "in-1")
    await h.fake.hangup("in-1", 16)
    row = await h.store.ended("in-1")
    await h.settle()
    assert row["cut_reason"] is None and not [op for op in h.store.ops if op[0] == "block_by_client"]


async def test_a_database_failure_while_blocking_keeps_the_call_up(h: Harness) -> None:
    row, outbound = await h.connected_call()

    async def broken(*_args: Any, **_kw: Any) -> None:
        raise asyncpg.PostgresConnectionError("database gone")

    h.store.block_by_client = broken  # type: ignore[method-assign]
    await h.fake.send(_dtmf(outbound, "*"), _dtmf(outbound, "9"))
    await h.handled_event("ChannelDtmfReceived", outbound)
    await h.fake.hangup(outbound, 16)  # the call was still up: the client hangs up as usual
    row = await h.store.ended("in-1")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "callee", None)


async def test_a_database_failure_while_routing_tells_the_caller_the_service_is_unavailable(h: Harness) -> None:
    async def broken(*_args: Any, **_kw: Any) -> Any:
        raise asyncpg.PostgresConnectionError("database gone")

    h.store.route = broken  # type: ignore[method-assign]
    await h.fake.inbound_call("in-1", CALLER, POOL)
    play = await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    assert play.query["media"] == "sound:all-circuits-busy-now"
    assert h.fake.find("POST", "/ari/channels/in-1/answer")
    await h.fake.finish_playback(play.path.rsplit("/", 1)[1])
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason_code"] == "34"
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/create") == []


async def test_a_resumed_call_still_ends_at_its_maximum_duration_counted_from_the_answer(harness) -> None:
    """Connected 59 s of a 60 s maximum when the earlier process stopped: the new process
    ends it within about a second, not 60 s later."""
    h = await harness(start=False)
    call_id = uuid.uuid4()
    outbound = f"{call_id}-callee"
    h.store.add_row(
        id=call_id, state="connected", inbound_channel_id="in-old", outbound_channel_id=outbound,
        bridge_id=str(call_id), answered_at=datetime.now(timezone.utc) - timedelta(seconds=59), max_call_seconds=60,
    )
    h.fake.add_channel("in-old", CALLER, POOL, state="Up", args=["inbound", POOL])
    h.fake.add_channel(outbound, POOL, "s", state="Up", args=["outbound", str(call_id)])
    h.fake.bridges[str(call_id)] = Bridge(str(call_id), channels=["in-old", outbound])
    await h.start()
    row = await h.store.ended("in-old")
    await h.settle()
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "max_duration")


# --- recorded sessions -------------------------------------------------------------------


def _recorded(h: Harness) -> Route:
    route = dataclasses.replace(h.store.add_route(CALLER, POOL, CALLEE), terms=Terms(record=True))
    h.store.routes[(CALLER, POOL)] = route
    return route


def _consent_playbacks(h: Harness, call_id: uuid.UUID, outbound: str) -> dict[str, Any]:
    plays = {r.path.rsplit("/", 1)[1]: r for r in h.fake.find("POST", re.compile(r"/ari/channels/.+/play/.+"))}
    assert set(plays) == {f"{call_id}-consent-caller", f"{call_id}-consent-callee"}
    assert plays[f"{call_id}-consent-caller"].path == f"/ari/channels/in-1/play/{call_id}-consent-caller"
    assert plays[f"{call_id}-consent-callee"].path == f"/ari/channels/{outbound}/play/{call_id}-consent-callee"
    assert all(p.query == {"media": "sound:conf-now-recording", "lang": "en"} for p in plays.values())
    return plays


async def test_a_recorded_call_is_joined_and_recorded_only_after_both_heard_the_consent_announcement(
    h: Harness,
) -> None:
    _recorded(h)
    row, outbound = await h.ringing_call()
    call_id = row["id"]
    assert row["record"] is True
    # Held apart while it rings: the caller is told it rings by signalling, not by the bridge.
    await h.fake.wait_request("POST", "/ari/channels/in-1/ring")
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel") == []

    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", re.compile(rf"/ari/channels/{outbound}/play/.+"))
    await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    answer = h.fake.find("POST", "/ari/channels/in-1/answer")[0]
    plays = _consent_playbacks(h, call_id, outbound)
    assert answer.index < plays[f"{call_id}-consent-caller"].index, "answered before it hears the announcement"
    assert (await h.store.state("in-1", "connected"))["answered_at"] is not None  # the callee's answer

    # One finished: still nobody is joined, nothing is recorded.
    await h.fake.finish_playback(f"{call_id}-consent-callee")
    await h.handled_playback_finished(f"{call_id}-consent-callee")
    await h.fake.send({"type": "ChannelDtmfReceived", "digit": "1", "channel": {"id": "in-1"}})
    await h.handled_event("ChannelDtmfReceived", "in-1")  # (events are handled in order)
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel") == []
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/record") == []
    mark = h.fake.mark()
    await h.fake.finish_playback(f"{call_id}-consent-caller")
    record = await h.fake.wait_request("POST", f"/ari/bridges/{call_id}/record", since=mark)
    assert record.query["format"] == "wav" and record.query["ifExists"] == "fail"
    assert record.query["name"] == f"maskbridge-{call_id}"
    adds = await h.fake.wait_request(
        "POST", f"/ari/bridges/{call_id}/addChannel", where=lambda r: r.query["channel"] == outbound
    )
    joined = h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel")
    assert [a.query["channel"] for a in joined] == ["in-1", outbound]
    assert all(a.index > plays[f"{call_id}-consent-caller"].index for a in joined)
    assert record.index < joined[0].index < adds.index, "the recording starts on the empty bridge"
    await h.store.wait(lambda: h.store.calls_of("recording_started", call_id), "recording_started")
    assert all(a.index > record.index for a in joined)

    # Hung up: the recording is stopped, then its size read, and stored with its length.
    await h.fake.hangup("in-1", 16)
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"]) == ("answered", "caller")
    await h.settle()
    stop = h.fake.find("POST", f"/ari/recordings/live/maskbridge-{call_id}/stop")
    destroy = h.fake.find("DELETE", f"/ari/bridges/{call_id}")
    assert stop and destroy and stop[0].index < destroy[0].index
    assert h.store.recordings[call_id]["bytes"] == 16044
    assert h.store.recordings[call_id]["duration_ms"] == 1000
    assert h.store.states[call_id] == ["routing", "ringing", "connected", "ended"]


async def test_the_other_leg_is_not_joined_while_the_first_announcement_still_plays(h: Harness) -> None:
    _recorded(h)
    row, outbound = await h.ringing_call()
    call_id = row["id"]
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    await h.fake.wait_request("POST", re.compile(rf"/ari/channels/{outbound}/play/.+"))
    await h.fake.finish_playback(f"{call_id}-consent-caller")
    # The dispatcher handed the event over, and the call did nothing with the bridge.
    await h.handled_playback_finished(f"{call_id}-consent-caller")
    await h.fake.send({"type": "ChannelDtmfReceived", "digit": "1", "channel": {"id": "in-1"}})
    await h.handled_event("ChannelDtmfReceived", "in-1")
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel") == []
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/record") == []
    await h.fake.finish_playback(f"{call_id}-consent-callee")
    await h.fake.wait_request("POST", f"/ari/bridges/{call_id}/addChannel")
    await h.fake.hangup(outbound, 16)
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"]) == ("answered", "callee")
    await h.settle()


@pytest.mark.parametrize("who", ["caller", "callee"])
async def test_a_hangup_during_the_consent_announcement_ends_the_call_unrecorded(h: Harness, who: str) -> None:
    _recorded(h)
    row, outbound = await h.ringing_call()
    call_id = row["id"]
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+"))
    await h.fake.wait_request("POST", re.compile(rf"/ari/channels/{outbound}/play/.+"))

    await h.fake.hangup("in-1" if who == "caller" else outbound, 16)
    other = outbound if who == "caller" else "in-1"
    delete = await h.fake.wait_request("DELETE", f"/ari/channels/{other}")
    assert delete.query["reason"] == "normal"
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"], ended["hangup_cause"]) == ("answered", who, 16)
    await h.settle()
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel") == []
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/record") == []
    assert call_id not in h.store.recordings
    assert h.fake.find("DELETE", f"/ari/bridges/{call_id}")


async def test_a_recording_that_fails_to_start_does_not_cost_the_call(h: Harness, logs) -> None:
    _recorded(h)
    h.fake.fail("POST", re.compile(r"/ari/bridges/.+/record"), status=500)
    h.fake.auto_finish_playback = True
    row, outbound = await h.ringing_call()
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", f"/ari/bridges/{row['id']}/addChannel",
                              where=lambda r: r.query["channel"] == outbound)
    assert any(e["event"] == "call.recording_failed" for e in logs)
    await h.fake.hangup(outbound, 16)
    assert (await h.store.ended("in-1"))["outcome"] == "answered"
    await h.settle()
    # Its row was written first, and is gone again; nothing of it is left in Asterisk.
    assert h.store.calls_of("recording_started", row["id"]) and h.store.calls_of("recording_discarded", row["id"])
    assert row["id"] not in h.store.recordings
    assert h.fake.live_recordings == {} and h.fake.stored_recordings == {}


async def test_an_unrecorded_call_is_bridged_at_once_and_hears_no_announcement(h: Harness) -> None:
    row, outbound = await h.connected_call()
    assert row["record"] is False
    adds = h.fake.find("POST", f"/ari/bridges/{row['id']}/addChannel")
    dial = h.fake.find("POST", f"/ari/channels/{outbound}/dial")[0]
    assert [a.query["channel"] for a in adds] == [f"in-1,{outbound}"] and all(a.index < dial.index for a in adds)
    await h.fake.hangup("in-1", 16)
    await h.store.ended("in-1")
    await h.settle()
    assert h.fake.find("POST", re.compile(r"/ari/channels/.+/(play|ring).*")) == []
    assert h.fake.find("POST", re.compile(r"/ari/(bridges/.+/record|recordings/.+)")) == []


async def test_a_resumed_recorded_call_finishes_its_recording(harness) -> None:
    h = await harness(start=False)
    call_id = uuid.uuid4()
    outbound = f"{call_id}-callee"
    name = f"maskbridge-{call_id}"
    h.store.add_row(id=call_id, state="connected", inbound_channel_id="in-old", outbound_channel_id=outbound,
                    bridge_id=str(call_id), answered_at=datetime.now(timezone.utc), record=True,
                    recording_name=name)
    h.store.recordings[call_id] = {"id": uuid.uuid4(), "name": name, "format": "wav", "duration_ms": None,
                                   "bytes": None}
    h.fake.add_channel("in-old", CALLER, POOL, state="Up", args=["inbound", POOL])
    h.fake.add_channel(outbound, POOL, "s", state="Up", args=["outbound", str(call_id)])
    h.fake.bridges[str(call_id)] = Bridge(str(call_id), channels=["in-old", outbound])
    h.fake.live_recordings[name] = {"name": name, "format": "wav", "state": "recording",
                                    "target_uri": f"bridge:{call_id}"}
    await h.start()
    await h.fake.wait_request("GET", f"/ari/applications/{APP}")

    await h.fake.hangup(outbound, 16)
    await h.store.ended("in-old")
    await h.settle()
    assert h.fake.find("POST", f"/ari/recordings/live/{name}/stop")
    assert h.store.recordings[call_id]["duration_ms"] == 1000
    # Resumed with its recording running: no second announcement, no second recording (the
    # one asked for was refused: the running one was taken over).
    assert h.fake.find("POST", re.compile(r"/ari/channels/.+/play/.+")) == []
    assert [r.status for r in h.fake.find("POST", f"/ari/bridges/{call_id}/record")] in ([], [422])
    assert list(h.fake.stored_recordings) == [name] and h.fake.live_recordings == {}
    assert len(h.store.calls_of("recording_started", call_id)) == 0


async def test_a_recorded_call_resumed_before_its_recording_began_hears_the_announcement_first(harness) -> None:
    """The earlier process stopped between the answer and the recording: both parties hear
    the announcement (again) before they are joined and recorded."""
    h = await harness(start=False)
    call_id = uuid.uuid4()
    outbound = f"{call_id}-callee"
    h.store.add_row(id=call_id, state="connected", inbound_channel_id="in-old", outbound_channel_id=outbound,
                    bridge_id=str(call_id), answered_at=datetime.now(timezone.utc), record=True,
                    recording_name=None)
    h.fake.add_channel("in-old", CALLER, POOL, state="Up", args=["inbound", POOL])
    h.fake.add_channel(outbound, POOL, "s", state="Up", args=["outbound", str(call_id)])
    h.fake.bridges[str(call_id)] = Bridge(str(call_id))
    await h.start()

    await h.fake.wait_request("POST", f"/ari/channels/in-old/play/{call_id}-consent-caller")
    await h.fake.wait_request("POST", f"/ari/channels/{outbound}/play/{call_id}-consent-callee")
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel") == []
    await h.fake.finish_playback(f"{call_id}-consent-caller")
    await h.fake.finish_playback(f"{call_id}-consent-callee")
    record = await h.fake.wait_request("POST", f"/ari/bridges/{call_id}/record")
    join = await h.fake.wait_request("POST", f"/ari/bridges/{call_id}/addChannel",
                                     where=lambda r: r.query["channel"] == outbound)
    assert record.index < join.index
    await h.store.wait(lambda: h.store.calls_of("recording_started", call_id), "recording_started")

    await h.fake.hangup("in-old", 16)
    assert (await h.store.ended("in-old"))["hangup_by"] == "caller"
    await h.settle()
    assert h.store.recordings[call_id]["bytes"] == 16044


# --- recorded calls across a restart of the bridge process (review fixes) ----------------


def _left_behind_recorded(h: Harness, *, recording: bool, joined: bool, live: bool = True,
                          **fields: Any) -> tuple[uuid.UUID, str, str]:
    """A recorded call an earlier process left connected: its recording row (`recording`),
    its legs in the bridge or not (`joined`), the recording running in Asterisk (`live`)."""
    call_id = uuid.uuid4()
    outbound, name = f"{call_id}-callee", f"maskbridge-{call_id}"
    route = h.store.add_route(CALLER, POOL, CALLEE, role="client")
    h.store.add_row(id=call_id, state="connected", inbound_channel_id="in-old", outbound_channel_id=outbound,
                    bridge_id=str(call_id), answered_at=datetime.now(timezone.utc), record=True,
                    recording_name=name if recording else None, caller_role="client",
                    caller_participant_id=route.caller_participant_id, callee_role="courier",
                    callee_participant_id=route.callee_participant_id, session_id=route.session_id, **fields)
    if recording:
        h.store.recordings[call_id] = {"id": uuid.uuid4(), "name": name, "format": "wav", "duration_ms": None,
                                       "bytes": None}
    h.fake.add_channel("in-old", CALLER, POOL, state="Up", args=["inbound", POOL])
    h.fake.add_channel(outbound, POOL, "s", state="Up", args=["outbound", str(call_id)])
    legs = ["in-old", outbound] if joined else []
    h.fake.bridges[str(call_id)] = Bridge(str(call_id), channels=list(legs))
    for leg in legs:
        h.fake.channels[leg].bridge_id = str(call_id)
    if live:
        h.fake.live_recordings[name] = {"name": name, "format": "wav", "state": "recording",
                                        "target_uri": f"bridge:{call_id}"}
    return call_id, outbound, name


async def test_a_recorded_call_that_ended_while_the_bridge_was_down_has_its_recording_finished(harness) -> None:
    """Finding 1: both legs went while no bridge process ran. The next process stops the
    recording, stores its size and length (the API serves it then) and destroys the bridge."""
    h = await harness(start=False)
    call_id, outbound, name = _left_behind_recorded(h, recording=True, joined=True)
    h.fake.vanish("in-old")
    h.fake.vanish(outbound)
    await h.start()

    row = await h.store.ended("in-old")
    assert (row["outcome"], row["hangup_by"]) == ("answered", "system")
    stop = h.fake.find("POST", f"/ari/recordings/live/{name}/stop")
    assert stop and stop[0].status == 204 and h.fake.live_recordings == {}
    assert h.store.recordings[call_id]["bytes"] == 16044 and h.store.recordings[call_id]["duration_ms"] == 1000
    destroy = h.fake.find("DELETE", f"/ari/bridges/{call_id}")
    assert destroy and destroy[0].status == 204 and str(call_id) not in h.fake.bridges
    assert stop[0].index < destroy[0].index


async def test_a_left_behind_recording_whose_bridge_emptied_as_it_was_stopped_is_stored(harness) -> None:
    """Asterisk answers the stop with 409 "Recording not in session" when the recording is
    closing by itself (its bridge just emptied): the next process waits until it is no longer
    live, then stores it and ends the call."""
    h = await harness(start=False)
    call_id, outbound, name = _left_behind_recorded(h, recording=True, joined=True)
    h.fake.fail("POST", f"/ari/recordings/live/{name}/stop", 409, "Recording not in session")
    h.fake.vanish("in-old")
    h.fake.vanish(outbound)
    await h.start()
    await h.fake.wait_request("GET", f"/ari/recordings/live/{name}")
    finished = h.fake.live_recordings.pop(name)  # Asterisk closes the file by itself
    h.fake.stored_recordings[name] = b"RIFF" + b"\0" * 40 + b"\0" * 16000
    row = await h.store.ended("in-old")
    assert finished is not None and row["outcome"] == "answered"
    assert h.store.recordings[call_id]["bytes"] == 16044 and h.store.recordings[call_id]["duration_ms"] == 1000


async def test_a_left_behind_recording_that_finished_already_is_still_stored(harness) -> None:
    h = await harness(start=False)
    call_id, outbound, name = _left_behind_recorded(h, recording=True, joined=True, live=False)
    h.fake.stored_recordings[name] = b"RIFF" + b"\0" * 40 + b"\0" * 32000
    h.fake.vanish("in-old")
    await h.start()

    await h.store.ended("in-old")
    assert h.fake.find("POST", f"/ari/recordings/live/{name}/stop")[0].status == 404
    assert h.store.recordings[call_id]["duration_ms"] == 2000
    assert h.fake.find("DELETE", f"/ari/channels/{outbound}")  # the leg left behind is hung up


async def test_a_recording_whose_row_cannot_be_written_is_not_made_and_does_not_cost_the_call(
    h: Harness, logs
) -> None:
    """Finding 2a: the database fails as the recording would start. The call goes on, joined;
    Asterisk records nothing (no file without a row, which retention would never delete)."""
    _recorded(h)
    h.store.recording_started_error = asyncpg.exceptions.ConnectionDoesNotExistError("connection lost")
    h.fake.auto_finish_playback = True
    row, outbound = await h.ringing_call()
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", f"/ari/bridges/{row['id']}/addChannel",
                              where=lambda r: r.query["channel"] == outbound)
    assert any(e["event"] == "call.recording_not_stored" for e in logs)
    await h.fake.press("in-1", "1")
    await h.handled_event("ChannelDtmfReceived", "in-1")
    assert h.fake.find("DELETE", "/ari/channels/in-1") == []  # still up
    await h.fake.hangup(outbound, 16)
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"]) == ("answered", "callee")
    await h.settle()
    assert h.fake.find("POST", f"/ari/bridges/{row['id']}/record") == []
    assert h.fake.live_recordings == {} and h.fake.stored_recordings == {}


async def test_a_recording_whose_start_answer_is_lost_is_stopped_and_deleted_with_its_row(h: Harness) -> None:
    """Asterisk began the recording, the bridge never heard: nothing of it may stay."""
    _recorded(h)
    h.fake.auto_finish_playback = True
    row, outbound = await h.ringing_call()
    h.fake.cut("POST", f"/ari/bridges/{row['id']}/record")
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", f"/ari/bridges/{row['id']}/addChannel",
                              where=lambda r: r.query["channel"] == outbound)
    await h.fake.hangup("in-1", 16)
    assert (await h.store.ended("in-1"))["outcome"] == "answered"
    await h.settle()
    assert h.fake.find("POST", f"/ari/bridges/{row['id']}/record")[0].status == 0  # done, answer lost
    assert h.fake.live_recordings == {} and h.fake.stored_recordings == {}
    assert row["id"] not in h.store.recordings


async def test_a_resumed_call_takes_over_the_recording_an_earlier_process_started_without_a_row(harness) -> None:
    """Finding 2b: the earlier process (writing the row after Asterisk began) stopped between
    the two. The resumed call's recording request meets the name in use: it takes the running
    recording over, writes its row, and finishes it."""
    h = await harness(start=False)
    call_id, outbound, name = _left_behind_recorded(h, recording=False, joined=False)
    h.fake.auto_finish_playback = True
    await h.start()

    record = await h.fake.wait_request("POST", f"/ari/bridges/{call_id}/record")
    assert record.status == 422  # the name is in use
    await h.fake.wait_request("POST", f"/ari/bridges/{call_id}/addChannel",
                              where=lambda r: r.query["channel"] == outbound)
    await h.fake.hangup("in-old", 16)
    assert (await h.store.ended("in-old"))["hangup_by"] == "caller"
    await h.settle()
    assert h.store.calls_of("recording_started", call_id)
    assert h.fake.find("POST", f"/ari/recordings/live/{name}/stop")[0].status == 204
    assert h.fake.live_recordings == {} and list(h.fake.stored_recordings) == [name]
    assert h.store.recordings[call_id]["bytes"] == 16044


@pytest.mark.parametrize("live", [True, False], ids=["recording_running", "recording_never_began"])
async def test_a_resumed_recorded_call_whose_legs_were_never_joined_is_joined(harness, live: bool) -> None:
    """Finding 3: the earlier process stopped after the recording's row, before both legs were
    in the bridge. The resumed call joins them (and starts the recording if Asterisk has none)."""
    h = await harness(start=False)
    call_id, outbound, name = _left_behind_recorded(h, recording=True, joined=False, live=live)
    await h.start()

    await h.fake.wait_request("POST", f"/ari/bridges/{call_id}/addChannel",
                              where=lambda r: r.query["channel"] == outbound)
    assert sorted(h.fake.bridges[str(call_id)].channels) == sorted(["in-old", outbound])
    assert list(h.fake.live_recordings) == [name]
    # No second announcement: they heard it before the row was written.
    assert h.fake.find("POST", re.compile(r"/ari/channels/.+/play/.+")) == []
    await h.fake.hangup(outbound, 16)
    await h.store.ended("in-old")
    await h.settle()
    assert h.store.recordings[call_id]["bytes"] == 16044


async def test_a_resumed_call_already_joined_is_not_joined_again(harness) -> None:
    h = await harness(start=False)
    call_id, outbound, _name = _left_behind_recorded(h, recording=True, joined=True)
    await h.start()
    await h.fake.wait_request("GET", f"/ari/bridges/{call_id}")
    await h.fake.hangup(outbound, 16)
    await h.store.ended("in-old")
    await h.settle()
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel") == []


async def test_the_client_can_still_block_on_a_resumed_call(harness) -> None:
    """Finding 4: a resumed call has the router, so the client's *9 still blocks."""
    h = await harness(start=False)
    call_id, outbound, _name = _left_behind_recorded(h, recording=True, joined=True)
    row = h.store.rows[call_id]
    await h.start()
    await h.fake.wait_request("GET", f"/ari/bridges/{call_id}")

    await h.fake.press("in-old", "*9")  # the caller is the client
    blocked = await h.store.wait(lambda: [a for op, _c, a in h.store.ops if op == "block_by_client"], "the block")
    assert blocked == [{"session_id": row["session_id"], "participant_id": row["callee_participant_id"],
                        "by": row["caller_participant_id"]}]
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    await h.fake.wait_request("POST", f"/ari/channels/in-old/play/{call_id}-blocked")
    await h.fake.finish_playback(f"{call_id}-blocked")
    ended = await h.store.ended("in-old")
    assert (ended["outcome"], ended["cut_reason"]) == ("answered", "blocked_by_client")
    await h.settle()


async def test_a_resumed_call_speaks_the_pool_numbers_language(harness) -> None:
    """Finding 4: the consent announcement replayed on a resumed call to a Russian number is
    in Russian, not in MB_DEFAULT_LANGUAGE."""
    h = await harness(start=False)
    h.store.languages[POOL] = "ru"
    call_id, outbound, _name = _left_behind_recorded(h, recording=False, joined=False, live=False)
    await h.start()

    plays = [await h.fake.wait_request("POST", f"/ari/channels/in-old/play/{call_id}-consent-caller"),
             await h.fake.wait_request("POST", f"/ari/channels/{outbound}/play/{call_id}-consent-callee")]
    assert [p.query["lang"] for p in plays] == ["ru_RU_f_IvrvoiceRU"] * 2
    await h.fake.hangup("in-old", 16)
    await h.store.ended("in-old")
    await h.settle()


# --- the called phone confirms (confirm_answer) ----------------------------------------------

CONFIRMING = FlowSettings(ring_timeout=30.0, stasis_start_timeout=2.0, announcement_timeout=5.0, confirm_wait=0.3,
                          confirm_prompts=2)


def _confirmed_route(h: Harness, **terms: Any) -> Route:
    route = dataclasses.replace(h.store.add_route(CALLER, POOL, CALLEE),
                                terms=Terms(confirm_answer=True, **terms))
    h.store.routes[(CALLER, POOL)] = route
    return route


async def _answered_and_asked(h: Harness) -> tuple[dict[str, Any], str, str]:
    """A confirm_answer call whose other phone answered and hears the first prompt."""
    _confirmed_route(h)
    row, outbound = await h.ringing_call()
    await h.fake.wait_request("POST", "/ari/channels/in-1/ring")  # held apart: ringback by signalling
    await h.fake.answer(outbound)
    prompt = await h.fake.wait_request("POST", re.compile(rf"/ari/channels/{outbound}/play/.+"))
    assert prompt.query == {"media": "sound:followme/no-recording,sound:followme/options", "lang": "en"}
    await h.store.state("in-1", "confirming")
    return row, outbound, prompt.path.rsplit("/", 1)[1]


async def test_a_call_the_other_phone_confirms_is_joined_only_once_it_pressed_1(harness) -> None:
    h = await harness(CONFIRMING)
    row, outbound, prompt = await _answered_and_asked(h)
    call_id = row["id"]
    # It answered, but the caller is not: they still hear ringback, and hear nothing of it.
    assert h.fake.find("POST", "/ari/channels/in-1/answer") == []
    assert h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel") == []
    assert h.store.rows[call_id]["answered_at"] is None
    # Keys of the caller, and other keys of the other phone, do not confirm.
    await h.fake.press("in-1", "1")
    await h.fake.press(outbound, "5")
    await h.handled_event("ChannelDtmfReceived", outbound)
    assert h.fake.find("POST", "/ari/channels/in-1/answer") == []

    await h.fake.press(outbound, "1")
    answer = await h.fake.wait_request("POST", "/ari/channels/in-1/answer")
    joined = await h.fake.wait_request("POST", f"/ari/bridges/{call_id}/addChannel",
                                       where=lambda r: r.query["channel"] == outbound)
    assert answer.index < joined.index
    assert h.fake.find("DELETE", f"/ari/playbacks/{prompt}"), "the prompt stops at the key"
    connected = await h.store.state("in-1", "connected")
    assert connected["answered_at"] is not None and connected["confirm_answer"] is True
    assert h.store.states[call_id] == ["routing", "ringing", "confirming", "connected"]
    await h.fake.hangup(outbound, 16)
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"]) == ("answered", "callee")
    await h.settle()


async def test_a_phone_that_never_presses_1_is_never_joined(harness) -> None:
    """A voicemail or answering machine: asked twice, then the call ends as not_confirmed;
    the caller was never answered (no answer, cause 19) and never joined to it."""
    h = await harness(CONFIRMING)
    row, outbound, first = await _answered_and_asked(h)
    await h.fake.finish_playback(first)
    second = await h.fake.wait_request("POST", re.compile(rf"/ari/channels/{outbound}/play/.+-confirm-2"))
    await h.fake.finish_playback(second.path.rsplit("/", 1)[1])
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason_code"] == "19"
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"], ended["hangup_cause"]) == ("not_confirmed", "system", 19)
    assert ended["answered_at"] is None
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/in-1/answer") == []
    assert h.fake.find("POST", f"/ari/bridges/{row['id']}/addChannel") == []


async def test_a_phone_that_presses_2_rejects_the_call(harness) -> None:
    h = await harness(CONFIRMING)
    _row, outbound, _prompt = await _answered_and_asked(h)
    await h.fake.press(outbound, "2")
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason_code"] == "21"
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"], ended["answered_at"]) == ("rejected", "callee", None)
    await h.settle()


@pytest.mark.parametrize("who", ["caller", "callee"])
async def test_a_hangup_while_the_other_phone_is_asked_to_confirm(harness, who: str) -> None:
    h = await harness(CONFIRMING)
    _row, outbound, _prompt = await _answered_and_asked(h)
    if who == "caller":
        await h.fake.hangup("in-1", 16)
        await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
        expected = ("caller_cancelled", "caller", None)
    else:
        await h.fake.hangup(outbound, 16)
        delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
        assert delete.query["reason_code"] == "19"
        expected = ("not_confirmed", "callee", 16)
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"], ended["hangup_cause"]) == expected
    await h.settle()


async def test_a_recorded_call_the_other_phone_confirms_hears_the_consent_after_the_key(harness) -> None:
    h = await harness(CONFIRMING)
    _confirmed_route(h, record=True)
    row, outbound = await h.ringing_call()
    await h.fake.answer(outbound)
    await h.fake.wait_request("POST", re.compile(rf"/ari/channels/{outbound}/play/.+-confirm-1"))
    assert h.fake.find("POST", re.compile(r"/ari/channels/.+/play/.+-consent-.+")) == []
    mark = h.fake.mark()
    await h.fake.press(outbound, "1")
    await h.fake.wait_request("POST", re.compile(rf"/ari/channels/{outbound}/play/.+-consent-callee"), since=mark)
    caller = await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+-consent-caller"), since=mark)
    answer = h.fake.find("POST", "/ari/channels/in-1/answer")[0]
    assert answer.index < caller.index, "answered once confirmed, then told the call is recorded"
    await h.fake.hangup("in-1", 16)
    await h.store.ended("in-1")
    await h.settle()


async def test_a_call_left_ringing_whose_other_phone_had_to_confirm_is_not_resumed_as_connected(harness) -> None:
    """Its other phone is up, but nobody knows whether it pressed 1 (a voicemail, maybe): the
    restarted bridge does not join it to the caller; it finishes the call."""
    h = await harness(start=False)
    call_id = uuid.uuid4()
    outbound = f"{call_id}-callee"
    h.store.add_row(id=call_id, state="ringing", inbound_channel_id="in-old", outbound_channel_id=outbound,
                    bridge_id=str(call_id), confirm_answer=True)
    h.fake.add_channel("in-old", CALLER, POOL, state="Ring", args=["inbound", POOL, "masked"])
    h.fake.add_channel(outbound, POOL, "s", state="Up", args=["outbound", str(call_id)])
    h.fake.bridges[str(call_id)] = Bridge(str(call_id), channels=[])
    await h.start()
    await h.fake.wait_request("DELETE", "/ari/channels/in-old")
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    ended = await h.store.ended("in-old")
    assert ended["outcome"] == "failed" and h.fake.find("POST", f"/ari/bridges/{call_id}/addChannel") == []
    await h.settle()


# --- what holds in every state ------------------------------------------------------------


@pytest.mark.parametrize(("reason", "outcome"), [("blocked", "blocked"), ("reassigned", "session_closed"),
                                                 ("session_ended", "session_closed")])
async def test_a_cut_while_it_rings_ends_with_its_own_reason(h: Harness, reason: str, outcome: str) -> None:
    row, outbound = await h.ringing_call()
    assert h.dispatcher.cut_calls({h.store.routes[(CALLER, POOL)].caller_participant_id}, reason) == 1
    await h.fake.wait_request("DELETE", f"/ari/channels/{outbound}")
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["hangup_by"], ended["cut_reason"]) == (outcome, "system", reason)
    await h.settle()


async def test_a_cut_while_the_caller_keys_the_order_code_ends_the_call(harness) -> None:
    """The order-code prompt used to drop every event but a key: a cut (a block) waited
    until the code was keyed. It is one of the rules of every state now."""
    h = await harness()
    route = h.store.add_order_code(CALLER, POOL, "123456", CALLEE)
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+-code-1"))
    await h.store.state("in-1", "entering_code")
    h.dispatcher.calls["in-1"].route = route  # (known once a code named it; here: at once)
    assert h.dispatcher.cut_calls({route.caller_participant_id}, "blocked") == 1
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query == {"reason": "normal"}
    ended = await h.store.ended("in-1")
    assert (ended["outcome"], ended["cut_reason"]) == ("blocked", "blocked")
    await h.settle()


async def test_every_change_of_state_is_logged_from_and_to(h: Harness, logs) -> None:
    row, outbound = await h.ringing_call()
    await h.fake.answer(outbound)
    await h.store.state("in-1", "connected")
    await h.fake.hangup("in-1", 16)
    await h.store.ended("in-1")
    await h.settle()
    changes = [(e["old"], e["new"]) for e in logs if e["event"] == "call.state"]
    assert changes == [("routing", "ringing"), ("ringing", "connected"), ("connected", "ended")]


async def test_a_resumed_recorded_call_answered_while_the_bridge_was_down_answers_the_caller(harness) -> None:
    """The other phone answered while no bridge process ran: the caller's leg was never
    answered. The resumed call answers it (it used to play the announcement and record a
    call the caller's phone still heard ringing)."""
    h = await harness(start=False)
    call_id, outbound, _name = _left_behind_recorded(h, recording=False, joined=False, live=False)
    h.fake.channels["in-old"].state = "Ring"
    await h.start()
    answer = await h.fake.wait_request("POST", "/ari/channels/in-old/answer")
    consent = await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-old/play/.+-consent-caller"))
    assert answer.index < consent.index
    await h.fake.hangup("in-old", 16)
    await h.store.ended("in-old")
    await h.settle()
