"""A scripted fake of the Asterisk REST Interface, for unit tests of the call flow.

A real aiohttp HTTP + websocket server on 127.0.0.1 (random port) that implements the part
of ARI that bridge/ari uses. It keeps a small model of channels and bridges, answers 404 for
unknown ones like Asterisk does, records every request, and lets the test script the events
Asterisk would send:

    fake = AriFake()
    await fake.start()
    await fake.inbound_call("in-1", "+79161234567", "+74950001122")   # StasisStart
    create = await fake.wait_request("POST", "/ari/channels/create")
    await fake.answer(create.query["channelId"])                         # ChannelStateChange Up
    await fake.hangup("in-1")                                            # HangupRequest, StasisEnd, Destroyed

Requests the bridge makes have their consequences as in Asterisk: /channels/create emits
StasisStart for the new channel (unless `auto_stasis_start` is False: then it is held until
`release_stasis_start`), DELETE /channels/{id} emits ChannelHangupRequest, StasisEnd and
ChannelDestroyed with the cause of the reason, /play emits PlaybackStarted (and
PlaybackFinished when `auto_finish_playback`).

Waiting is on conditions with timeouts, never on sleeps: `wait_request`, `wait_connected`,
`wait_disconnected`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
from aiohttp import web

# AST_SOFTHANGUP_* reasons: the "cause" of a soft hangup request (channel.h)
SOFTHANGUP_SHUTDOWN = 1 << 2
SOFTHANGUP_APPUNLOAD = 1 << 4
SOFTHANGUP_EXPLICIT = 1 << 5

# DELETE /channels/{id}?reason= -> the hangup cause Asterisk gives the channel
# (res/ari/resource_channels.c).
HANGUP_REASONS: dict[str, int] = {
    "normal": 16,
    "busy": 17,
    "congestion": 34,
    "no_answer": 19,
    "timeout": 18,
    "rejected": 21,
    "unallocated": 1,
    "normal_unspecified": 31,
    "number_incomplete": 28,
    "codec_mismatch": 58,
    "interworking": 127,
    "failure": 38,
    "answered_elsewhere": 26,
}

CAUSE_TEXT: dict[int, str] = {
    0: "Unknown",
    1: "Unallocated (unassigned) number",
    16: "Normal Clearing",
    17: "User busy",
    18: "No user responding",
    19: "User alerting, no answer",
    21: "Call Rejected",
    26: "Answered elsewhere",
    28: "Invalid number format (incomplete number)",
    31: "Normal, unspecified",
    34: "Circuit/channel congestion",
    38: "Network out of order",
    58: "Bearer capability not available",
    127: "Interworking, unspecified",
}

DEFAULT_TIMEOUT = 10.0  # only a guard against hangs: waits end on the condition


@dataclass
class Request:
    """One HTTP request the fake received. `status` is set once it has been handled."""

    index: int
    method: str
    path: str  # the full path, e.g. /ari/channels/create
    query: dict[str, str]
    body: Any
    status: int | None = None

    def text(self) -> str:
        """Everything the client sent, as one string (for 'does X appear anywhere')."""
        return " ".join([self.method, self.path, json.dumps(self.query), json.dumps(self.body)])


@dataclass
class Channel:
    id: str
    name: str
    state: str = "Down"
    caller_number: str = ""
    caller_name: str = ""
    exten: str = ""
    context: str = "from-trunk"
    variables: dict[str, str] = field(default_factory=dict)
    in_stasis: bool = False
    args: list[str] = field(default_factory=list)
    dialed: bool = False
    bridge_id: str | None = None
    endpoint: str | None = None

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "protocol_id": "",
            "caller": {"name": self.caller_name, "number": self.caller_number},
            "connected": {"name": "", "number": ""},
            "accountcode": "",
            "dialplan": {
                "context": self.context,
                "exten": self.exten,
                "priority": 2,
                "app_name": "Stasis",
                "app_data": ",".join(self.args),
            },
            "creationtime": _now(),
            "language": "en",
        }


@dataclass
class Bridge:
    id: str
    name: str = ""
    bridge_type: str = "mixing"
    channels: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "technology": "simple_bridge",
            "bridge_type": self.bridge_type,
            "bridge_class": "stasis",
            "creator": "Stasis",
            "name": self.name,
            "channels": list(self.channels),
            "creationtime": _now(),
            "video_mode": "talker",
        }


@dataclass
class Failure:
    method: str
    path: str | re.Pattern[str]
    status: int
    message: str
    times: int | None  # None: for ever

    def matches(self, method: str, path: str) -> bool:
        if method != self.method:
            return False
        if isinstance(self.path, re.Pattern):
            return self.path.fullmatch(path) is not None
        return self.path == path


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


class AriFake:
    def __init__(self, app: str = "maskbridge", user: str = "bridge", password: str = "secret") -> None:
        self.app = app
        self.user = user
        self.password = password
        self.channels: dict[str, Channel] = {}
        self.bridges: dict[str, Bridge] = {}
        self.requests: list[Request] = []
        self.sent_events: list[dict[str, Any]] = []
        self.lost_events: list[dict[str, Any]] = []  # sent while no socket was connected
        self.auto_stasis_start = True
        self.auto_finish_playback = False
        self.ring_on_dial = True
        self.held_stasis_starts: dict[str, dict[str, Any]] = {}
        self.playbacks: dict[str, dict[str, Any]] = {}
        self.live_recordings: dict[str, dict[str, Any]] = {}  # name -> LiveRecording
        self.stored_recordings: dict[str, bytes] = {}  # name -> the file Asterisk would serve
        self.refuse_websocket = False
        self.connects = 0  # websockets accepted so far
        self.connect_times: list[float] = []  # when each was accepted (monotonic)
        self.close_at_once = False  # accept each websocket, then close it at once (a sick Asterisk)
        self.app_registered = True  # False: GET /applications/<app> answers 404 (an Asterisk that lost it)
        self.startup_time = "2026-12-01T08:00:00.000+0000"  # GET /asterisk/info: when this "Asterisk" started
        self.events_allowed: set[str] | None = None  # PUT /applications/<app>/eventFilter: only these are sent
        self.filtered_events: list[dict[str, Any]] = []
        self._failures: list[Failure] = []
        self._cuts: list[tuple[str, str]] = []
        self._sockets: set[web.WebSocketResponse] = set()
        self._changed = asyncio.Condition()
        self._send_lock = asyncio.Lock()
        self._names = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # --- server --------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/ari/events", self._events)
        r.add_post("/ari/channels/create", self._create_channel)
        r.add_get("/ari/channels", self._list_channels)
        r.add_get("/ari/channels/{id}", self._get_channel)
        r.add_delete("/ari/channels/{id}", self._delete_channel)
        r.add_post("/ari/channels/{id}/dial", self._dial)
        r.add_post("/ari/channels/{id}/answer", self._answer)
        r.add_post("/ari/channels/{id}/ring", self._ring)
        r.add_post("/ari/channels/{id}/variable", self._set_variable)
        r.add_post("/ari/channels/{id}/play", self._play)
        r.add_post("/ari/channels/{id}/play/{playback}", self._play)
        r.add_get("/ari/bridges", self._list_bridges)
        r.add_post("/ari/bridges/{id}", self._create_bridge)
        r.add_get("/ari/bridges/{id}", self._get_bridge)
        r.add_post("/ari/bridges/{id}/addChannel", self._add_channel)
        r.add_delete("/ari/bridges/{id}", self._destroy_bridge)
        r.add_post("/ari/bridges/{id}/record", self._record_bridge)
        r.add_post("/ari/recordings/live/{name}/stop", self._stop_recording)
        r.add_get("/ari/recordings/live/{name}", self._live_recording)
        r.add_get("/ari/recordings/stored/{name}", self._stored_recording)
        r.add_get("/ari/recordings/stored/{name}/file", self._stored_recording_file)
        r.add_delete("/ari/recordings/stored/{name}", self._delete_stored_recording)
        r.add_delete("/ari/playbacks/{id}", self._stop_playback)
        r.add_get("/ari/applications/{app}", self._application)
        r.add_get("/ari/asterisk/info", self._info)
        r.add_put("/ari/applications/{app}/eventFilter", self._event_filter)
        r.add_route("*", "/{tail:.*}", self._not_implemented)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        async with self._changed:
            try:
                return await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"ARI fake: timed out after {timeout}s waiting for {what}") from None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            text = await request.text()
            if text:
                try:
                    body = json.loads(text)
                except ValueError:
                    body = text
        record = Request(len(self.requests), request.method, request.path, dict(request.query), body)
        self.requests.append(record)
        try:
            expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            if request.headers.get("Authorization") != expected:
                response: web.StreamResponse = _error(401, "Authentication required")
            elif (failure := self._failure_for(request.method, request.path)) is not None:
                response = _error(failure.status, failure.message)
            else:
                response = await handler(request)
            record.status = response.status
            if (request.method, request.path) in self._cuts:
                self._cuts.remove((request.method, request.path))
                record.status = 0
                assert request.transport is not None
                request.transport.close()  # done, but the answer is lost
            return response
        except web.HTTPException as exc:
            record.status = exc.status
            raise
        finally:
            if record.status is None:
                record.status = 500
            await self._notify()

    def _failure_for(self, method: str, path: str) -> Failure | None:
        for failure in self._failures:
            if failure.matches(method, path):
                if failure.times is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        self._failures.remove(failure)
                return failure
        return None

    # --- scripting: requests ---------------------------------------------------------

    def fail(
        self,
        method: str,
        path: str | re.Pattern[str],
        status: int = 500,
        message: str = "Internal Server Error",
        times: int | None = 1,
    ) -> None:
        """Answer the next `times` matching requests (None: all of them) with an error."""
        self._failures.append(Failure(method, path, status, message, times))

    def clear_failures(self) -> None:
        """Answer every request again (the failures set with fail() are forgotten)."""
        self._failures.clear()

    def cut(self, method: str, path: str) -> None:
        """Carry out the next matching request, then drop the connection without an answer:
        Asterisk did it, the bridge never heard (its request fails with a client error)."""
        self._cuts.append((method, path))

    def mark(self) -> int:
        """A position in the request log, for `wait_request(..., since=mark)`."""
        return len(self.requests)

    def find(
        self,
        method: str,
        path: str | re.Pattern[str],
        where: Callable[[Request], bool] | None = None,
        since: int = 0,
    ) -> list[Request]:
        """Handled requests matching method and path (exact, or a regex), in arrival order."""
        out = []
        for req in self.requests[since:]:
            if req.status is None or req.method != method:
                continue
            if isinstance(path, re.Pattern):
                if path.fullmatch(req.path) is None:
                    continue
            elif req.path != path:
                continue
            if where is None or where(req):
                out.append(req)
        return out

    async def wait_request(
        self,
        method: str,
        path: str | re.Pattern[str],
        where: Callable[[Request], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Request:
        """The first matching request once it has arrived and been handled."""
        found = await self._wait(
            lambda: self.find(method, path, where, since), timeout, f"{method} {getattr(path, 'pattern', path)}"
        )
        return found[0]

    # --- scripting: websocket --------------------------------------------------------

    async def wait_connected(self, connects: int = 1, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Until `connects` websockets in all have been accepted and one is open."""
        await self._wait(lambda: self.connects >= connects and self._sockets, timeout, f"websocket #{connects}")

    async def wait_disconnected(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        await self._wait(lambda: not self._sockets, timeout, "the websocket to close")

    async def drop(self, refuse: bool = True) -> None:
        """Close the event websocket(s) from the server side. With `refuse`, new connections
        are turned away (503) until `accept()`, so the test can change the world while the
        bridge is blind."""
        self.refuse_websocket = refuse
        dropped = list(self._sockets)
        for ws in dropped:
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"asterisk restarting")
        # Only these: without `refuse` the bridge may already be back on a new socket.
        await self._wait(
            lambda: not any(ws in self._sockets for ws in dropped), DEFAULT_TIMEOUT, "the websocket to close"
        )

    def accept(self) -> None:
        self.refuse_websocket = False

    async def send(self, *events: dict[str, Any]) -> None:
        """Send events, in order, to every connected websocket (as Asterisk would)."""
        async with self._send_lock:
            for event in events:
                full = {
                    "timestamp": _now(),
                    "application": self.app,
                    "asterisk_id": "02:42:ac:11:00:02",
                    **event,
                }
                self.sent_events.append(full)
                if self.events_allowed is not None and full.get("type") not in self.events_allowed:
                    self.filtered_events.append(full)  # (Asterisk's event filter: never sent)
                    continue
                if not self._sockets:
                    self.lost_events.append(full)
                for ws in list(self._sockets):
                    if not ws.closed:
                        await ws.send_str(json.dumps(full))

    # --- scripting: the world outside ----------------------------------------------

    def add_channel(
        self,
        channel_id: str,
        caller_number: str = "",
        exten: str = "",
        *,
        state: str = "Ring",
        in_stasis: bool = True,
        args: Iterable[str] = (),
    ) -> Channel:
        """Put a channel in the model without any event (e.g. left over from before)."""
        channel = Channel(
            id=channel_id,
            name=f"PJSIP/trunk-{next(self._names):08x}",
            state=state,
            caller_number=caller_number,
            exten=exten,
            in_stasis=in_stasis,
            args=list(args),
        )
        self.channels[channel_id] = channel
        return channel

    async def inbound_call(self, channel_id: str, caller_number: str, dialed: str) -> Channel:
        """A call from the trunk reaches Stasis(app,inbound,${DIALED}), as in extensions.conf."""
        channel = self.add_channel(channel_id, caller_number, dialed, args=["inbound", dialed, "masked"])
        await self.send({"type": "StasisStart", "args": list(channel.args), "channel": channel.json()})
        return channel

    async def answer(self, channel_id: str) -> None:
        """The phone at the far end of this channel answered."""
        channel = self.channels.get(channel_id)
        if channel is None:
            # The answer crossed the hangup on the wire: Asterisk still reports it.
            await self.send({"type": "ChannelStateChange", "channel": {"id": channel_id, "state": "Up"}})
            return
        channel.state = "Up"
        events: list[dict[str, Any]] = [{"type": "ChannelStateChange", "channel": channel.json()}]
        if channel.dialed:
            events.append({"type": "Dial", "peer": channel.json(), "dialstatus": "ANSWER", "dialstring": ""})
        await self.send(*events)

    async def hangup(self, channel_id: str, cause: int = 16) -> None:
        """The far end of this channel hung up (or refused, by cause)."""
        await self._destroy(self.channels[channel_id], cause)

    def vanish(self, channel_id: str) -> None:
        """The channel disappears without a word (its events were lost with the socket)."""
        channel = self.channels.pop(channel_id)
        if channel.bridge_id in self.bridges:
            self.bridges[channel.bridge_id].channels.remove(channel_id)

    def restart(self) -> None:
        """Asterisk killed and started again (the socket must be down): every channel and
        bridge gone without a word, a new startup time."""
        self.channels.clear()
        self.bridges.clear()
        self.startup_time = "2026-12-01T09:00:00.000+0000"

    async def release_stasis_start(self, channel_id: str) -> None:
        """Send the StasisStart held back for a created channel (auto_stasis_start False)."""
        event = self.held_stasis_starts.pop(channel_id)
        channel = self.channels.get(channel_id)
        if channel is not None:
            channel.in_stasis = True
        await self.send(event)

    async def finish_playback(self, playback_id: str) -> None:
        playback = self.playbacks.pop(playback_id)
        await self.send({"type": "PlaybackFinished", "playback": {**playback, "state": "done"}})

    async def press(self, channel_id: str, digits: str) -> None:
        """The phone behind this channel keys `digits` (one ChannelDtmfReceived each)."""
        await self.send(*(
            {"type": "ChannelDtmfReceived", "digit": d, "duration_ms": 100, "channel": self.channels[channel_id].json()}
            for d in digits
        ))

    async def hang_up_from_asterisk(self, channel_id: str, reason: int = SOFTHANGUP_EXPLICIT, cause: int = 16) -> None:
        """Asterisk hangs the channel up itself, no phone: a CLI `channel request hangup` or
        another ARI client (EXPLICIT), a timeout. Its hangup request is soft and names the
        AST_SOFTHANGUP_* reason as its cause."""
        await self._destroy(self.channels[channel_id], cause, soft_reason=reason)

    async def shut_down(self) -> None:
        """`core stop now` / `core restart now`: every channel's soft hangup request, for the
        shutdown (SHUTDOWN), then their ends; the websocket then goes (drop() after this)."""
        channels = list(self.channels.values())
        await self.send(*({"type": "ChannelHangupRequest", "cause": SOFTHANGUP_SHUTDOWN, "soft": True,
                           "channel": c.json()} for c in channels))
        for channel in channels:
            await self._destroy(channel, 16, soft_reason=SOFTHANGUP_APPUNLOAD)

    async def _destroy(self, channel: Channel, cause: int, soft_reason: int | None = None) -> None:
        self.channels.pop(channel.id, None)
        # A hangup from the far end is queued with its Q.850 cause; one Asterisk asks for
        # itself (ARI DELETE, CLI, shutdown) is soft, its "cause" the AST_SOFTHANGUP_* reason.
        request = {"type": "ChannelHangupRequest", "cause": cause, "channel": channel.json()} \
            if soft_reason is None else \
            {"type": "ChannelHangupRequest", "cause": soft_reason, "soft": True, "channel": channel.json()}
        events: list[dict[str, Any]] = [request]
        bridge = self.bridges.get(channel.bridge_id or "")
        if bridge is not None and channel.id in bridge.channels:
            bridge.channels.remove(channel.id)
            events.append({"type": "ChannelLeftBridge", "bridge": bridge.json(), "channel": channel.json()})
        if channel.in_stasis:
            events.append({"type": "StasisEnd", "channel": channel.json()})
        events.append(
            {
                "type": "ChannelDestroyed",
                "cause": cause,
                "cause_txt": CAUSE_TEXT.get(cause, "Unknown"),
                "channel": channel.json(),
            }
        )
        await self.send(*events)

    # --- handlers ------------------------------------------------------------------

    def _stasis_channel(self, request: web.Request) -> Channel | web.Response:
        channel = self.channels.get(request.match_info["id"])
        if channel is None:
            return _error(404, "Channel not found")
        if not channel.in_stasis:
            return _error(409, "Channel not in Stasis application")
        return channel

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_websocket:
            return _error(503, "Service Unavailable")
        if request.query.get("app") != self.app:
            return _error(400, "Invalid application provided in param [app].")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connects += 1
        self.connect_times.append(asyncio.get_running_loop().time())
        if self.close_at_once:
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"going away")
            await self._notify()
            return ws
        self._sockets.add(ws)
        await self._notify()
        try:
            async for _msg in ws:
                pass
        finally:
            self._sockets.discard(ws)
            await self._notify()
        return ws

    async def _list_channels(self, request: web.Request) -> web.Response:
        return web.json_response([c.json() for c in self.channels.values()])

    async def _create_channel(self, request: web.Request) -> web.Response:
        q = request.query
        if "endpoint" not in q or "app" not in q:
            return _error(400, "Endpoint and app parameters are required")
        channel_id = q.get("channelId") or f"{next(self._names)}.fake"
        if channel_id in self.channels:
            return _error(409, "Channel with given unique ID already exists")
        body = await request.json() if request.can_read_body else {}
        variables = dict((body or {}).get("variables") or {})
        args = [a for a in q.get("appArgs", "").split(",") if a]
        channel = Channel(
            id=channel_id,
            name=f"PJSIP/trunk-{next(self._names):08x}",
            state="Down",
            caller_number=variables.get("CALLERID(num)", ""),
            caller_name=variables.get("CALLERID(name)", ""),
            exten="s",
            context="default",
            variables=variables,
            args=args,
            endpoint=q["endpoint"],
        )
        self.channels[channel_id] = channel
        start = {"type": "StasisStart", "args": args, "channel": channel.json()}
        if self.auto_stasis_start:
            channel.in_stasis = True
            await self.send(start)
        else:
            self.held_stasis_starts[channel_id] = start
        return web.json_response(channel.json())

    async def _get_channel(self, request: web.Request) -> web.Response:
        channel = self.channels.get(request.match_info["id"])
        if channel is None:
            return _error(404, "Channel not found")
        return web.json_response(channel.json())

    async def _delete_channel(self, request: web.Request) -> web.Response:
        channel = self.channels.get(request.match_info["id"])
        if channel is None:
            return _error(404, "Channel not found")
        if "reason_code" in request.query:
            if "reason" in request.query or not request.query["reason_code"].isdigit():
                return _error(400, "Invalid reason_code for hangup provided")
            cause = int(request.query["reason_code"])
        else:
            reason = request.query.get("reason", "normal")
            if reason not in HANGUP_REASONS:
                return _error(400, "Invalid reason for hangup provided")
            cause = HANGUP_REASONS[reason]
        # Asterisk answers 204 and the events follow; here they go out first, which the
        # bridge must cope with as well.
        await self._destroy(channel, cause, soft_reason=SOFTHANGUP_EXPLICIT)
        return web.Response(status=204)

    async def _dial(self, request: web.Request) -> web.Response:
        channel = self._stasis_channel(request)
        if isinstance(channel, web.Response):
            return channel
        if channel.dialed or channel.state != "Down":
            return _error(409, "Channel is not in the 'Down' state")
        channel.dialed = True
        if self.ring_on_dial:
            channel.state = "Ringing"
            await self.send(
                {"type": "Dial", "peer": channel.json(), "dialstatus": "", "dialstring": channel.endpoint or ""},
                {"type": "ChannelStateChange", "channel": channel.json()},
            )
        return web.Response(status=204)

    async def _answer(self, request: web.Request) -> web.Response:
        channel = self._stasis_channel(request)
        if isinstance(channel, web.Response):
            return channel
        if channel.state != "Up":
            channel.state = "Up"
            await self.send({"type": "ChannelStateChange", "channel": channel.json()})
        return web.Response(status=204)

    async def _ring(self, request: web.Request) -> web.Response:
        channel = self._stasis_channel(request)
        if isinstance(channel, web.Response):
            return channel
        return web.Response(status=204)

    async def _set_variable(self, request: web.Request) -> web.Response:
        channel = self.channels.get(request.match_info["id"])
        if channel is None:
            return _error(404, "Channel not found")
        name = request.query.get("variable")
        if not name:
            return _error(400, "Variable name is required")
        channel.variables[name] = request.query.get("value", "")
        return web.Response(status=204)

    async def _play(self, request: web.Request) -> web.Response:
        channel = self._stasis_channel(request)
        if isinstance(channel, web.Response):
            return channel
        media = request.query.get("media")
        if not media:
            return _error(400, "media is required")
        playback_id = request.match_info.get("playback") or f"playback-{next(self._names)}"
        playback = {
            "id": playback_id,
            "media_uri": media,
            "target_uri": f"channel:{channel.id}",
            "language": "en",
            "state": "playing",
        }
        self.playbacks[playback_id] = playback
        await self.send({"type": "PlaybackStarted", "playback": playback})
        if self.auto_finish_playback:
            await self.finish_playback(playback_id)
        return web.json_response({**playback, "state": "queued"}, status=201)

    async def _stop_playback(self, request: web.Request) -> web.Response:
        """DELETE /playbacks/{id}: as Asterisk, the playback ends with PlaybackFinished."""
        playback_id = request.match_info["id"]
        if playback_id not in self.playbacks:
            return _error(404, "Playback not found")
        await self.finish_playback(playback_id)
        return web.Response(status=204)

    async def _create_bridge(self, request: web.Request) -> web.Response:
        bridge_id = request.match_info["id"]
        bridge = self.bridges.get(bridge_id)
        if bridge is None:
            bridge = Bridge(bridge_id, request.query.get("name", ""), request.query.get("type", "mixing"))
            self.bridges[bridge_id] = bridge
            await self.send({"type": "BridgeCreated", "bridge": bridge.json()})
        return web.json_response(bridge.json())

    async def _list_bridges(self, request: web.Request) -> web.Response:
        return web.json_response([b.json() for b in self.bridges.values()])

    async def _get_bridge(self, request: web.Request) -> web.Response:
        bridge = self.bridges.get(request.match_info["id"])
        if bridge is None:
            return _error(404, "Bridge not found")
        return web.json_response(bridge.json())

    async def _add_channel(self, request: web.Request) -> web.Response:
        bridge = self.bridges.get(request.match_info["id"])
        if bridge is None:
            return _error(404, "Bridge not found")
        # As Asterisk: a comma-separated list, every channel checked before any is added.
        channel_ids = request.query.get("channel", "").split(",")
        for channel_id in channel_ids:
            channel = self.channels.get(channel_id)
            if channel is None:
                return _error(400, "Channel not found")
            if not channel.in_stasis:
                return _error(422, "Channel not in Stasis application")
            if channel.bridge_id and channel.bridge_id != bridge.id:
                return _error(409, "Channel is in another bridge")
        for channel_id in channel_ids:
            channel = self.channels[channel_id]
            if channel_id not in bridge.channels:
                bridge.channels.append(channel_id)
                channel.bridge_id = bridge.id
                await self.send({"type": "ChannelEnteredBridge", "bridge": bridge.json(), "channel": channel.json()})
        return web.Response(status=204)

    async def _destroy_bridge(self, request: web.Request) -> web.Response:
        bridge = self.bridges.pop(request.match_info["id"], None)
        if bridge is None:
            return _error(404, "Bridge not found")
        events = []
        for channel_id in bridge.channels:
            channel = self.channels.get(channel_id)
            if channel is not None:
                channel.bridge_id = None
                events.append({"type": "ChannelLeftBridge", "bridge": bridge.json(), "channel": channel.json()})
        events.append({"type": "BridgeDestroyed", "bridge": {**bridge.json(), "channels": []}})
        await self.send(*events)
        return web.Response(status=204)

    # --- recordings: a stopped recording is stored as a WAV file of one second of silence

    async def _record_bridge(self, request: web.Request) -> web.Response:
        bridge = self.bridges.get(request.match_info["id"])
        if bridge is None:
            return _error(404, "Bridge not found")
        name, fmt = request.query.get("name", ""), request.query.get("format", "")
        if not name or not fmt:
            return _error(400, "name and format are required")
        if name in self.live_recordings or (name in self.stored_recordings and request.query.get("ifExists") == "fail"):
            return _error(422, "Recording with the same name already exists")
        recording = {"name": name, "format": fmt, "state": "recording", "target_uri": f"bridge:{bridge.id}"}
        self.live_recordings[name] = recording
        await self.send({"type": "RecordingStarted", "recording": recording})
        return web.json_response(recording, status=201)

    async def _live_recording(self, request: web.Request) -> web.Response:
        recording = self.live_recordings.get(request.match_info["name"])
        if recording is None:
            return _error(404, "Recording not found")
        return web.json_response(recording)

    async def _stop_recording(self, request: web.Request) -> web.Response:
        recording = self.live_recordings.pop(request.match_info["name"], None)
        if recording is None:
            return _error(404, "Recording not found")
        self.stored_recordings[recording["name"]] = b"RIFF" + b"\0" * 40 + b"\0" * 16000
        await self.send({"type": "RecordingFinished", "recording": {**recording, "state": "done", "duration": 1}})
        return web.Response(status=204)

    async def _stored_recording(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.stored_recordings:
            return _error(404, "Recording not found")
        return web.json_response({"name": name, "format": "wav"})

    async def _stored_recording_file(self, request: web.Request) -> web.Response:
        data = self.stored_recordings.get(request.match_info["name"])
        if data is None:
            return _error(404, "Recording not found")
        return web.Response(body=data, content_type="audio/wav")

    async def _delete_stored_recording(self, request: web.Request) -> web.Response:
        if self.stored_recordings.pop(request.match_info["name"], None) is None:
            return _error(404, "Recording not found")
        return web.Response(status=204)

    async def _event_filter(self, request: web.Request) -> web.Response:
        if request.match_info["app"] != self.app or not self.app_registered:
            return _error(404, "Application not found")
        body = await request.json()
        allowed = body.get("allowed")
        if not isinstance(allowed, list) or not all(isinstance(a, dict) and isinstance(a.get("type"), str)
                                                    for a in allowed):
            return _error(400, "Invalid filter")
        self.events_allowed = {a["type"] for a in allowed} or None
        return await self._application(request)

    async def _application(self, request: web.Request) -> web.Response:
        if request.match_info["app"] != self.app or not self.app_registered:
            return _error(404, "Application not found")
        return web.json_response(
            {
                "name": self.app,
                "channel_ids": [c.id for c in self.channels.values() if c.in_stasis],
                "bridge_ids": list(self.bridges),
                "endpoint_ids": [],
                "device_names": [],
                "events_allowed": [{"type": t} for t in sorted(self.events_allowed or ())],
                "events_disallowed": [],
            }
        )

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response({"status": {"startup_time": self.startup_time, "last_reload_time": self.startup_time},
                                  "system": {"entity_id": "00:00:00:00:00:01", "version": "22.0.0"}})

    async def _not_implemented(self, request: web.Request) -> web.Response:
        return _error(501, f"not implemented by the ARI fake: {request.method} {request.path}")
