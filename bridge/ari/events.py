"""The ARI event websocket, kept open: reconnect with exponential backoff and jitter."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import structlog

from bridge.ari.client import AriClient
from bridge.ari.errors import AriError

log = structlog.get_logger(__name__)

Event = dict[str, Any]


class EventStream:
    """Delivers every event of the app, in order, to one handler.

    `on_connected` runs after each (re)connect, before events are read, so the owner can
    reconcile channels that stayed in Stasis while the socket was down (Asterisk queues no
    events for them).
    """

    def __init__(
        self,
        client: AriClient,
        handler: Callable[[Event], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]] | None = None,
        *,
        min_backoff: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.client = client
        self.handler = handler
        self.on_connected = on_connected
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.connected = asyncio.Event()
        self._stopping = False

    async def _deliver(self, data: str) -> None:
        # One bad event or a failing handler must not cost the connection: every later
        # event of every call would be lost with it.
        try:
            event = json.loads(data)
        except ValueError:
            log.error("ari.bad_event")
            return
        try:
            await self.handler(event)
        except Exception:
            log.exception("ari.handler_failed", event_type=event.get("type"))

    def stop(self) -> None:
        self._stopping = True

    async def run(self) -> None:
        backoff = self.min_backoff
        url = self.client.base_url.replace("http", "ws", 1) + "/ari/events"
        while not self._stopping:
            try:
                async with self.client.session.ws_connect(
                    url, params={"app": self.client.app, "subscribeAll": "false"}, heartbeat=15
                ) as ws:
                    log.info("ari.connected", app=self.client.app)
                    backoff = self.min_backoff
                    self.connected.set()
                    if self.on_connected is not None:
                        try:
                            await self.on_connected()
                        except Exception:
                            log.exception("ari.on_connected_failed")
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            await self._deliver(msg.data)
                        elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                            break
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, AriError) as exc:
                log.warning("ari.connect_failed", error=type(exc).__name__, retry_in=round(backoff, 2))
            self.connected.clear()
            if self._stopping:
                break
            log.warning("ari.disconnected", retry_in=round(backoff, 2))
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self.max_backoff)
