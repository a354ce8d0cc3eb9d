"""Wiring: the ARI event stream, the call dispatcher, the store, the session housekeeping
and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog
from aiohttp import web

from bridge.api.http import make_app
from bridge.ari import AriClient, EventStream
from bridge.calls.flow import FlowSettings
from bridge.calls.stasis import StasisDispatcher
from bridge.config import Settings
from bridge.crypto import NumberVault
from bridge.phone import normalize
from bridge.pools import Pools
from bridge.sessions import Policy, Sessions
from bridge.store import Store, connect, migrate

log = structlog.get_logger(__name__)

RETENTION_EVERY = 3600.0  # seconds between two runs of the retention job


def policy_of(settings: Settings) -> Policy:
    support = normalize(settings.support_number, settings.default_region) if settings.support_number else None
    return Policy(
        default_region=settings.default_region,
        session_ttl=settings.session_ttl,
        grace_period=settings.grace_period,
        pair_cooloff=settings.pair_cooloff,
        number_cooling=settings.number_cooling,
        retention_days=settings.retention_days,
        support_number=support,
    )


async def housekeeping(sessions: Sessions, interval: float, stop: asyncio.Event) -> None:
    """Expire sessions, end cool-offs and grace periods, retire cooled numbers; purge old
    real numbers once an hour. Routing checks expiry itself, so a late sweep is harmless."""
    last_purge = -RETENTION_EVERY
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            counts = await sessions.sweep()
            if counts:
                log.info("housekeeping.swept", **counts)
            if loop.time() - last_purge >= RETENTION_EVERY:
                await sessions.purge()
                last_purge = loop.time()
        except Exception:  # noqa: BLE001 - a database hiccup must not end housekeeping
            log.exception("housekeeping.failed")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    vault = NumberVault(settings.number_key)
    policy = policy_of(settings)
    pool = await connect(settings.database_url)
    await migrate(pool, vault)
    store = Store(pool)
    sessions = Sessions(store, vault, policy)
    ari = AriClient(settings.ari_url, settings.ari_user, settings.ari_password, settings.ari_app)
    dispatcher = StasisDispatcher(
        ari,
        store,
        FlowSettings(
            trunk_endpoint=settings.trunk_endpoint,
            default_region=settings.default_region,
            ring_timeout=settings.ring_timeout,
        ),
        router=sessions,
    )
    stream = EventStream(ari, dispatcher.handle, on_connected=dispatcher.reconcile)

    async def health() -> dict[str, Any]:
        try:
            db_ok = await pool.fetchval("SELECT 1") == 1
        except Exception:  # noqa: BLE001 - any failure means not healthy
            db_ok = False
        return {"ari": stream.connected.is_set(), "database": db_ok}

    runner = web.AppRunner(make_app(sessions, Pools(store, policy), settings.api_token, health))
    await runner.setup()
    site = web.TCPSite(runner, settings.api_bind, settings.api_port)
    await site.start()
    events = asyncio.create_task(stream.run(), name="ari-events")
    sweeper = asyncio.create_task(housekeeping(sessions, settings.sweep_interval, stop), name="housekeeping")
    log.info("bridge.started", api=f"{settings.api_bind}:{settings.api_port}", app=settings.ari_app)
    try:
        await stop.wait()
    finally:
        log.info("bridge.stopping")
        stream.stop()
        events.cancel()
        sweeper.cancel()
        await asyncio.gather(events, sweeper, return_exceptions=True)
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
