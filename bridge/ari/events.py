"""The ARI event websocket, kept open: reconnect with exponential backoff and jitter."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp
import structlog

from bridge import metrics
from bridge.ari.client import AriClient
from bridge.ari.errors import AriError, AriNotFound

log = structlog.get_logger(__name__)

Event = dict[str, Any]


class EventStream:
    """Delivers every event of the app, in order, to one handler.

    `on_connected` runs after each (re)connect, before events are read and before
    `connected` is set, so the owner can reconcile channels that stayed in Stasis while the
    socket was down (Asterisk queues no events for them).
    """

    def __init__(
        self,
        client: AriClient,
        handler: Callable[[Event], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]] | None = None,
        *,
        event_types: tuple[str, ...] | None = None,
        min_backoff: float = 0.2,
        max_backoff: float = 5.0,
        stable_after: float = 10.0,
        check_every: float = 5.0,
    ) -> None:
        self.client = client
        self.handler = handler
        self.on_connected = on_connected
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after  # seconds up after which a connection counts as good
        self.check_every = check_every  # seconds between two looks that the application is registered
        self.event_types = event_types  # the only events Asterisk is to send (None: all of them)
        self.connected = asyncio.Event()
        self._stopping = False

    async def _deliver(self, data: str) -> None:
        # One bad event or a failing handler must not cost the connection: every later
        # event of every call would be lost with it.
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):  # (JSON, but no event: a list, a string)
            log.error("ari.bad_event")
            return
        metrics.ARI_EVENTS.labels(str(event.get("type", ""))[:64]).inc()
        try:
            await self.handler(event)
        except Exception:
            log.exception("ari.handler_failed", event_type=event.get("type"))

    async def _filter(self) -> None:
        """Only the events the owner reads (set at every connection: Asterisk forgets the
        filter with the application). A filter refused is a cost, not a fault: events then
        all come, and the owner ignores what it does not read."""
        try:
            await self.client.allow_events(list(self.event_types or ()))
        except AriNotFound:
            raise  # the application is not registered: this connection delivers nothing
        except AriError as exc:
            log.warning("ari.event_filter_refused", error=str(exc))

    async def _watch(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """While connected, every `check_every` seconds: is the application still registered,
        and does Asterisk answer? If not, the websocket is closed (and opened again): a bridge
        must not stay connected to an Asterisk that no longer delivers it anything, nor say it
        is healthy meanwhile."""
        while not ws.closed:
            await asyncio.sleep(self.check_every)  # (the watch's own pace)
            try:
                await self.client.application()
            except AriError as exc:
                log.warning("ari.application_lost" if exc.status == 404 else "ari.unresponsive",
                            app=self.client.app, error=str(exc))
                self.connected.clear()
                await ws.close()
                return

    def stop(self) -> None:
        self._stopping = True

    async def run(self) -> None:
        backoff = self.min_backoff
        url = self.client.base_url.replace("http", "ws", 1) + "/ari/events"
        while not self._stopping:
            up_since: float | None = None
            try:
                async with self.client.session.ws_connect(
                    url, params={"app": self.client.app, "subscribeAll": "false"}, heartbeat=15
                ) as ws:
                    up_since = time.monotonic()
                    log.info("ari.connected", app=self.client.app)
                    if self.event_types is not None:
                        await self._filter()
                    # Connected once the owner has caught up with what happened while the
                    # socket was down (calls left in Stasis resumed or finished): until then
                    # the bridge does not say it is healthy. A websocket Asterisk accepted is
                    # not yet an application it delivers to: an Asterisk that hung and came back
                    # can tear the old connection's application down after registering the new
                    # one. The owner's catching up reads the application (AriNotFound: connect
                    # again); without an owner, the stream reads it itself.
                    if self.on_connected is not None:
                        try:
                            await self.on_connected()
                        except AriNotFound:
                            raise
                        except Exception:
                            log.exception("ari.on_connected_failed")
                    else:
                        await self.client.application()
                    self.connected.set()
                    self.client.lost_at = None
                    metrics.ARI_CONNECTED.set(1)
                    watch = asyncio.create_task(self._watch(ws), name="ari-watch")
                    try:
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                await self._deliver(msg.data)
                            elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                                break
                    finally:
                        if self.client.lost_at is None:
                            self.client.lost_at = datetime.now(timezone.utc)
                        watch.cancel()
                        await asyncio.gather(watch, return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, AriError) as exc:
                log.warning("ari.connect_failed", error=type(exc).__name__, retry_in=round(backoff, 2))
            self.connected.clear()
            metrics.ARI_CONNECTED.set(0)
            if self._stopping:
                break
            metrics.ARI_RECONNECTS.inc()
            # The backoff starts over only after a connection that stayed up a while: one
            # that Asterisk accepts and drops at once counts as a failure, or the bridge would
            # reconnect (and reconcile) many times a second.
            if up_since is not None and time.monotonic() - up_since >= self.stable_after:
                backoff = self.min_backoff
            log.warning("ari.disconnected", retry_in=round(backoff, 2))
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self.max_backoff)
