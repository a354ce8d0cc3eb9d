"""Delivery of signed webhooks to the order system, in the background.

Each event is POSTed as JSON:
    {"id": "<event uuid>", "seq": 42, "type": "call.ended", "created_at": "...", "data": {...}}
with the headers
    X-Maskbridge-Event: call.ended
    X-Maskbridge-Delivery: <event uuid>      (the same on every retry: deduplicate on it)
    X-Maskbridge-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
A 2xx answer delivers it; anything else, or no answer within 10 s, is retried after
1, 2, 4 ... seconds (at most 5 minutes apart), 15 attempts in all. `data` carries
pseudonymous references only (participant and session ids), never a real number.

A redirect is not followed: a 3xx is a failed attempt like any other non-2xx (followed, the
POST became a GET without the event, and a page answering 200 to it took the event for
delivered).

An order system that is down is not hammered: after OPEN_AFTER failed attempts in a row at
events never tried before, each failed by no answer, a redirect, 401, 403, 404, 405, 410,
429 or a 5xx (none delivered between; a batch already on its way fails whole),
deliveries pause and one event at a time probes the endpoint, 1, 2, 4 ... seconds apart (at
most PAUSE_MAX), taking events never tried first; the first one delivered resumes them all.
The events waiting meanwhile are not tried, so they spend none of their attempts. A
deliverer that has just started sends one event first: a batch follows once the endpoint
has answered, and a failure (of the kind above) pauses at once. Another
4xx (400, 422 ...) refuses that one event: the endpoint answers, so it pauses nothing (and
ends a pause); an event that failed before and fails again says little of the endpoint and
counts for nothing. An order system that refuses some
events (a type it does not know, say) and takes the others is up, and the refused ones are
retried on their own schedule. (Before the pause, every event went on being tried on its
own schedule: with the endpoint down, each call's events cost a connection attempt, an outbox
write and a log line every few seconds, about as much of the bridge's CPU as its calls.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time

import aiohttp
import asyncpg
import structlog

from bridge import metrics
from bridge.store.webhooks import Pending, WebhookRepo

log = structlog.get_logger(__name__)

ATTEMPTS = 15
BATCH = 32
TIMEOUT = 10.0
OPEN_AFTER = 5  # failed attempts in a row at events never tried before, none delivered between: a pause
PAUSE_MAX = 10.0  # seconds between two probes of an endpoint that is down, at most
OUTBOX_WAIT_MAX = 10.0  # seconds between two reads of an outbox that could not be read, at most


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


async def prune(repo: WebhookRepo, retention_days: int) -> dict[str, int]:
    """The outbox's retention: events delivered or given up more than `retention_days` ago
    are deleted (their payloads hold ids and times of calls: kept no longer than needed)."""
    deleted = await repo.prune(retention_days)
    log.info("retention.webhooks_pruned", older_than_days=retention_days, webhooks_deleted=deleted)
    return {"webhooks_deleted": deleted}


# Answers about the endpoint, not the event: it is not there (404, 405, 410, a redirect), it
# turns the bridge away (401, 403, 429) or it is in trouble (5xx). Any other 4xx refuses this
# event (its payload, its type): the endpoint is up.
_ENDPOINT_STATUSES = {401, 403, 404, 405, 410, 429}


def endpoint_trouble(status: int) -> bool:
    """Whether a non-2xx answer says the endpoint is down or misconfigured, rather than that
    it refused this one event."""
    return status in _ENDPOINT_STATUSES or 300 <= status < 400 or status >= 500


def backoff(attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones."""
    return float(min(2 ** max(attempts - 1, 0), 300))


class Deliverer:
    def __init__(self, repo: WebhookRepo, url: str, secret: str, poll: float = 0.5,
                 pause_first: float = 1.0, pause_max: float = PAUSE_MAX) -> None:
        self.repo = repo
        self.url = url
        self.secret = secret
        self.poll = poll
        self.pause_first = pause_first
        self.pause_max = pause_max
        self._failed_in_row = 0  # attempts at events never tried before, failed since the last one delivered
        self._unreadable = 0  # claims failed in a row (the database down)
        self._pauses = 0  # pauses since the last delivery: 0 while the endpoint answers
        # Until the endpoint has answered once, one event at a time: a bridge restarted while
        # it is down (or restarting again and again) spends one attempt, not a batch's.
        self._unproven = True
        self._down_since = 0.0
        self._last_error = ""

    @property
    def paused(self) -> bool:
        """The endpoint is taken to be down: one event at a time probes it."""
        return self._pauses > 0

    def body(self, event: Pending) -> bytes:
        data = json.loads(event.payload) if isinstance(event.payload, str) else event.payload
        envelope = {"id": str(event.id), "seq": event.seq, "type": event.event,
                    "created_at": event.created_at.isoformat(), "data": data}
        return json.dumps(envelope, separators=(",", ":")).encode()

    async def _send(self, http: aiohttp.ClientSession, event: Pending) -> bool:
        """One attempt at one event; True when it was delivered."""
        body = self.body(event)
        headers = {
            "Content-Type": "application/json",
            "X-Maskbridge-Event": event.event,
            "X-Maskbridge-Delivery": str(event.id),
            "X-Maskbridge-Signature": signature(self.secret, int(time.time()), body),
        }
        try:
            async with http.post(self.url, data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    await self.repo.delivered(event.id)
                    metrics.WEBHOOK_ATTEMPTS.labels("delivered").inc()
                    self._answered()
                    return True
                error, trouble = f"HTTP {resp.status}", endpoint_trouble(resp.status)
        except TimeoutError:
            error, trouble = f"no answer within {TIMEOUT:g} s", True
        except aiohttp.ClientError as exc:
            error, trouble = f"{type(exc).__name__}: {exc}"[:200], True
        if not trouble:
            self._answered()  # it refused this event, but it is there and answers
        elif event.attempts == 0:
            self._failed_in_row += 1
        self._last_error = error
        attempts = event.attempts + 1
        retry_in = backoff(attempts) if attempts < ATTEMPTS else None
        await self.repo.failed(event.id, error, retry_in)
        metrics.WEBHOOK_ATTEMPTS.labels("retry" if retry_in is not None else "gave_up").inc()
        log.warning("webhook.failed", event_id=str(event.id), kind=event.event, attempts=attempts,
                    error=error, gave_up=retry_in is None)
        return False

    def _answered(self) -> None:
        self._failed_in_row = 0
        self._unproven = False
        if self._pauses:
            log.info("webhook.endpoint_up", down_seconds=round(time.monotonic() - self._down_since, 1),
                     probes=self._pauses)
            self._pauses = 0
            metrics.WEBHOOK_ENDPOINT_DOWN.set(0)

    def _pause(self) -> float:
        """Seconds until the next probe, the endpoint having failed again."""
        if not self._pauses:
            self._down_since = time.monotonic()
            metrics.WEBHOOK_ENDPOINT_DOWN.set(1)
            log.warning("webhook.endpoint_down", failed_in_row=self._failed_in_row, error=self._last_error)
        self._pauses += 1
        return min(self.pause_first * 2.0 ** (self._pauses - 1), self.pause_max)

    async def _claim(self) -> list[Pending] | None:
        """The next due events (one, fresh first, while paused); None when the outbox could
        not be read (the database down: said once, not with a traceback every poll)."""
        try:
            batch = await self.repo.claim(1 if self.paused or self._unproven else BATCH,
                                          lease_seconds=int(TIMEOUT) + 5, fresh_first=self.paused)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            self._unreadable += 1
            if self._unreadable == 1:
                log.warning("webhook.outbox_unreadable", error=f"{type(exc).__name__}: {exc}"[:200])
            return None
        if self._unreadable:
            log.info("webhook.outbox_readable", after_failures=self._unreadable)
            self._unreadable = 0
        return batch

    def _outbox_wait(self) -> float:
        """Seconds until the outbox is read again, after as many failed reads in a row: twice
        as long each time, at most OUTBOX_WAIT_MAX."""
        return min(self.poll * 2.0 ** self._unreadable, OUTBOX_WAIT_MAX)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
            while not stop.is_set():
                wait = self.poll
                try:
                    batch = await self._claim()
                    if batch is None:
                        wait = self._outbox_wait()
                    elif batch:
                        delivered = await asyncio.gather(*(self._send(http, e) for e in batch))
                        if any(delivered) or (self._failed_in_row < OPEN_AFTER and not self._unproven):
                            continue  # maybe more are due
                        wait = self._pause()  # (or the first attempt since the start failed)
                except Exception:
                    log.exception("webhook.delivery_failed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await stop.wait()
