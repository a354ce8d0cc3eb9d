"""Wiring: the ARI event stream, the call dispatcher, the store and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import structlog
from aiohttp import web

from bridge.api.http import make_app
from bridge.ari import AriClient, EventStream
from bridge.calls.flow import FlowSettings
from bridge.calls.stasis import StasisDispatcher
from bridge.config import Settings
from bridge.sessions import Sessions
from bridge.store import Store, connect, migrate

log = structlog.get_logger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    pool = await connect(settings.database_url)
    await migrate(pool)
    store = Store(pool)
    ari = AriClient(settings.ari_url, settings.ari_user, settings.ari_password, settings.ari_app)
    dispatcher = StasisDispatcher(
        ari,
        store,
        FlowSettings(
            trunk_endpoint=settings.trunk_endpoint,
            default_region=settings.default_region,
            ring_timeout=settings.ring_timeout,
        ),
    )
    stream = EventStream(ari, dispatcher.handle, on_connected=dispatcher.reconcile)

    async def health() -> dict[str, Any]:
        try:
            db_ok = await pool.fetchval("SELECT 1") == 1
        except Exception:  # noqa: BLE001 - any failure means not healthy
            db_ok = False
        return {"ari": stream.connected.is_set(), "database": db_ok}

    runner = web.AppRunner(make_app(Sessions(store, settings.default_region), settings.api_token, health))
    await runner.setup()
    site = web.TCPSite(runner, settings.api_bind, settings.api_port)
    await site.start()
    events = asyncio.create_task(stream.run(), name="ari-events")
    log.info("bridge.started", api=f"{settings.api_bind}:{settings.api_port}", app=settings.ari_app)
    try:
        await stop.wait()
    finally:
        log.info("bridge.stopping")
        stream.stop()
        events.cancel()
        await asyncio.gather(events, return_exceptions=True)
        await dispatcher.shutdown()
        await runner.cleanup()
        await ari.close()
        await pool.close()


async def main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)
