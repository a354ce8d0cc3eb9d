"""Prometheus metrics of the bridge, served at GET /metrics (no token) on the API's address.

Every family is named maskbridge_*. No label ever holds a real number, an order id, an order
code or a call id: labels are outcomes, roles, regions, states, route templates and ARI
operations, each from a short closed list. (A region is an ISO 3166 code the API checked.)

The families the database holds (pool numbers, sessions, the webhook backlog) are refreshed
by `refresh_from_store` every few seconds; with several bridges on one database each reports
the same values: aggregate them with max(), not sum().
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.calls.outcomes import CUT_REASONS, OUTCOMES, STATES
from bridge.store.errors import database_unreachable

log = structlog.get_logger(__name__)

disable_created_metrics()  # (the *_created series double the output and no query here needs them)
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Who called whom: the caller's role and the other phone's, or "unrouted" (an unknown caller,
# a number that is no pool number, a call refused before its route was known).
DIRECTIONS = ("courier_to_client", "client_to_courier", "client_to_support", "unrouted")


def direction(caller_role: str | None, callee_role: str | None) -> str:
    name = f"{caller_role}_to_{callee_role}"
    return name if name in DIRECTIONS else "unrouted"


# --- calls ------------------------------------------------------------------------------------

CALLS = Counter("maskbridge_calls", "Calls ended, by outcome and direction.", ["outcome", "direction"],
                registry=REGISTRY)
CALLS_PUT_THROUGH = Counter(
    "maskbridge_calls_put_through", "Calls for which the other phone's leg was created (seizures; the answer-seizure "
    "ratio is answered calls over these).", ["direction"], registry=REGISTRY)
UNKNOWN_CALLERS_REFUSED = Counter(
    "maskbridge_unknown_callers_refused", "Unknown callers hung up unanswered (SIP 403) for being too many, by the "
    "limit they reached (pool_number: MB_UNKNOWN_CALLER_LIMIT; total: MB_UNKNOWN_CALLER_TOTAL).", ["limit"],
    registry=REGISTRY)
CALLS_SHED = Counter("maskbridge_calls_shed", "New calls hung up unanswered (SIP 503) before their route lookup, for "
                     "too many calls being routed at once.", registry=REGISTRY)
CALLS_CUT = Counter("maskbridge_calls_cut", "Calls the bridge ended itself, by reason.", ["reason"],
                    registry=REGISTRY)
POST_DIAL_DELAY = Histogram(
    "maskbridge_post_dial_delay_seconds",
    "From the caller's call reaching the bridge to the other phone ringing (or answering): the bridge's setup "
    "plus the other network's.", registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20))
CALL_SETUP = Histogram(
    "maskbridge_call_setup_seconds",
    "The bridge's own share of the post-dial delay: from the caller's call reaching the bridge to the other "
    "phone's leg being dialed.", registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
ROUTE_LOOKUP = Histogram(
    "maskbridge_route_lookup_seconds", "Finding where a call goes in the database, by how it was found (the "
    "caller's number, or an order code).", ["by"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
CALL_DURATION = Histogram(
    "maskbridge_call_duration_seconds", "How long answered calls talked.", registry=REGISTRY,
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 3600))


class _CallsInProgress(Collector):
    """maskbridge_calls_in_progress{state}, read from the dispatcher at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[str]] = lambda: ()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("maskbridge_calls_in_progress", "Calls in progress in this bridge, by state.",
                                   labels=["state"])
        counts = dict.fromkeys((s for s in STATES if s != "ended"), 0)
        counts["consent"] = 0
        for state in self.source():
            if state in counts:
                counts[state] += 1
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family


CALLS_IN_PROGRESS = _CallsInProgress()
REGISTRY.register(CALLS_IN_PROGRESS)

# --- ARI ------------------------------------------------------------------------------------------

ARI_CONNECTED = Gauge("maskbridge_ari_connected", "1 while the ARI event stream is connected (and caught up).",
                      registry=REGISTRY)
ARI_RECONNECTS = Counter("maskbridge_ari_reconnects", "ARI event stream connections lost or refused.",
                         registry=REGISTRY)
ARI_EVENTS = Counter("maskbridge_ari_events", "ARI events received, by type.", ["type"], registry=REGISTRY)
ARI_REQUEST = Histogram(
    "maskbridge_ari_request_seconds", "ARI REST requests, by operation (method and path template).",
    ["operation"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
ARI_ERRORS = Counter("maskbridge_ari_request_errors", "ARI REST requests that failed, by operation and status "
                     "(0: no answer).", ["operation", "status"], registry=REGISTRY)

# The words of ARI's paths; any other segment is an id (a channel, bridge, playback or
# recording name), shown as {id}.
_ARI_WORDS = frozenset({
    "channels", "create", "dial", "answer", "ring", "hold", "moh", "dtmf", "variable", "play", "snoop", "record",
    "bridges", "addChannel", "removeChannel", "playbacks", "recordings", "live", "stored", "file", "stop",
    "applications", "subscription", "asterisk", "info", "ping", "events", "endpoints", "redirect", "mute", "silence",
})


def ari_operation(method: str, path: str) -> str:
    """`POST /channels/{id}/answer` from `POST /channels/1764071234.56/answer`."""
    parts = [p if p in _ARI_WORDS else "{id}" for p in path.strip("/").split("/") if p]
    return f"{method} /" + "/".join(parts)


# --- the database pool ---------------------------------------------------------------------------

# The bridge has two pools (bridge.store.db.connect): "calls", for calls, housekeeping and
# everything else of the process, and "api", for the HTTP API's requests (MB_API_DB_CONNECTIONS).
DB_ACQUIRE = Histogram("maskbridge_db_pool_acquire_seconds", "Time to get a database connection from the pool.",
                       ["pool"], registry=REGISTRY,
                       buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
DATABASE_UP = Gauge("maskbridge_database_up", "1 while the bridge reaches its database (its last metrics read or "
                    "health check worked), 0 when not; the families read from the database keep their last "
                    "values meanwhile.", registry=REGISTRY)
DB_WAITS = Counter("maskbridge_db_pool_waits", "Connection requests that found no idle connection in the pool.",
                   ["pool"], registry=REGISTRY)


class _DatabasePools(Collector):
    def __init__(self) -> None:
        self.pools: dict[str, Any] = {}  # pool name -> asyncpg pool

    def collect(self) -> Iterable[GaugeMetricFamily]:
        in_use = GaugeMetricFamily("maskbridge_db_pool_connections", "Database connections of each pool, by state.",
                                   labels=["pool", "state"])
        biggest = GaugeMetricFamily("maskbridge_db_pool_max_connections", "The most connections each pool opens.",
                                    labels=["pool"])
        for name, pool in list(self.pools.items()):
            size, idle = pool.get_size(), pool.get_idle_size()
            in_use.add_metric([name, "in_use"], size - idle)
            in_use.add_metric([name, "idle"], idle)
            biggest.add_metric([name], pool.get_max_size())
        yield in_use
        yield biggest


DATABASE_POOLS = _DatabasePools()
REGISTRY.register(DATABASE_POOLS)


# --- sessions, pools, blocks, webhooks, retention ---------------------------------------------------

SESSIONS_OPENED = Counter("maskbridge_sessions_opened", "Sessions opened, by mode.", ["mode"], registry=REGISTRY)
SESSION_OPENS_PER_STATEMENT = Histogram(
    "maskbridge_session_opens_per_statement", "Session opens sent to the database in one statement: those that came "
    "while earlier ones' statements ran go together.", registry=REGISTRY, buckets=(1, 2, 4, 8, 16))
TOKEN_LOOKUPS_PER_STATEMENT = Histogram(
    "maskbridge_token_lookups_per_statement", "Named API tokens' lookups answered by one statement: the requests "
    "that came while the statement before ran.", registry=REGISTRY, buckets=(1, 2, 4, 8, 16, 32, 64))
SESSIONS = Gauge("maskbridge_sessions", "Live sessions by status, open or grace (from the database).", ["status"],
                 registry=REGISTRY)
POOL_NUMBERS = Gauge("maskbridge_pool_numbers", "Pool numbers by region (\"none\": no region), state and mode "
                     "(from the database).", ["region", "state", "mode"], registry=REGISTRY)
POOL_BUSIEST_HOLDER = Gauge(
    "maskbridge_pool_busiest_holder_numbers",
    "Per region: the most active direct pool numbers of the region one real number holds (in live sessions or "
    "cool-off). When it reaches the region's active direct numbers, that person's next session gets a number of "
    "another region, or none (from the database).", ["region"], registry=REGISTRY)
POOL_EXHAUSTED = Counter("maskbridge_pool_exhausted", "Session opens refused because no pool number was free "
                         "(pool_exhausted), by mode and the region asked for (\"any\": none).", ["mode", "region"],
                         registry=REGISTRY)
ORDER_CODE_LOCKOUTS = Counter("maskbridge_order_code_lockouts", "Callers locked out of an order-code number after too "
                              "many wrong codes.", registry=REGISTRY)
BLOCKS = Counter("maskbridge_blocks", "Numbers blocked, by who blocked them (api: the blocklist; client: a client "
                 "with the block keys, for one session).", ["source"], registry=REGISTRY)
WEBHOOK_BACKLOG = Gauge("maskbridge_webhook_backlog", "Webhook events waiting for delivery (from the database).",
                        registry=REGISTRY)
WEBHOOK_OLDEST = Gauge("maskbridge_webhook_oldest_pending_seconds", "Age of the oldest webhook event waiting for "
                       "delivery; 0 when none waits (from the database).", registry=REGISTRY)
WEBHOOK_ENDPOINT_DOWN = Gauge("maskbridge_webhook_endpoint_down", "1 while webhook deliveries pause, the order "
                              "system's endpoint having failed every recent attempt (one event at a time probes "
                              "it); 0 while it answers.", registry=REGISTRY)
WEBHOOK_ATTEMPTS = Counter("maskbridge_webhook_attempts", "Webhook delivery attempts, by result (delivered; retry: "
                           "failed, tried again later; gave_up: failed for good).", ["result"], registry=REGISTRY)
RETENTION_RUNS = Counter("maskbridge_retention_runs", "Runs of the retention jobs (numbers: real numbers of ended "
                         "sessions; recordings: audio; webhooks: delivered or given-up webhook events), by "
                         "result.", ["job", "result"], registry=REGISTRY)
RETENTION_LAST_SUCCESS = Gauge("maskbridge_retention_last_success_timestamp_seconds", "When each retention job last "
                               "ran to the end (Unix time).", ["job"], registry=REGISTRY)
RETENTION_DELETED = Counter("maskbridge_retention_deleted", "What the retention jobs deleted (participants' real "
                            "numbers, recordings, webhook events).", ["job"], registry=REGISTRY)
NUMBERS_UNREADABLE = Counter("maskbridge_numbers_unreadable", "Sealed real numbers that did not open (damaged, or "
                             "moved into another row), by table and by who met them (read: the API or a call; "
                             "retention: the key retention, which leaves them and destroys their key).",
                             ["table", "where"], registry=REGISTRY)
HOUSEKEEPING_LAST_RUN = Gauge("maskbridge_housekeeping_last_run_timestamp_seconds", "When session housekeeping last "
                              "ran to the end (Unix time).", registry=REGISTRY)

# --- nodes ---------------------------------------------------------------------------------------------

NODE_HEARTBEAT = Gauge("maskbridge_node_heartbeat_timestamp_seconds", "When this bridge last wrote its node's "
                       "heartbeat to the database (Unix time).", registry=REGISTRY)
NODE_LOST_CALLS = Counter("maskbridge_node_lost_calls", "Calls of a lost node (silent, its Asterisk not answering) "
                          "that this bridge's reaper ended as node_lost, by node.", ["node"], registry=REGISTRY)

# --- the HTTP API ---------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter("maskbridge_http_requests", "API requests answered, by route template, method and status.",
                        ["route", "method", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("maskbridge_http_request_seconds", "API request latency, by route template and method.",
                         ["route", "method"], registry=REGISTRY,
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

BUILD = Gauge("maskbridge_build_info", "The bridge's version (value 1).", ["version"], registry=REGISTRY)


def _initialise() -> None:
    """Every series that alerts and the dashboard compute with exists from the start (at 0):
    a rate over a series that is not there yet is no data, not zero."""
    for outcome in OUTCOMES:
        for way in DIRECTIONS:
            CALLS.labels(outcome, way)
    for way in DIRECTIONS:
        CALLS_PUT_THROUGH.labels(way)
    for reason in CUT_REASONS:
        CALLS_CUT.labels(reason)
    for source in ("api", "client"):
        BLOCKS.labels(source)
    for result in ("delivered", "retry", "gave_up"):
        WEBHOOK_ATTEMPTS.labels(result)
    for job in ("numbers", "recordings", "webhooks"):
        for result in ("ok", "failed"):
            RETENTION_RUNS.labels(job, result)
        RETENTION_DELETED.labels(job)
        RETENTION_LAST_SUCCESS.labels(job).set(0)  # never, until the first run (at start)
    for by in ("number", "order_code"):
        ROUTE_LOOKUP.labels(by)
    for mode in ("direct", "order_code"):
        SESSIONS_OPENED.labels(mode)
        POOL_EXHAUSTED.labels(mode, "any")
    try:
        from importlib.metadata import version

        BUILD.labels(version("maskbridge")).set(1)
    except Exception:  # noqa: BLE001 - not installed as a package (a source tree): no version to show
        BUILD.labels("unknown").set(1)


_initialise()


def render() -> bytes:
    return generate_latest(REGISTRY)


# --- what the database holds ------------------------------------------------------------------------


async def refresh_from_store(store: Any) -> None:
    """Set the gauges the database holds (one round of queries)."""
    stats = await store.metrics_snapshot()
    POOL_NUMBERS.clear()
    for row in stats["pool_numbers"]:
        region = row["region"] or "none"
        POOL_NUMBERS.labels(region, row["state"], row["mode"]).set(row["count"])
        # Each region's exhaustion counter exists (at 0) before its first refusal: Prometheus
        # sees no increase in a series whose first sample is already 1.
        if row["region"]:
            for mode in ("direct", "order_code"):  # (a region may be asked for a mode it has no number of)
                POOL_EXHAUSTED.labels(mode, region)
    POOL_BUSIEST_HOLDER.clear()
    for row in stats["busiest_holders"]:
        POOL_BUSIEST_HOLDER.labels(row["region"] or "none").set(row["numbers"])
    for status in ("open", "grace"):
        SESSIONS.labels(status).set(stats["sessions"].get(status, 0))
    WEBHOOK_BACKLOG.set(stats["webhook_backlog"])
    WEBHOOK_OLDEST.set(stats["webhook_oldest_seconds"])


async def refresher(store: Any, interval: float, stop: asyncio.Event) -> None:
    """refresh_from_store every `interval` seconds until `stop`; DATABASE_UP says whether it
    could (the families it reads keep their last values meanwhile: look at it first)."""
    while not stop.is_set():
        try:
            await refresh_from_store(store)
            DATABASE_UP.set(1)
        except Exception as exc:
            DATABASE_UP.set(0)
            if database_unreachable(exc):
                log.warning("metrics.database_unavailable", error=type(exc).__name__)
            else:
                log.exception("metrics.refresh_failed")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
