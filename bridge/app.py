"""Wiring: the ARI event stream, the call dispatcher, the store, the session housekeeping
and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from bridge import memory, metrics, nodes, webhooks
from bridge.api.http import make_app
from bridge.api.ratelimit import RateLimiter
from bridge.api.server import REQUEST_TIMEOUT, ConnectionGuard
from bridge.api.server import serve as serve_api
from bridge.blocklist import Blocklist
from bridge.ari import AriClient, EventStream
from bridge.calls.events import WANTED_EVENTS
from bridge.calls.flow import FlowSettings
from bridge.calls.order_code import KeypadTiming
from bridge.calls.flood import UnknownCallers
from bridge.calls.stasis import StasisDispatcher
from bridge.config import Settings
from bridge.crypto import MasterKeys, NumberVault, VaultError
from bridge.number_keys import NumberKeys
from bridge.pools import Pools
from bridge.recordings import Recordings
from bridge.sessions import Policy, Sessions
from bridge.store import Store, connect, migrate
from bridge.store.db import COMMAND_TIMEOUT, CONNECT_TIMEOUT
from bridge.store.blocklist import CHANNEL as BLOCKLIST_CHANNEL
from bridge.store.number_keys import CHANNEL as NUMBER_KEYS_CHANNEL
from bridge.store.number_keys import NumberKeyRepo
from bridge.store.errors import database_unreachable
from bridge.store.nodes import SWEEP_LOCK, NodeRepo
from bridge.store.sessions import PARTICIPANTS_LEFT
from bridge.store.tokens import TokenRepo
from bridge.store.webhooks import WebhookRepo
from bridge.tokens import Tokens
from bridge.webhooks import Deliverer

log = structlog.get_logger(__name__)

RETENTION_EVERY = 3600.0  # seconds between two runs of the retention job
METRICS_EVERY = 10.0  # seconds between two reads of the metrics the database holds
HEALTH_TIMEOUT = 2.0  # seconds /healthz waits for the database, and for Asterisk
DUE_POLL = 1.0  # seconds between two looks of the housekeeping for a session coming due


class SharedCheck:
    """A health check run once at a time: callers that come while it runs wait for that run
    and share its answer. /healthz needs no token, so a flood of it costs Asterisk and the
    database one check at a time, never an ARI or database connection each. (No answer is
    kept once given: the next caller runs the check again, so a PBX that hangs is seen by
    the first check after it does.)"""

    def __init__(self, check: Callable[[], Awaitable[bool]]) -> None:
        self._check = check
        self._running: asyncio.Future[bool] | None = None

    async def __call__(self) -> bool:
        if self._running is None:
            running = self._running = asyncio.ensure_future(self._check())
            running.add_done_callback(self._done)
        # (a caller that goes away, its request cancelled, leaves the run to the others)
        return await asyncio.shield(self._running)

    def _done(self, finished: asyncio.Future[bool]) -> None:
        if self._running is finished:
            self._running = None


def _outcome_read(task: asyncio.Future[Any]) -> None:
    """(A task left to finish on its own: its failure, if any, is read, not reported as lost.)"""
    if not task.cancelled():
        task.exception()


def policy_of(settings: Settings) -> Policy:
    return Policy(
        default_region=settings.default_region,
        session_ttl=settings.session_ttl,
        grace_period=settings.grace_period,
        pair_cooloff=settings.pair_cooloff,
        number_cooling=settings.number_cooling,
        retention_days=settings.retention_days,
        support_number=settings.support_number or None,  # normalized by Settings
        destinations=settings.allowed_destinations,
        default_language=settings.default_language,
        order_code_length=settings.order_code_length,
        order_code_attempts=settings.order_code_attempts,
        order_code_lockout=settings.order_code_lockout,
        terms=settings.terms,
    )


Exclusive = Callable[[int], contextlib.AbstractAsyncContextManager[bool]]


async def housekeeping(
    sessions: Sessions, interval: float, stop: asyncio.Event, recordings: Recordings | None = None,
    exclusive: Exclusive | None = None, prune_webhooks: Callable[[], Awaitable[dict[str, int]]] | None = None,
) -> None:
    """Expire sessions, end cool-offs and grace periods, retire cooled numbers; purge old
    real numbers, delete old recordings and prune the webhook outbox (`prune_webhooks`) once
    an hour. It sweeps every `interval` seconds, and as soon as a session reaches its expiry
    or the end of its grace period: a session's end also ends its calls in progress (the
    participants leave: cut_listener), which must not wait for the next sweep.

    With several nodes, one bridge at a time sweeps and purges numbers (`exclusive`, an
    advisory lock: the others skip that round; whichever comes next takes it) and prunes the
    webhook outbox; each node deletes the recordings in its own spool."""
    last_purge = -RETENTION_EVERY
    loop = asyncio.get_running_loop()
    alone: Exclusive = exclusive or (lambda _key: _always())
    while not stop.is_set():
        try:
            async with alone(SWEEP_LOCK) as leader:
                if leader:
                    counts = await sessions.sweep()
                    if counts:
                        log.info("housekeeping.swept", **counts)
            # (a round another bridge swept counts: the housekeeping runs)
            metrics.HOUSEKEEPING_LAST_RUN.set(time.time())
        except Exception:
            log.exception("housekeeping.failed")
        if loop.time() - last_purge >= RETENTION_EVERY:
            done = True
            try:
                async with alone(SWEEP_LOCK) as leader:
                    if leader:
                        done = await _retention("numbers", sessions.purge, "participants")
                        if prune_webhooks is not None:
                            done = await _retention("webhooks", prune_webhooks, "webhooks_deleted") and done
            except Exception:
                log.exception("retention.failed", job="numbers")
                done = False
            if recordings is not None:
                done = await _retention("recordings", recordings.purge, "recordings_deleted") and done
            if done:
                last_purge = loop.time()  # (a job that failed runs again at the next sweep)
        # Until the next sweep, a look every DUE_POLL seconds for a session reaching its expiry
        # or the end of its grace period (one opened meanwhile too, by any process): it is
        # swept then, not up to `interval` later, since its calls in progress end with it.
        next_sweep = loop.time() + interval
        while not stop.is_set() and loop.time() < next_sweep:
            wait = min(DUE_POLL, next_sweep - loop.time())
            try:
                due_in = await sessions.next_due_in()
            except Exception as exc:
                if database_unreachable(exc):  # (said every second while it lasts: no traceback)
                    log.warning("housekeeping.database_unavailable", error=type(exc).__name__)
                else:
                    log.exception("housekeeping.next_due_failed")
                due_in = None
            if due_in is not None and due_in <= wait:
                with contextlib.suppress(TimeoutError):
                    # (never sooner than 0.25 s: a session due that a sweep could not end is not
                    # swept in a busy loop)
                    async with asyncio.timeout(max(due_in + 0.05, 0.25)):
                        await stop.wait()
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()


@contextlib.asynccontextmanager
async def _always() -> Any:
    yield True


async def _retention(job: str, purge: Callable[[], Awaitable[dict[str, int]]], deleted: str) -> bool:
    """One run of a retention job, counted in the metrics; whether it ran to the end."""
    try:
        counts = await purge()
    except Exception:
        log.exception("retention.failed", job=job)
        metrics.RETENTION_RUNS.labels(job, "failed").inc()
        return False
    metrics.RETENTION_RUNS.labels(job, "ok").inc()
    metrics.RETENTION_LAST_SUCCESS.labels(job).set(time.time())
    metrics.RETENTION_DELETED.labels(job).inc(counts.get(deleted, 0))
    return True


async def cut_listener(
    database_url: str, dispatcher: StasisDispatcher, stop: asyncio.Event, vault: NumberVault | None = None
) -> None:
    """Ends the calls in progress of every number blocked, and of every participant who left
    their order (a courier reassigned, a session closed or expired), from this process or any
    other (the API, maskbridge-admin and the housekeeping of any bridge all notify through
    Postgres). After every (re)connect it also checks the calls in progress against the
    blocklist and the sessions: what happened while it was not listening is applied too. A
    connection that dies is noticed at once (asyncpg's termination listener), not at the next
    keepalive. It also makes `vault` forget the data keys that retention destroys."""
    backoff = 0.5
    notices: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def heard(_conn: object, _pid: int, channel: str, payload: str) -> None:
        notices.put_nowait((channel, payload))

    current: list[object] = []  # the connection listened on now

    def lost(conn: object) -> None:
        # (asyncpg calls this soon after a close, when the next connection may already be
        # listening: a notice of an earlier connection is no news of the current one)
        if current and conn is current[0]:
            notices.put_nowait((_LOST, ""))

    while not stop.is_set():
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(database_url, server_settings={"application_name": LISTENER_NAME},
                                         timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT)
            current[:] = [conn]
            conn.add_termination_listener(lost)
            await conn.add_listener(BLOCKLIST_CHANNEL, heard)
            await conn.add_listener(PARTICIPANTS_LEFT, heard)
            await conn.add_listener(NUMBER_KEYS_CHANNEL, heard)
            await dispatcher.cut_departed()
            if vault is not None:  # (keys destroyed while it was not listening: forgotten too)
                vault.forget(vault.cached_periods() - set(await NumberKeyRepo(conn).periods()))
            backoff = 0.5
            while not stop.is_set():
                try:
                    async with asyncio.timeout(5):
                        channel, payload = await notices.get()
                except TimeoutError:
                    await conn.fetchval("SELECT 1")  # a connection that died unnoticed shows here
                    continue
                if channel == _LOST:
                    raise ConnectionError("the listening connection was closed")
                if channel == NUMBER_KEYS_CHANNEL:
                    if vault is not None:
                        vault.forget(date.fromisoformat(p) for p in payload.split(",") if p)
                elif channel == BLOCKLIST_CHANNEL:
                    dispatcher.cut_calls(await dispatcher.store.blocklist.participant_ids(bytes.fromhex(payload)),
                                         "blocked")
                else:
                    reason, _, ids = payload.partition(" ")
                    dispatcher.cut_calls({uuid.UUID(i) for i in ids.split(",") if i}, reason)
        except Exception:
            log.exception("cut_listener.failed")
        finally:
            current.clear()
            if conn is not None and not conn.is_closed():
                await conn.close()
            while not notices.empty():  # (a lost connection's own notice, left over)
                notices.get_nowait()
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await stop.wait()
            backoff = min(backoff * 2, 10)


_LOST = "\0lost"  # cut_listener's own notice: the connection closed
LISTENER_NAME = "maskbridge-cut-listener"  # its application_name in pg_stat_activity


class StartupError(Exception):
    """The bridge cannot start as it is configured: one line saying why (exit status 2)."""


DB_START_WAIT = 30.0  # seconds a database that does not answer yet is waited for at start


async def connect_at_start(dsn: str, wait: float = DB_START_WAIT) -> asyncpg.Pool:
    """The pool, once the database answers: a database still starting (refused, no answer)
    is waited for up to `wait` seconds; one that refuses the bridge, or a URL that cannot be
    used, is a StartupError at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.5
    while True:
        try:
            return await connect(dsn)
        except asyncpg.InvalidAuthorizationSpecificationError as exc:  # (a wrong password too)
            raise StartupError(f"the database refused the bridge (MB_DATABASE_URL): {exc}") from None
        except asyncpg.InvalidCatalogNameError as exc:
            raise StartupError(f"the database of MB_DATABASE_URL does not exist: {exc}") from None
        except socket.gaierror as exc:
            raise StartupError(f"the database's host (MB_DATABASE_URL) is unknown: {exc.strerror}") from None
        except (ValueError, asyncpg.ClientConfigurationError) as exc:
            raise StartupError(f"MB_DATABASE_URL cannot be used: {exc}") from None
        except (OSError, asyncpg.PostgresConnectionError) as exc:
            if loop.time() + delay > deadline:
                raise StartupError(f"the database (MB_DATABASE_URL) did not answer for {wait:.0f} s: "
                                   f"{exc or type(exc).__name__}") from None
            log.warning("db.unreachable_at_start", error=str(exc) or type(exc).__name__, retry_in=delay)
            await asyncio.sleep(delay)  # (a database still starting: looked at again shortly)
            delay = min(delay * 2, 5.0)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    policy = policy_of(settings)
    pool = await connect_at_start(settings.database_url)
    vault = NumberVault(MasterKeys(settings.number_keys), NumberKeyRepo(pool))
    await migrate(pool, vault)
    try:
        await NumberKeys(NumberKeyRepo(pool), vault).check_versions()
        await vault.start()
    except VaultError as exc:
        await pool.close()
        raise StartupError(str(exc)) from None
    # This node's claim first: a second bridge for one Asterisk stops here (NodeTaken).
    claimed = await nodes.claim(settings.database_url, settings.node_id, node_api_url(settings),
                                settings.node_sip_address or None)
    store = Store(pool, webhooks=bool(settings.webhook_url), node=settings.node_id)
    # The HTTP API's requests run on a pool of their own, of MB_API_DB_CONNECTIONS: an order
    # system's burst waits its turn there, and never takes the connection a call's route
    # lookup needs; more of its statements at once would only fight for the database's cores
    # (README "Database connections": measured with make bench-sizes).
    try:
        api_pool = await connect(settings.database_url, max_size=settings.api_db_connections, name="api")
    except BaseException:
        await claimed.close()
        await pool.close()
        raise
    api_store = Store(api_pool, webhooks=bool(settings.webhook_url), node=settings.node_id)

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
        unknown_callers=UnknownCallers(settings.unknown_caller_limit, settings.unknown_caller_total),
    )
    stream = EventStream(ari, dispatcher.handle, on_connected=dispatcher.reconcile, event_types=WANTED_EVENTS)
    keeper = nodes.NodeKeeper(settings.database_url, NodeRepo(pool), settings.node_id,
                              api_url=node_api_url(settings), sip_address=settings.node_sip_address or None,
                              timeout=settings.node_timeout, webhooks=bool(settings.webhook_url), conn=claimed,
                              alive=stream.connected.is_set, after_silence=dispatcher.end_reaped)
    metrics.CALLS_IN_PROGRESS.source = dispatcher.call_states

    async def database_up() -> bool:
        """A query answered within 2 s. One given up on is not waited for: asyncpg cancels
        it by asking the database, which hangs too (the answer took 7 s, not 2)."""
        query = asyncio.ensure_future(pool.fetchval("SELECT 1"))
        query.add_done_callback(_outcome_read)
        done, _ = await asyncio.wait({query}, timeout=HEALTH_TIMEOUT)
        if not done:
            query.cancel()
            return False
        return not query.cancelled() and query.exception() is None and query.result() == 1

    async def asterisk_up() -> bool:
        """The event stream is connected and Asterisk answers within 2 s. (A connected stream
        alone is not enough: the socket of an Asterisk that hangs stays open until the
        websocket's heartbeat misses, 15 s and more.)"""
        if not stream.connected.is_set():
            return False
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await ari.ping()
        except Exception:  # noqa: BLE001 - any failure means not healthy
            return False
        return True

    ari_check, db_check = SharedCheck(asterisk_up), SharedCheck(database_up)

    async def health() -> dict[str, Any]:
        ari_ok, db_ok = await asyncio.gather(ari_check(), db_check())
        metrics.DATABASE_UP.set(db_ok)
        return {"ari": ari_ok, "database": db_ok}

    blocklist = Blocklist(api_store, vault, policy)
    recordings = Recordings(store, ari, settings.recording_token, settings.recording_retention_days,
                            node=settings.node_id, peers=NodeRepo(pool).api_url)  # (housekeeping's)
    tokens = Tokens(TokenRepo(api_pool), settings.api_token, settings.recording_token)
    guard = ConnectionGuard()
    runner = web.AppRunner(
        make_app(Sessions(api_store, vault, policy), Pools(api_store, policy), blocklist, tokens, health,
                 Recordings(api_store, ari, settings.recording_token, settings.recording_retention_days,
                            node=settings.node_id, peers=NodeRepo(api_pool).api_url),
                 guard,
                 RateLimiter(settings.api_rate, settings.api_burst),
                 conflicts=RateLimiter(settings.api_conflict_rate / 60, settings.api_conflict_burst),
                 addresses=RateLimiter(settings.api_address_rate, settings.api_address_burst)),
        keepalive_timeout=REQUEST_TIMEOUT,
    )
    await runner.setup()
    try:
        listening = await serve_api(runner, settings.api_bind, settings.api_port, guard)
    except OSError as exc:
        await runner.cleanup()
        await claimed.close()
        await api_pool.close()
        await pool.close()
        raise StartupError(f"the API cannot listen on {settings.api_bind}:{settings.api_port} "
                           f"(MB_API_BIND, MB_API_PORT): {exc.strerror or exc}") from None
    try:
        await nodes.guard_asterisk(ari, claimed, settings.node_id, settings.node_timeout)
    except nodes.NodeTaken:
        listening.close()
        await runner.cleanup()
        await ari.close()
        await claimed.close()
        await api_pool.close()
        await pool.close()
        raise
    events = asyncio.create_task(stream.run(), name="ari-events")
    sweeper = asyncio.create_task(
        housekeeping(sessions, settings.sweep_interval, stop, recordings, store.exclusive,
                     functools.partial(webhooks.prune, WebhookRepo(pool), settings.webhook_retention_days)),
        name="housekeeping",
    )
    blocks = asyncio.create_task(
        cut_listener(settings.database_url, dispatcher, stop, vault), name="cut-listener"
    )
    gauges = asyncio.create_task(metrics.refresher(store, METRICS_EVERY, stop), name="metrics")
    background = [sweeper, blocks, gauges, asyncio.create_task(keeper.run(stop), name="node"),
                  asyncio.create_task(memory.trim_freed(stop), name="memory")]
    if settings.webhook_url:
        deliverer = Deliverer(WebhookRepo(pool), settings.webhook_url, settings.webhook_secret)
        background.append(asyncio.create_task(deliverer.run(stop), name="webhooks"))
    log.info("bridge.started", api=f"{settings.api_bind}:{settings.api_port}", app=settings.ari_app,
             node=settings.node_id)
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
        listening.close()
        await runner.cleanup()
        await tokens.touches_written()  # (the last uses the last requests were due to write)
        await ari.close()
        await api_pool.close()
        await pool.close()
    if keeper.taken is not None:
        raise keeper.taken


def node_api_url(settings: Settings) -> str | None:
    """Where the other nodes' bridges reach this one's API (MB_NODE_API_URL, or the API's own
    address when it is one they can reach)."""
    if settings.node_api_url:
        return settings.node_api_url.rstrip("/")
    if settings.api_bind in ("0.0.0.0", "::", ""):
        return None
    host = f"[{settings.api_bind}]" if ":" in settings.api_bind else settings.api_bind
    return f"http://{host}:{settings.api_port}"


async def main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)
