"""ARI REST requests."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from bridge import metrics
from bridge.ari.errors import AriError, AriUnavailable, from_status


def _params(values: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        else:
            out[key] = str(value)
    return out


# A kept-alive connection of `AriClient.in_turn` idle longer than this is closed, not used
# again: Asterisk closes an idle one after http.conf's session_keep_alive (15 s by default),
# and a request written as it does would be lost unseen.
PIPE_IDLE_MAX = 5.0
PIPE_ANSWER_MAX = 1 << 26  # bytes of one answer, at most (a channel is about 1.5 KB: all of them can be many)
# Connections of in_turn in use at once, at most (and as many kept idle): Asterisk serves at
# most http.conf's sessionlimit (100) connections, the websocket and aiohttp's pool among them.
# Beyond it, the requests go one after the other on the pool's connections.
PIPES_MAX = 8
ASTERISK_SESSION_LIMIT = 100  # http.conf's sessionlimit (Asterisk's default; the stack keeps it)
# aiohttp's connections at most, the event stream's websocket among them: with the pipes (in
# use and idle) a few below Asterisk's limit, so that a burst (every call's requests at once
# after Asterisk was frozen for seconds) waits for a connection instead of being refused by
# Asterisk (aiohttp's own default is 100 on its own).
HTTP_POOL_MAX = ASTERISK_SESSION_LIMIT - 2 * PIPES_MAX - 4


@dataclass(frozen=True)
class Call:
    """One ARI request, for AriClient.in_turn."""

    method: str
    path: str
    params: dict[str, Any]
    body: dict[str, Any] | None = None  # sent as JSON


class _Pipe:
    """One raw HTTP/1.1 connection to Asterisk that writes several requests at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = time.monotonic()
        self.reused = False

    def close(self) -> None:
        self.writer.close()

    async def answer(self) -> tuple[int, bytes, bool]:
        """The next answer: its status, its body, and whether Asterisk keeps the connection."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length: int | None = None
        keep = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
            elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
                keep = False
        if length is None and status in (204, 304):
            length = 0  # (no body by definition: a server may leave the length out)
        if status < 200 or length is None or not 0 <= length <= PIPE_ANSWER_MAX:
            raise ValueError(f"answer without a usable Content-Length ({length})")
        return status, (await self.reader.readexactly(length) if length else b""), keep


@dataclass(frozen=True)
class StoredFile:
    """A stored recording's audio as Asterisk serves it: its size and a stream of chunks."""

    content_type: str
    length: int | None
    chunks: AsyncIterator[bytes]


class AriClient:
    """REST half of ARI. One instance per Asterisk; safe to share between calls."""

    def __init__(
        self,
        base_url: str,
        user: str,
        password: str,
        app: str,
        *,
        request_timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.app = app
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {credentials}"}
        self._host = urlsplit(self.base_url).netloc
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None
        # Asterisk's startup time as the event stream found it at its last (re)connect (set by
        # the dispatcher): another one now means Asterisk was restarted since.
        self.connected_startup_time: str | None = None
        # When the event stream lost a connection that was up (set by the stream; cleared once
        # a new one has caught up): channels of an Asterisk found restarted since went then.
        self.lost_at: datetime | None = None
        self._pipes: list[_Pipe] = []  # kept-alive connections of in_turn, idle
        self._pipes_busy = 0  # and in use

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, connector=aiohttp.TCPConnector(limit=HTTP_POOL_MAX)
            )
        return self._session

    async def close(self) -> None:
        for pipe in self._pipes:
            pipe.close()
        self._pipes.clear()
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        """One request: its answer (JSON, or None); the AriError it met is raised. Over plain HTTP on
        a kept-alive connection of in_turn's, written by hand (half the CPU of aiohttp's
        client per request, measured: 128 against 243 to 279 microseconds, and 0.1 ms less
        of a round trip); over TLS, or with PIPES_MAX connections in use, through aiohttp."""
        if self._pipe_usable():
            # (A kept-alive connection found closed with nothing read is tried again on a new
            # one for a GET only: a request that changes something may have been carried out
            # by an Asterisk that then went down, and must not run twice.)
            (result,) = await self._piped([Call(method, path, params or {}, body)], again=method == "GET")
            if isinstance(result, AriError):
                raise result
            return result
        return await self._request_aiohttp(method, path, params, body)

    async def _request_aiohttp(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        url = f"{self.base_url}/ari{path}"
        operation = metrics.ari_operation(method, path)
        began = time.perf_counter()
        try:
            async with self.session.request(method, url, params=_params(params or {}), json=body) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    metrics.ARI_ERRORS.labels(operation, str(resp.status)).inc()
                    message = text
                    try:
                        message = (await resp.json(content_type=None)).get("message", text)
                    except (ValueError, AttributeError):
                        pass
                    raise from_status(method, path, resp.status, message)
                if not text:
                    return None
                return await resp.json(content_type=None)
        except AriError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            metrics.ARI_ERRORS.labels(operation, "0").inc()
            raise AriUnavailable(method, path, None, type(exc).__name__) from exc
        finally:
            metrics.ARI_REQUEST.labels(operation).observe(time.perf_counter() - began)

    async def in_turn(self, calls: list[Call]) -> list[Any]:
        """Several requests that must run one after the other, without a round trip between
        them: written at once on one kept-alive connection, which Asterisk serves one request
        at a time, each once the one before is done (its answer written). Each request's
        result in order: its answer (JSON, or None), or the AriError it met (returned, not
        raised: the later requests ran anyway). AriUnavailable when the connection failed:
        then what ran is not known. (Over plain HTTP; over TLS, or with PIPES_MAX connections
        in use, one after the other, each once the one before has answered.)"""
        if not self._pipe_usable():
            return await self._one_by_one(calls)
        return await self._piped(calls)

    def _pipe_usable(self) -> bool:
        return self.base_url.startswith("http://") and (bool(self._pipes) or self._pipes_busy < PIPES_MAX)

    async def _piped(self, calls: list[Call], again: bool = True) -> list[Any]:
        self._pipes_busy += 1
        try:
            return await self._in_turn(calls, again)
        finally:
            self._pipes_busy -= 1

    async def _one_by_one(self, calls: list[Call]) -> list[Any]:
        results: list[Any] = []
        for call in calls:
            try:
                results.append(await self._request_aiohttp(call.method, call.path, call.params, call.body))
            except AriUnavailable:
                raise
            except AriError as exc:
                results.append(exc)
        return results

    async def _in_turn(self, calls: list[Call], again: bool) -> list[Any]:
        began = time.perf_counter()
        data = b"".join(self._request_bytes(call) for call in calls)
        first = calls[0]
        try:
            async with asyncio.timeout(self._timeout.total):
                pipe = await self._pipe()
                try:
                    pipe.writer.write(data)
                    try:
                        answer = await pipe.answer()
                    except (asyncio.IncompleteReadError, ConnectionError) as exc:
                        if not (again and pipe.reused) or (
                                isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                            raise
                        # A kept-alive connection Asterisk had closed meanwhile: nothing was read
                        # from it, nothing ran. Once more, on a new one.
                        pipe.close()
                        pipe = await self._pipe(fresh=True)
                        pipe.writer.write(data)
                        answer = await pipe.answer()
                    answers = [answer]
                    for _ in calls[1:]:
                        answers.append(await pipe.answer())
                except BaseException:
                    pipe.close()
                    raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError,
                TimeoutError) as exc:
            for call in calls:
                metrics.ARI_ERRORS.labels(metrics.ari_operation(call.method, call.path), "0").inc()
            raise AriUnavailable(first.method, first.path, None, type(exc).__name__) from exc
        if all(keep for _status, _body, keep in answers) and len(self._pipes) < PIPES_MAX:
            pipe.idle_since = time.monotonic()
            pipe.reused = True
            self._pipes.append(pipe)
        else:
            pipe.close()
        elapsed = time.perf_counter() - began
        results = []
        for call, (status, body, _keep) in zip(calls, answers):
            operation = metrics.ari_operation(call.method, call.path)
            metrics.ARI_REQUEST.labels(operation).observe(elapsed)
            results.append(self._result(call, operation, status, body))
        return results

    def _request_bytes(self, call: Call) -> bytes:
        query = urlencode(_params(call.params))
        body = b"" if call.body is None else json.dumps(call.body).encode()
        kind = "" if call.body is None else "Content-Type: application/json\r\n"
        return (f"{call.method} /ari{call.path}{'?' + query if query else ''} HTTP/1.1\r\n"
                f"Host: {self._host}\r\nAuthorization: {self._headers['Authorization']}\r\n"
                f"{kind}Content-Length: {len(body)}\r\n\r\n").encode() + body

    @staticmethod
    def _result(call: Call, operation: str, status: int, body: bytes) -> Any:
        if status >= 400:
            metrics.ARI_ERRORS.labels(operation, str(status)).inc()
            message = body.decode("utf-8", "replace")
            try:
                decoded = json.loads(body)
                if isinstance(decoded, dict):
                    message = str(decoded.get("message", message))
            except ValueError:
                pass
            return from_status(call.method, call.path, status, message)
        try:
            return json.loads(body) if body else None
        except ValueError:
            return AriUnavailable(call.method, call.path, status, "an answer that is no JSON")

    async def _pipe(self, fresh: bool = False) -> _Pipe:
        """A kept-alive connection idle for less than PIPE_IDLE_MAX, or a new one."""
        while self._pipes and not fresh:
            pipe = self._pipes.pop()
            if time.monotonic() - pipe.idle_since < PIPE_IDLE_MAX and not pipe.reader.at_eof():
                return pipe
            pipe.close()
        host, _, port = self._host.partition(":")
        reader, writer = await asyncio.open_connection(host, int(port or 80))
        return _Pipe(reader, writer)

    # --- channels -------------------------------------------------------------------

    async def create_channel(
        self,
        endpoint: str,
        channel_id: str,
        app_args: list[str],
        variables: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create a channel in this app without dialing it yet (enters Stasis at once)."""
        return await self.request(
            "POST",
            "/channels/create",
            {"endpoint": endpoint, "app": self.app, "appArgs": app_args, "channelId": channel_id},
            {"variables": variables or {}},
        )

    async def originate(
        self,
        endpoint: str,
        channel_id: str,
        caller_id: str | None,
        app_args: list[str],
        timeout: int = 30,
        variables: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Dial out at once; the channel enters Stasis when answered. Without `caller_id`,
        the channel's caller ID is what `variables` set (e.g. CALLERID(num), CALLERID(pres))."""
        params: dict[str, Any] = {
            "endpoint": endpoint,
            "app": self.app,
            "appArgs": app_args,
            "channelId": channel_id,
            "timeout": timeout,
        }
        if caller_id is not None:
            params["callerId"] = caller_id
        return await self.request("POST", "/channels", params, {"variables": variables or {}})

    async def list_channels(self) -> list[dict[str, Any]]:
        """Every channel Asterisk has, each with its state."""
        return list(await self.request("GET", "/channels") or [])

    @staticmethod
    def dial_call(channel_id: str, timeout: int) -> Call:
        return Call("POST", f"/channels/{channel_id}/dial", {"timeout": timeout})

    async def dial(self, channel_id: str, timeout: int) -> None:
        call = self.dial_call(channel_id, timeout)
        await self.request(call.method, call.path, call.params)

    async def answer(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/answer")

    async def ring(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/ring")

    async def hold(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/hold")

    async def unhold(self, channel_id: str) -> None:
        await self.request("DELETE", f"/channels/{channel_id}/hold")

    async def start_moh(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/moh")

    async def stop_moh(self, channel_id: str) -> None:
        await self.request("DELETE", f"/channels/{channel_id}/moh")

    async def hangup(self, channel_id: str, reason: str = "normal", code: int | None = None) -> None:
        """Hang up with a named reason, or with an exact Q.850 cause `code` (reason_code)."""
        params = {"reason_code": str(code)} if code is not None else {"reason": reason}
        await self.request("DELETE", f"/channels/{channel_id}", params)

    async def send_dtmf(self, channel_id: str, digits: str, between_ms: int = 100, duration_ms: int = 100) -> None:
        await self.request(
            "POST", f"/channels/{channel_id}/dtmf",
            {"dtmf": digits, "between": between_ms, "duration": duration_ms},
        )

    async def get_channel(self, channel_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/channels/{channel_id}")

    @staticmethod
    def set_variable_call(channel_id: str, name: str, value: str) -> Call:
        return Call("POST", f"/channels/{channel_id}/variable", {"variable": name, "value": value})

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        call = self.set_variable_call(channel_id, name, value)
        await self.request(call.method, call.path, call.params)

    async def play(
        self, channel_id: str, media: str, playback_id: str | None = None, lang: str | None = None
    ) -> dict[str, Any]:
        path = f"/channels/{channel_id}/play" + (f"/{playback_id}" if playback_id else "")
        return await self.request("POST", path, {"media": media, **({"lang": lang} if lang else {})})

    async def play_on_bridge(self, bridge_id: str, media: str, playback_id: str | None = None) -> dict[str, Any]:
        """Play to everyone in a bridge."""
        path = f"/bridges/{bridge_id}/play" + (f"/{playback_id}" if playback_id else "")
        return await self.request("POST", path, {"media": media})

    async def stop_playback(self, playback_id: str) -> None:
        await self.request("DELETE", f"/playbacks/{playback_id}")

    async def snoop(
        self, channel_id: str, snoop_id: str, app_args: list[str], spy: str = "none", whisper: str = "none"
    ) -> dict[str, Any]:
        return await self.request(
            "POST",
            f"/channels/{channel_id}/snoop/{snoop_id}",
            {"app": self.app, "appArgs": app_args, "spy": spy, "whisper": whisper},
        )

    async def record(self, channel_id: str, name: str, fmt: str = "wav", max_seconds: int = 0) -> dict[str, Any]:
        return await self.request(
            "POST",
            f"/channels/{channel_id}/record",
            {"name": name, "format": fmt, "maxDurationSeconds": max_seconds, "ifExists": "overwrite"},
        )

    # --- bridges --------------------------------------------------------------------

    async def create_bridge(self, bridge_id: str, name: str = "") -> dict[str, Any]:
        # proxy_media: each leg's RTP ends at the PBX and its audio passes through Asterisk's
        # core. Two reasons, each enough:
        # - the keys a phone presses (RFC 4733 events) reach the bridge as ChannelDtmfReceived:
        #   the client's keypad block needs them. Forwarded natively, they went to the other
        #   phone unseen (tried: the keypad block test fails);
        # - the PBX re-originates each stream with its own SSRC and timing. With native RTP
        #   forwarding the other leg's packets (and their SSRC) went through as they were, and
        #   a phone heard only the first 100 ms.
        # The price is CPU: the PBX spends about 5 ms per second of talk against 2.5 when the
        # dialplan's Dial forwards natively (docs/bench, "Setup and talk apart").
        return await self.request(
            "POST", f"/bridges/{bridge_id}", {"type": "mixing,proxy_media", "name": name or None}
        )

    @staticmethod
    def join_call(bridge_id: str, channel_id: str | list[str]) -> Call:
        """One channel, or several in one request (Asterisk checks them all before adding any)."""
        # Connected-line updates are not passed between the legs: they would carry one
        # party's real identity to the other (see ASTERISK-NOTES.md).
        return Call("POST", f"/bridges/{bridge_id}/addChannel",
                    {"channel": channel_id, "inhibitConnectedLineUpdates": True})

    async def add_to_bridge(self, bridge_id: str, channel_id: str | list[str]) -> None:
        call = self.join_call(bridge_id, channel_id)
        await self.request(call.method, call.path, call.params)

    async def get_bridge(self, bridge_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/bridges/{bridge_id}")

    async def list_bridges(self) -> list[dict[str, Any]]:
        """Every bridge Asterisk has, each with its channels."""
        return list(await self.request("GET", "/bridges") or [])

    async def destroy_bridge(self, bridge_id: str) -> None:
        await self.request("DELETE", f"/bridges/{bridge_id}")

    # --- recordings -----------------------------------------------------------------

    async def record_bridge(self, bridge_id: str, name: str, fmt: str = "wav") -> dict[str, Any]:
        """Record everything the bridge mixes, as one file `name`.`fmt` in Asterisk's
        recording spool (never overwriting one)."""
        return await self.request(
            "POST",
            f"/bridges/{bridge_id}/record",
            {"name": name, "format": fmt, "ifExists": "fail", "beep": False, "terminateOn": "none"},
        )

    async def stop_recording(self, name: str) -> None:
        """Stop a live recording and keep what it recorded (RecordingFinished follows)."""
        await self.request("POST", f"/recordings/live/{name}/stop")

    async def live_recording(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/recordings/live/{name}")

    async def stored_recording(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/recordings/stored/{name}")

    async def delete_stored_recording(self, name: str) -> None:
        await self.request("DELETE", f"/recordings/stored/{name}")

    @asynccontextmanager
    async def stored_recording_file(self, name: str, chunk_size: int = 64 * 1024) -> AsyncIterator[StoredFile]:
        """The audio of a stored recording, streamed (never held in memory whole)."""
        method, path = "GET", f"/recordings/stored/{name}/file"
        # No total timeout: a long recording to a slow client takes what it takes; a
        # stalled read still ends.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        try:
            async with self.session.get(f"{self.base_url}/ari{path}", timeout=timeout) as resp:
                if resp.status >= 400:
                    message = await resp.text()
                    try:
                        message = (await resp.json(content_type=None)).get("message", message)
                    except (ValueError, AttributeError):
                        pass
                    raise from_status(method, path, resp.status, message)
                yield StoredFile(resp.content_type, resp.content_length, resp.content.iter_chunked(chunk_size))
        except AriError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise AriUnavailable(method, path, None, type(exc).__name__) from exc

    async def stored_recording_size(self, name: str) -> int | None:
        """The size in bytes of a stored recording's file (read from the headers only)."""
        async with self.stored_recording_file(name) as stored:
            return stored.length

    async def entity_id(self) -> str:
        """This Asterisk's entity id (asterisk.conf `entityid`; unique per Asterisk)."""
        info = await self.request("GET", "/asterisk/info")
        return str((info.get("system") or {}).get("entity_id", ""))

    async def startup_time(self) -> str | None:
        """When this Asterisk process started (GET /asterisk/info): another value at a
        reconnect means it was restarted meanwhile, and every channel it had is gone."""
        info = await self.request("GET", "/asterisk/info")
        started = (info.get("status") or {}).get("startup_time")
        return str(started) if started else None

    def restarted(self, started: str | None) -> bool:
        """Whether Asterisk's startup time `started` (startup_time()) says it was started
        again since the event stream's last connection."""
        known = self.connected_startup_time
        return known is not None and started is not None and started != known

    async def ping(self) -> None:
        """Asterisk answers (GET /asterisk/ping): its REST side is not hung."""
        await self.request("GET", "/asterisk/ping")

    # --- application ----------------------------------------------------------------

    async def application(self) -> dict[str, Any]:
        return await self.request("GET", f"/applications/{self.app}")

    async def allow_events(self, types: list[str]) -> dict[str, Any]:
        """Asterisk sends this application only events of these types (until it connects
        again: the filter is set at every connection)."""
        return await self.request(
            "PUT", f"/applications/{self.app}/eventFilter", body={"allowed": [{"type": t} for t in types]}
        )

    async def subscribe(self, event_source: str) -> None:
        await self.request("POST", f"/applications/{self.app}/subscription", {"eventSource": event_source})
