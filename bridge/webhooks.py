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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time

import aiohttp
import structlog

from bridge import metrics
from bridge.store.webhooks import Pending, WebhookRepo

log = structlog.get_logger(__name__)

ATTEMPTS = 15
BATCH = 32
TIMEOUT = 10.0


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


async def prune(repo: WebhookRepo, retention_days: int) -> dict[str, int]:
    """The outbox's retention: events delivered or given up more than `retention_days` ago
    are deleted (their payloads hold ids and times of calls: kept no longer than needed)."""
    deleted = await repo.prune(retention_days)
    log.info("retention.webhooks_pruned", older_than_days=retention_days, webhooks_deleted=deleted)
    return {"webhooks_deleted": deleted}


def backoff(attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones."""
    return float(min(2 ** max(attempts - 1, 0), 300))


class Deliverer:
    def __init__(self, repo: WebhookRepo, url: str, secret: str, poll: float = 0.5) -> None:
        self.repo = repo
        self.url = url
        self.secret = secret
        self.poll = poll

    def body(self, event: Pending) -> bytes:
        data = json.loads(event.payload) if isinstance(event.payload, str) else event.payload
        envelope = {"id": str(event.id), "seq": event.seq, "type": event.event,
                    "created_at": event.created_at.isoformat(), "data": data}
        return json.dumps(envelope, separators=(",", ":")).encode()

    async def _send(self, http: aiohttp.ClientSession, event: Pending) -> None:
        body = self.body(event)
        headers = {
            "Content-Type": "application/json",
            "X-Maskbridge-Event": event.event,
            "X-Maskbridge-Delivery": str(event.id),
            "X-Maskbridge-Signature": signature(self.secret, int(time.time()), body),
        }
        try:
            async with http.post(self.url, data=body, headers=headers) as resp:
                if 200 <= resp.status < 300:
                    await self.repo.delivered(event.id)
                    metrics.WEBHOOK_ATTEMPTS.labels("delivered").inc()
                    return
                error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        attempts = event.attempts + 1
        retry_in = backoff(attempts) if attempts < ATTEMPTS else None
        await self.repo.failed(event.id, error, retry_in)
        metrics.WEBHOOK_ATTEMPTS.labels("retry" if retry_in is not None else "gave_up").inc()
        log.warning("webhook.failed", event_id=str(event.id), kind=event.event, attempts=attempts,
                    error=error, gave_up=retry_in is None)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
            while not stop.is_set():
                try:
                    batch = await self.repo.claim(BATCH, lease_seconds=int(TIMEOUT) + 5)
                    if batch:
                        await asyncio.gather(*(self._send(http, e) for e in batch))
                        continue  # maybe more are due
                except Exception:
                    log.exception("webhook.delivery_failed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll):
                        await stop.wait()
