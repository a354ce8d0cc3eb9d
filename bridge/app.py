"""Wiring: the ARI event stream, the call dispatcher, the store, the session housekeeping
and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from bridge.api.http import make_app
from bridge.blocklist import Blocklist
from bridge.ari import AriClient, EventStream
from bridge.calls.flow import FlowSettings
from bridge.calls.order_code import KeypadTiming
from bridge.calls.stasis import StasisDispatcher
from bridge.config import Settings
from bridge.crypto import NumberVault
from bridge.pools import Pools
from bridge.recordings import Recordings
from bridge.sessions import Policy, Sessions
from bridge.store import Store, connect, migrate
from bridge.store.blocklist import CHANNEL as BLOCKLIST_CHANNEL
from bridge.store.sessions import PARTICIPANTS_LEFT
from bridge.store.webhooks import WebhookRepo
from bridge.webhooks import Deliverer

log = structlog.get_logger(__name__)

RETENTION_EVERY = 3600.0  # seconds between two runs of the retention job


def policy_of(settings: Settings) -> Policy:
    return Policy(
        default_region=settings.default_region,
        session_ttl=settings.session_ttl,
        grace_period=settings.grace_period,
        pair_cooloff=settings.pair_cooloff,
        number_cooling=settings.number_cooling,
        retention_days=settings.retention_days,
        support_number=settings.support_number or None,  # normalized by Settings
        default_language=settings.default_language,
        order_code_length=settings.order_code_length,
        order_code_attempts=settings.order_code_attempts,
        order_code_lockout=settings.order_code_lockout,
        terms=settings.terms,
    )


async def housekeeping(
    sessions: Sessions, interval: float, stop: asyncio.Event, recordings: Recordings | None = None
) -> None:
    """Expire sessions, end cool-offs and grace periods, retire cooled numbers; purge old
    real numbers and delete old recordings once an hour. Routing checks expiry itself, so a
    late sweep is harmless."""
    last_purge = -RETENTION_EVERY
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            counts = await sessions.sweep()
            if counts:
                log.info("housekeeping.swept", **counts)
            if loop.time() - last_purge >= RETENTION_EVERY:
                await sessions.purge()
                if recordings is not None:
                    await recordings.purge()
                last_purge = loop.time()
        except Exception:
            log.exception("housekeeping.failed")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()


async def cut_listener(
    database_url: str, store: Store, dispatcher: StasisDispatcher, stop: asyncio.Event
) -> None:
    """Ends the calls in progress of every number blocked, and of every participant who left
    their order (a courier reassigned, a session closed or expired), from this process or any
    other (the API, maskbridge-admin and the housekeeping of any bridge all notify through
    Postgres). After every (re)connect it also checks the calls in progress against the
    blocklist and the sessions: what happened while it was not listening is applied too."""
    backoff = 0.5
    notices: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def cut(ids: set[uuid.UUID], reason: str) -> None:
        count = dispatcher.cut_calls(ids, reason)
        if count:
            log.info("calls.cut", calls=count, reason=reason)

    def heard(_conn: object, _pid: int, channel: str, payload: str) -> None:
        notices.put_nowait((channel, payload))

    while not stop.is_set():
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(database_url)
            await conn.add_listener(BLOCKLIST_CHANNEL, heard)
            await conn.add_listener(PARTICIPANTS_LEFT, heard)
            live = dispatcher.live_participant_ids()
            cut(await store.blocklist.blocked_among(live), "blocked")
            for participant, reason in (await store.sessions.left_among(live)).items():
                cut({participant}, reason)
            backoff = 0.5
            while not stop.is_set():
                try:
                    async with asyncio.timeout(5):
                        channel, payload = await notices.get()
                except TimeoutError:
                    await conn.fetchval("SELECT 1")  # a dead connection shows here
                    continue
                if channel == BLOCKLIST_CHANNEL:
                    cut(await store.blocklist.participant_ids(bytes.fromhex(payload)), "blocked")
                else:
                    reason, _, ids = payload.partition(" ")
                    cut({uuid.UUID(i) for i in ids.split(",") if i}, reason)
        except Exception:
            log.exception("cut_listener.failed")
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await stop.wait()
            backoff = min(backoff * 2, 10)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    vault = NumberVault(settings.number_key)
    policy = policy_of(settings)
    pool = await connect(settings.database_url)
    await migrate(pool, vault)
    store = Store(pool, webhooks=bool(settings.webhook_url))
    sessions = Sessions(store, vault, policy)
    ari = AriClient(settings.ari_url, settings.ari_user, settings.ari_password, settings.ari_app)
    dispatcher = StasisDispatcher(
        ari,
        store,
        FlowSettings(
            trunk_endpoint=settings.trunk_endpoint,
            default_region=settings.default_region,
            ring_timeout=settings.ring_timeout,
            duration_warning=settings.duration_warning,
            confirm_wait=settings.confirm_timeout,
            block_keys=settings.block_keys,
            default_language=settings.default_language,
            keypad=KeypadTiming(length=settings.order_code_length),
            order_code_attempts=settings.order_code_attempts,
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

    blocklist = Blocklist(store, vault, policy)
    recordings = Recordings(store, ari, settings.recording_token, settings.api_token,
                            settings.recording_retention_days)
    runner = web.AppRunner(
        make_app(sessions, Pools(store, policy), blocklist, settings.api_token, health, recordings)
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.api_bind, settings.api_port)
    await site.start()
    events = asyncio.create_task(stream.run(), name="ari-events")
    sweeper = asyncio.create_task(
        housekeeping(sessions, settings.sweep_interval, stop, recordings), name="housekeeping"
    )
    blocks = asyncio.create_task(
        cut_listener(settings.database_url, store, dispatcher, stop), name="cut-listener"
    )
    background = [sweeper, blocks]
    if settings.webhook_url:
        deliverer = Deliverer(WebhookRepo(pool), settings.webhook_url, settings.webhook_secret)
        background.append(asyncio.create_task(deliverer.run(stop), name="webhooks"))
    log.info("bridge.started", api=f"{settings.api_bind}:{settings.api_port}", app=settings.ari_app)
    try:
        await stop.wait()
    finally:
        log.info("bridge.stopping")
        stream.stop()
        events.cancel()
        for task in background:
            task.cancel()
        await asyncio.gather(events, *background, return_exceptions=True)
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
