"""Adapts ARI events to calls: starts a MaskedCall for each new inbound channel and hands
every later event to the call that owns the channel. It only dispatches; the flow is in
flow.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import structlog

from bridge import metrics
from bridge.ari import AriClient, AriConflict, AriError, AriNotFound
from bridge.calls.events import RawEvent as Event, moment
from bridge.calls.flood import ROUTING_LIMIT, SHED_CAUSE, UnknownCallers
from bridge.calls.flow import (
    CUT_CAUSE_TO_CALLER, MASKED_ARG, CallState, FlowSettings, MaskedCall, Router, ends_pending,
    last_try_of_late_ends,
)
from bridge.calls.recording import wav_duration_ms

RECONCILE_RETRY_FIRST_WAIT = 1.0  # seconds before a reconcile the database failed is caught up with
# (doubling, up to): a caller the catch-up is to take up waits in silence until it runs, so it
# runs soon after the database is back (up to 60 s, a caller was dropped by its own network
# first: adversary, issue 14); one look every 5 s while the database is down costs nothing.
RECONCILE_RETRY_LONGEST_WAIT = 5.0
RECORDING_CLOSE_TIMEOUT = 5.0  # seconds a stopped recording left behind may take to close its file

log = structlog.get_logger(__name__)


def _channel_ids(event: Event) -> list[str]:
    ids: list[str] = []
    for key in ("channel", "peer"):
        value = event.get(key)
        if isinstance(value, dict) and "id" in value:
            ids.append(value["id"])
    for key in ("playback", "recording"):
        value = event.get(key)
        if isinstance(value, dict):
            target = str(value.get("target_uri", ""))
            if target.startswith("channel:"):
                ids.append(target.split(":", 1)[1])
            elif target.startswith("bridge:"):
                ids.append(target)  # a call registers its bridge as "bridge:<id>"
    return ids


class StasisDispatcher:
    def __init__(self, ari: AriClient, store: Any, settings: FlowSettings, router: Router,
                 unknown_callers: UnknownCallers | None = None) -> None:
        self.ari = ari
        self.store = store
        self.router = router
        self.settings = settings
        self.calls: dict[str, MaskedCall] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut: dict[uuid.UUID, tuple[float, str]] = {}  # participant id -> when its calls were cut, and why
        self.unknown_callers = unknown_callers or UnknownCallers(0, 0)
        self._routing: set[MaskedCall] = set()  # new calls not past their route lookup yet (at most ROUTING_LIMIT)
        self._left_behind = asyncio.Lock()  # one look at the calls left in the database at a time
        self._reading_rows = False  # a look at them is reading the rows now
        self._ended_while_read: set[uuid.UUID] = set()  # calls of this process that ended meanwhile
        self._catching_up: asyncio.Task[None] | None = None

    def _register(self, channel_id: str, call: MaskedCall) -> None:
        self.calls[channel_id] = call

    def _start(self, call: MaskedCall, resumed: bool = False) -> None:
        # A new call's other leg is registered by the flow once it creates it; a resumed
        # call's legs both exist already.
        for key in call.keys() if resumed else [call.inbound_id]:
            self.calls[key] = call
        task = asyncio.create_task(call.run_resumed() if resumed else call.run(), name=f"call-{call.id}")
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if self._reading_rows:
                self._ended_while_read.add(call.id)
            for key in call.keys():
                if self.calls.get(key) is call:
                    del self.calls[key]

        task.add_done_callback(done)

    async def handle(self, event: Event) -> None:
        """Called for every event, in the order Asterisk sent them."""
        if event.get("type") == "StasisStart":
            args = event.get("args") or []
            channel = event["channel"]
            if args[:1] == ["inbound"] and channel["id"] not in self.calls:
                if self._too_many_routing():
                    self._shed(channel["id"])
                    return
                dialed = args[1] if len(args) > 1 else channel.get("dialplan", {}).get("exten", "")
                call = MaskedCall(
                    uuid.uuid4(), channel, dialed, self.ari, self.store, self.settings, self._register, self.router,
                    self.recently_cut, masked=MASKED_ARG in args[2:], unknown_callers=self.unknown_callers.admit,
                )
                self._routing.add(call)
                self._start(call)
                return
        for channel_id in _channel_ids(event):
            owner = self.calls.get(channel_id)
            if owner is not None:
                owner.feed(event)
                return

    def _too_many_routing(self) -> bool:
        """Whether ROUTING_LIMIT calls are waiting for their route lookup (the database)."""
        if len(self._routing) >= ROUTING_LIMIT:
            self._routing = {call for call in self._routing if call.state is CallState.ROUTING}
        return len(self._routing) >= ROUTING_LIMIT

    def _shed(self, channel_id: str) -> None:
        """A new call beyond ROUTING_LIMIT: hung up unanswered at once (SIP 503), with no
        call object, no row and no lookup. (In a task of its own: the event stream does not
        wait for ARI.)"""
        metrics.CALLS_SHED.inc()
        log.warning("call.shed", routing=len(self._routing))

        async def hang_up() -> None:
            try:
                await self.ari.hangup(channel_id, code=SHED_CAUSE)
            except AriError:
                pass  # gone already

        task = asyncio.create_task(hang_up(), name=f"shed-{channel_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reconcile(self) -> None:
        """After (re)connecting: channels that vanished while the socket was down end their
        calls; calls an earlier bridge process left behind are resumed or finished."""
        ours = set(self.calls)
        try:
            live = set((await self.ari.application()).get("channel_ids", []))
        except AriNotFound:
            # The application is not registered: this connection delivers nothing (the event
            # stream connects again).
            log.warning("reconcile.application_missing", app=self.ari.app)
            raise
        except AriError as exc:
            log.warning("reconcile.failed", error=str(exc))
            return
        restarted = await self._pbx_restarted()
        states = await self._channel_states() if self.calls else {}
        if restarted and self.calls:
            log.warning("reconcile.pbx_restarted", calls=len(set(self.calls.values())))
        for call in set(self.calls.values()):
            for channel_id in call.channel_ids():
                if self.calls.get(channel_id) is not call:
                    continue
                if channel_id not in live:
                    call.feed({"type": "ChannelDestroyed", "channel": {"id": channel_id}, "reconciled": True,
                               "pbx_lost": restarted, "lost_at": self.ari.lost_at if restarted else None})
                elif states.get(channel_id) in ("Ringing", "Up"):
                    # An answer (or ringing) while the socket was down: its event was sent to
                    # nobody, and a call answered meanwhile must not be taken for one that still
                    # rings (cut at the ring timeout, or ended as the caller's, while both talk).
                    # (A call that knew it already makes nothing of it.)
                    call.feed({"type": "ChannelStateChange", "reconciled": True,
                               "channel": {"id": channel_id, "state": states[channel_id]}})
        try:
            await self._reconcile_with_store(live, ours)
        except Exception:
            # A database hiccup must not cost the event stream: the calls left in the database
            # are looked at again until it answers (a bridge started while it stalled left them
            # open until the next reconnect: adversary, issue 14).
            log.exception("reconcile.store_failed")
            self._catch_up_later()

    def _catch_up_later(self) -> None:
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.create_task(self._catch_up(), name="reconcile-catch-up")

    async def _catch_up(self) -> None:
        """What a reconcile the database failed did not (all of its database part: a caller
        that came in while the event stream was down is taken up here too, not left in
        silence until the next reconnect), every RECONCILE_RETRY_FIRST_WAIT seconds,
        doubling, until it can."""
        wait = RECONCILE_RETRY_FIRST_WAIT
        while True:
            await asyncio.sleep(wait)  # the database did not answer: give it time
            try:
                ours = set(self.calls)
                await self._reconcile_with_store(set((await self.ari.application()).get("channel_ids", [])), ours)
            except Exception as exc:  # noqa: BLE001 - said, and tried again
                log.warning("reconcile.store_failed_again", error=type(exc).__name__)
                wait = min(wait * 2, RECONCILE_RETRY_LONGEST_WAIT)
                continue
            log.info("reconcile.caught_up")
            return

    async def _reconcile_with_store(self, live: set[str], ours: set[str]) -> None:
        """The part of a reconcile that needs the database, the same after a (re)connection
        and in a catch-up (`live`: the application's channels; `ours`: the channels this
        process's calls held just before they were read). The calls left in the database are
        resumed or finished; callers in the application that no row and no call of ours names
        are taken up (only once every row was read; and not a channel of a call of ours that
        ended meanwhile: in a catch-up, calls come and go while the rows are read); bridges
        left empty are destroyed; and what changed while no bridge listened (a block, a
        courier reassigned, a session closed with maskbridge-admin while this process was
        down) reaches the calls it has just resumed: their NOTIFY was sent to nobody."""
        owned = await self._finish_left_behind(live)
        await self._adopt_orphans(live - owned - ours)
        await self._destroy_left_bridges()
        await self.cut_departed()

    async def _pbx_restarted(self) -> bool:
        """Whether Asterisk was started again since the last connection (its startup time
        changed): then the calls' vanished channels went with it, nobody hung them up. False
        at the first connection, and when Asterisk does not say."""
        try:
            started = await self.ari.startup_time()
        except AriError as exc:
            log.warning("reconcile.startup_time_unread", error=str(exc))
            return False
        if started is None:
            return False
        restarted = self.ari.restarted(started)
        self.ari.connected_startup_time = started
        return restarted

    async def _channel_states(self) -> dict[str, str]:
        """Each channel's state as Asterisk says it now (one request; none if it fails: then
        only vanished channels are caught up with)."""
        try:
            return {str(c.get("id")): str(c.get("state")) for c in await self.ari.list_channels()
                    if isinstance(c, dict)}
        except AriError as exc:
            log.warning("reconcile.channel_states_unread", error=str(exc))
            return {}

    async def _finish_left_behind(self, live: set[str]) -> set[str]:
        """Calls an earlier bridge process left in the database: resume or finish them.
        Returns the channels of every call this process knows of now."""
        async with self._left_behind:  # (a reconnect's and a catch-up's: one resumes a call, once)
            return await self._finish_left_behind_now(live)

    async def _finish_left_behind_now(self, live: set[str]) -> set[str]:
        owned = set(self.calls)
        pbx_started = moment(self.ari.connected_startup_time)
        # The rows of this process's own calls are not left behind: those it had when the
        # rows were asked for, those that ended while they were read, and those that began
        # meanwhile (a catch-up runs while calls come and go: a call whose row was written
        # before the read was taken for one left behind, its bridge destroyed and its row
        # ended while both phones talked on: adversary, issue 14).
        known = {c.id for c in self.calls.values()} | ends_pending()
        self._reading_rows, self._ended_while_read = True, set()
        try:
            rows = await self.store.active_calls()
        finally:
            self._reading_rows = False
        known |= {c.id for c in self.calls.values()} | self._ended_while_read | ends_pending()
        self._ended_while_read = set()
        for row in rows:
            if row["id"] in known:
                continue
            # (A process stopped while the other leg and the bridge were being made left a row
            # that may not name them yet: they are named after the call, as the flow names them.)
            row = {**row, "outbound_channel_id": row["outbound_channel_id"] or MaskedCall.outbound_of(row["id"]),
                   "bridge_id": row["bridge_id"] or MaskedCall.bridge_of(row["id"])}
            inbound, outbound = row["inbound_channel_id"], row["outbound_channel_id"]
            # A call that never got past its route lookup, its caller still waiting: the caller
            # is taken up as a new call below (looked up again, a row of its own), not hung up:
            # nothing was rung (a process killed while Postgres held its lookup's row, which
            # committed after it died; or while the write that takes the row to ringing waited,
            # its other leg made but not dialed: the dial waits for that write. Adversary, issue
            # 14). This row is finished as the system's failure, and its undialed leg hung up,
            # as any other left behind.
            again = (row["state"] == "routing" and inbound in live and not row["answered_at"]
                     and inbound not in self.calls and await self._never_dialed(outbound, live))
            owned.update((outbound,) if again else (inbound, outbound))
            if await self._talking(row, live):
                call = MaskedCall.resume_connected(
                    row, self.ari, self.store, self.settings, self._register, router=self.router,
                    language=await self._language_of(row["pool_number"]),
                )
                self._start(call, resumed=True)
                await self._gone_meanwhile(call, (inbound, outbound))
                continue
            for channel_id in (inbound, outbound):
                # (Not a leg a call of this process holds: a stale row's channel may be one
                # this process took up since, as an orphan; nor a caller taken up again.)
                if channel_id and channel_id in live and channel_id not in self.calls and not (
                        again and channel_id == inbound):
                    try:
                        # (The caller of an unanswered call hears "unavailable", not "declined".)
                        await self.ari.hangup(channel_id, code=CUT_CAUSE_TO_CALLER if channel_id == inbound else None)
                    except AriError:
                        pass
            # Before the row says ended (a failure here is retried at the next reconcile):
            # its recording is finished and its bridge destroyed, as the call would have.
            if row.get("recording_name"):
                await self._finish_recording_left_behind(row["id"], row["recording_name"])
            if row.get("bridge_id"):
                try:
                    await self.ari.destroy_bridge(row["bridge_id"])
                except AriError:
                    pass  # gone already
            outcome, ended_at = ("answered" if row["answered_at"] else "failed"), None
            if pbx_started is not None and row["started_at"] < pbx_started:
                # Its Asterisk was started after the call (a bridge killed with its Asterisk,
                # say): the call went down with the one before, no later than this one started,
                # and nobody hung it up.
                outcome, ended_at = "node_lost", pbx_started
            if not await self.store.call_ended(row["id"], outcome, "system", None, ended_at=ended_at):
                # Ended since it was read: by the end statement of a process stopped (killed)
                # while Postgres held it behind a lock, say. That end stands, counted once.
                log.info("reconcile.stale_call_ended_meanwhile", call_id=str(row["id"]))
                continue
            metrics.CALLS.labels(outcome, metrics.direction(row.get("caller_role"), row.get("callee_role"))).inc()
            log.info("reconcile.finished_stale_call", call_id=str(row["id"]), outcome=outcome)
        return owned

    async def _never_dialed(self, outbound: str, live: set[str]) -> bool:
        """Whether a call's other leg was never dialed: not made, or made and still Down."""
        if outbound not in live:
            return True
        try:
            return (await self.ari.get_channel(outbound)).get("state") == "Down"
        except AriNotFound:
            return True
        except AriError:
            return False  # (not known: the caller is not rung a second time)

    async def _gone_meanwhile(self, call: MaskedCall, channel_ids: tuple[str, ...]) -> None:
        """A call just taken up (resumed, or a caller adopted) whose leg went while it was
        being taken up: the leg's end came before the call was there to be told (a catch-up
        runs while events are read; a caller hanging up during its read was resumed onto a
        dead leg, the other phone left in silence: adversary, issue 14). Asked once the call
        is registered: an end after that reaches it as any event."""
        for channel_id in channel_ids:
            try:
                await self.ari.get_channel(channel_id)
            except AriNotFound:
                call.feed({"type": "ChannelDestroyed", "channel": {"id": channel_id}, "reconciled": True})
            except AriError:
                pass  # (Asterisk did not say: its events will)

    async def _destroy_left_bridges(self) -> None:
        """A call's bridge (named "call-<id>") that holds no channel and no call of this process
        holds: left by a call that ended while Asterisk did not answer (frozen: the bridge's
        destruction timed out with it), or by a process stopped once its call had ended.
        Nothing else would ever remove it."""
        try:
            bridges = await self.ari.list_bridges()
        except AriError as exc:
            log.warning("reconcile.bridges_unread", error=str(exc))
            return
        held = {call.bridge_id for call in set(self.calls.values())}
        for bridge in bridges:
            if not isinstance(bridge, dict) or bridge.get("channels"):
                continue
            bridge_id = str(bridge.get("id"))
            if bridge_id in held or not str(bridge.get("name") or "").startswith("call-"):
                continue
            try:
                await self.ari.destroy_bridge(bridge_id)
            except AriError:
                continue  # gone meanwhile
            log.info("reconcile.left_bridge_destroyed", bridge_id=bridge_id)

    async def _adopt_orphans(self, orphans: set[str]) -> None:
        """Channels in the application that no call row names: a caller whose call an earlier
        process took in but stopped before writing its row (it hears nothing until someone
        acts), or one that came in while the event stream was down. A caller's leg is taken
        up as a new call (its StasisStart, if still on its way, then finds it taken); anything
        else is hung up."""
        for channel_id in sorted(orphans):
            if channel_id in self.calls:
                continue
            try:
                channel = await self.ari.get_channel(channel_id)
            except AriError:
                continue  # gone meanwhile
            app_data = str((channel.get("dialplan") or {}).get("app_data") or "")
            args = app_data.split(",")
            if args[:1] == [self.ari.app]:
                args = args[1:]
            if args[:1] == ["inbound"]:
                log.info("reconcile.adopted_caller")
                await self.handle({"type": "StasisStart", "args": args, "channel": channel})
                if (call := self.calls.get(channel_id)) is not None:
                    await self._gone_meanwhile(call, (channel_id,))
                continue
            log.info("reconcile.orphan_hung_up")
            try:
                await self.ari.hangup(channel_id)
            except AriError:
                pass

    async def _language_of(self, pool_number: str) -> str | None:
        """The pool number's announcement language, for a resumed call (None: the default)."""
        try:
            language: str | None = await self.store.pool_language(pool_number)
        except Exception:
            log.exception("reconcile.language_unknown")
            return None
        return language

    async def _finish_recording_left_behind(self, call_id: uuid.UUID, name: str) -> None:
        """The recording of a call that ended while no bridge process ran: stopped in
        Asterisk (it would run on), and its size and length stored (the API serves it then)."""
        try:
            await self.ari.stop_recording(name)
        except (AriNotFound, AriConflict):
            pass  # finished already, or finishing (409 "not in session": its bridge emptied)
        # Its file is complete once Asterisk no longer lists it as live.
        deadline = time.monotonic() + RECORDING_CLOSE_TIMEOUT
        while time.monotonic() < deadline:
            try:
                await self.ari.live_recording(name)
            except AriNotFound:
                break
            except AriError:
                break  # the size read below says what there is
            await asyncio.sleep(0.1)  # polling Asterisk: this runs once per left-behind recording
        size: int | None = None
        try:
            size = await self.ari.stored_recording_size(name)
        except AriError as exc:
            log.warning("reconcile.recording_unreadable", call_id=str(call_id), error=str(exc))
        duration_ms = wav_duration_ms(size) if size is not None else None
        await self.store.recording_finished(call_id, duration_ms, size)
        log.info("reconcile.recording_finished", call_id=str(call_id), recording=name, bytes=size,
                 duration_ms=duration_ms)

    async def _talking(self, row: dict[str, Any], live: set[str]) -> bool:
        """Whether both legs of a call left behind are still there and answered. A call
        stopped between the answer and its database write says ringing but is up; unless
        its other phone had to confirm (confirm_answer): nobody knows it did, so the call is
        not put through (it is finished, as one left confirming is)."""
        inbound, outbound = row["inbound_channel_id"], row["outbound_channel_id"]
        if row["state"] not in ("ringing", "connected") or inbound not in live or outbound not in live:
            return False
        if row["state"] == "ringing" and row.get("confirm_answer"):
            return False
        if row["state"] == "ringing":
            try:
                if (await self.ari.get_channel(outbound)).get("state") != "Up":
                    return False
            except AriError:
                return False
            await self.store.call_connected(row["id"])
        return True

    def recently_cut(self, participant_ids: set[uuid.UUID], since: float) -> str | None:
        """The reason of a cut of one of these participants applied at or after `since`
        (monotonic): a call whose route lookup began before the change was committed (a
        block, a courier reassigned, a session ended) must not go on to ring. (A change
        committed earlier was seen by the lookup itself.)"""
        horizon = time.monotonic() - 60
        # (Oldest first: cut_calls moves a participant cut again to the end.)
        while self._cut:
            pid, (at, _reason) = next(iter(self._cut.items()))
            if at >= horizon:
                break
            del self._cut[pid]
        for pid in participant_ids:
            at, reason = self._cut.get(pid, (-1.0, ""))
            if at >= since:
                return reason
        return None

    def call_states(self) -> list[str]:
        """The state of each call in progress (for the metrics)."""
        return [call.state.value for call in set(self.calls.values())]

    def live_participant_ids(self) -> set[uuid.UUID]:
        return {pid for call in self.calls.values() for pid in call.participant_ids}

    async def end_reaped(self) -> None:
        """After a silence long enough for another node to give this one up (its heartbeat
        stopped: the bridge frozen, or cut off from the database): the calls whose rows that
        node's reaper ended (node_lost) are hung up. Their phones were still up; the rows stay
        as written."""
        live = {call.id: call for call in set(self.calls.values())}
        if not live:
            return
        for call_id in await self.store.ended_calls(list(live)):
            live[call_id].reaped()

    async def cut_departed(self) -> None:
        """End the calls of participants who are blocked or have left their order, as the
        database says now (for what may have been missed: notifications sent while no bridge
        listened, or while the listener reconnected)."""
        live = self.live_participant_ids()
        if not live:
            return
        self.cut_calls(await self.store.blocklist.blocked_among(live), "blocked")
        for participant, reason in (await self.store.sessions.left_among(live)).items():
            self.cut_calls({participant}, reason)

    def cut_calls(self, participant_ids: set[uuid.UUID], reason: str) -> int:
        """End every call one of these participants is on; returns how many. (A client's
        call to support in a grace period is not ended by the session's end: support is no
        participant.)"""
        now = time.monotonic()
        for pid in participant_ids:
            self._cut.pop(pid, None)
            self._cut[pid] = (now, reason)
        calls = {call for call in self.calls.values() if call.participant_ids & participant_ids
                 and not (reason == "session_ended" and call.route is not None and call.route.callee_role == "support")}
        for call in calls:
            call.cut(reason)
        if calls:
            log.info("calls.cut", calls=len(calls), reason=reason)
        return len(calls)

    async def shutdown(self) -> None:
        if self._catching_up is not None:
            self._catching_up.cancel()
            await asyncio.gather(self._catching_up, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await last_try_of_late_ends()
