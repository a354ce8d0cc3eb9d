"""ARI REST requests."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

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


def _add_channel(channel_id: str | list[str]) -> dict[str, Any]:
    # Connected-line updates are not passed between the legs: they would carry one party's
    # real identity to the other (see ASTERISK-NOTES.md).
    return {"channel": channel_id, "inhibitConnectedLineUpdates": True}


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
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        # REST over the event websocket (Asterisk 22 answers a RESTRequest there with a
        # RESTResponse): no HTTP request per call step, and the requests of one websocket are
        # carried out one after the other, in the order sent. Attached by the EventStream once
        # its reader runs; until then (and with an Asterisk that does not answer), HTTP.
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[str, tuple[asyncio.Future[dict[str, Any]], float]] = {}  # id -> (answer, deadline)
        self._ids = itertools.count(1)
        self._expiry: asyncio.Task[None] | None = None  # fails requests past their deadline (no timer each)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # --- REST over the websocket ---------------------------------------------------------

    @property
    def over_websocket(self) -> bool:
        """Whether requests now go over the event websocket (and so run in the order sent)."""
        return self._ws is not None and not self._ws.closed

    def attach(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    def detach(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The websocket is gone: what was asked over it and not answered fails as a lost
        HTTP answer does (AriUnavailable: it may or may not have been carried out)."""
        if self._ws is ws:
            self._ws = None
        for future, _deadline in list(self._pending.values()):
            if not future.done():
                future.set_exception(ConnectionResetError("the ARI websocket closed"))

    async def _expire(self) -> None:
        """Every quarter second: requests unanswered past their deadline fail (TimeoutError)."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for future, deadline in list(self._pending.values()):
                if deadline <= now and not future.done():
                    future.set_exception(asyncio.TimeoutError())

    def answered(self, message: dict[str, Any]) -> None:
        """A RESTResponse read from the websocket: to the request waiting for it."""
        pending = self._pending.get(str(message.get("request_id")))
        if pending is not None and not pending[0].done():
            pending[0].set_result(message)

    async def probe_websocket(self, ws: aiohttp.ClientWebSocketResponse, timeout: float = 2.0) -> bool:
        """Whether this Asterisk answers REST over `ws` (its reader must be running)."""
        try:
            await self._over_ws(ws, "GET", "/asterisk/ping", None, None, timeout)
            return True
        except (AriError, asyncio.TimeoutError):
            return False

    async def _over_ws(self, ws: aiohttp.ClientWebSocketResponse, method: str, path: str,
                       params: dict[str, Any] | None, body: dict[str, Any] | None, timeout: float) -> Any:
        future = await self._ws_send(ws, method, path, params, body, timeout)
        return await self._ws_reply(method, path, future)

    async def _ws_send(self, ws: aiohttp.ClientWebSocketResponse, method: str, path: str,
                       params: dict[str, Any] | None, body: dict[str, Any] | None,
                       timeout: float) -> asyncio.Future[dict[str, Any]]:
        """Sends one request; returns what its answer (or its failure) will be set on."""
        request_id = f"r{next(self._ids)}"
        uri = path.lstrip("/")
        query = _params(params or {})
        if query:
            uri += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe=",")
        message: dict[str, Any] = {"type": "RESTRequest", "request_id": request_id, "method": method, "uri": uri}
        if body is not None:
            message["content_type"] = "application/json"
            message["message_body"] = json.dumps(body)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, time.monotonic() + timeout)
        if self._expiry is None or self._expiry.done():
            self._expiry = asyncio.create_task(self._expire(), name="ari-expiry")
        future.add_done_callback(lambda _f: self._pending.pop(request_id, None))
        try:
            await ws.send_str(json.dumps(message))
        except (ConnectionError, RuntimeError) as exc:
            future.cancel()
            raise AriUnavailable(method, path, None, type(exc).__name__) from exc
        return future

    async def _ws_reply(self, method: str, path: str, future: asyncio.Future[dict[str, Any]]) -> Any:
        try:
            reply = await future
        except (ConnectionError, RuntimeError, asyncio.TimeoutError) as exc:
            raise AriUnavailable(method, path, None, type(exc).__name__) from exc
        status = int(reply.get("status_code") or 0)
        text = reply.get("message_body") or ""
        if status >= 400 or status == 0:
            message_text = text
            try:
                message_text = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                pass
            raise from_status(method, path, status, message_text)
        return json.loads(text) if text else None

    async def request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        operation = metrics.ari_operation(method, path)
        began = time.perf_counter()
        ws = self._ws
        if ws is not None and not ws.closed:
            try:
                return await self._over_ws(ws, method, path, params, body, self._request_timeout)
            except AriError as exc:
                metrics.ARI_ERRORS.labels(operation, str(exc.status or 0)).inc()
                raise
            finally:
                metrics.ARI_REQUEST.labels(operation).observe(time.perf_counter() - began)
        url = f"{self.base_url}/ari{path}"
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

    async def dial(self, channel_id: str, timeout: int) -> None:
        await self.request("POST", f"/channels/{channel_id}/dial", {"timeout": timeout})

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

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/variable", {"variable": name, "value": value})

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
        # proxy_media: each leg's RTP ends at the PBX and is re-originated with the PBX's
        # own SSRC and timing. With native RTP forwarding the other leg's packets (and
        # their SSRC) went through as they were, and a phone heard only the first 100 ms.
        return await self.request(
            "POST", f"/bridges/{bridge_id}", {"type": "mixing,proxy_media", "name": name or None}
        )

    async def add_to_bridge(self, bridge_id: str, channel_id: str | list[str]) -> None:
        """One channel, or several in one request (Asterisk checks them all before adding any)."""
        await self.request("POST", f"/bridges/{bridge_id}/addChannel", _add_channel(channel_id))

    async def get_bridge(self, bridge_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/bridges/{bridge_id}")

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
