"""Webhook signatures, retry spacing, a refused delivery and the outbox's retention (bridge/webhooks.py)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import pytest
import structlog
from aiohttp import web

from bridge import metrics
from bridge.app import housekeeping
from bridge.store.webhooks import Pending
from bridge.webhooks import ATTEMPTS, Deliverer, backoff, prune, signature


def test_the_signature_is_an_hmac_of_time_and_body():
    body = b'{"id":"x","type":"call.ended"}'
    header = signature("s" * 20, 1764000000, body)
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    assert t == "1764000000"
    assert v1 == hmac.new(b"s" * 20, b"1764000000." + body, hashlib.sha256).hexdigest()
    assert signature("t" * 20, 1764000000, body) != header


def test_retries_back_off_to_five_minutes_and_end():
    waits = [backoff(n) for n in range(1, ATTEMPTS)]
    assert waits[:4] == [1, 2, 4, 8]
    assert max(waits) == 300 and waits == sorted(waits)
    assert sum(waits) > 30 * 60, "an order system down for half an hour still gets its events"


class _Repo:
    """The outbox, in memory: what the deliverer marks delivered or failed."""

    def __init__(self, events: list[Any]) -> None:
        self.due = list(events)
        self.failures: list[tuple[uuid.UUID, str, float | None]] = []
        self.done = asyncio.Event()

    async def claim(self, limit: int, lease_seconds: int) -> list[Any]:
        batch, self.due = self.due[:limit], self.due[limit:]
        return batch

    async def delivered(self, event_id: uuid.UUID) -> None:
        raise AssertionError("the receiver refused it")

    async def failed(self, event_id: uuid.UUID, error: str, retry_in: float | None) -> None:
        self.failures.append((event_id, error, retry_in))
        self.done.set()


async def test_a_refused_delivery_is_recorded_for_retry_and_logged(aiohttp_refusing_url):
    event = Pending(uuid.uuid4(), 1, "call.ended", '{"call_id": "c"}', datetime.now(timezone.utc), 2)
    repo = _Repo([event])
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(Deliverer(repo, aiohttp_refusing_url, "s" * 20, poll=0.05).run(stop))  # type: ignore[arg-type]
        await asyncio.wait_for(repo.done.wait(), 5)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert repo.failures == [(event.id, "HTTP 503", backoff(3))]
    failed = [entry for entry in logs if entry["event"] == "webhook.failed"]
    assert failed and failed[0]["kind"] == "call.ended" and failed[0]["attempts"] == 3
    assert not [entry for entry in logs if entry["event"] == "webhook.delivery_failed"], "the failure path itself works"


@pytest.fixture
async def aiohttp_refusing_url() -> AsyncIterator[str]:
    async def refuse(_request: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/hooks", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hooks"
    await runner.cleanup()


class _Outbox:
    """The outbox's retention, in memory: what prune was asked."""

    def __init__(self, deleted: int) -> None:
        self.deleted = deleted
        self.asked: list[int] = []

    async def prune(self, older_than_days: int) -> int:
        self.asked.append(older_than_days)
        return self.deleted


async def test_pruning_the_outbox_is_logged_with_its_count():
    outbox = _Outbox(deleted=1234)
    with structlog.testing.capture_logs() as logged:
        assert await prune(outbox, 7) == {"webhooks_deleted": 1234}  # type: ignore[arg-type]
    assert outbox.asked == [7]
    assert {"event": "retention.webhooks_pruned", "older_than_days": 7, "webhooks_deleted": 1234,
            "log_level": "info"} in logged


class _Sessions:
    """Session housekeeping with nothing to do."""

    async def sweep(self) -> dict[str, int]:
        return {}

    async def purge(self) -> dict[str, int]:
        return {"participants": 0}

    async def next_due_in(self) -> float | None:
        return None


async def test_the_housekeeping_prunes_the_outbox_hourly_and_counts_it_in_the_metrics():
    stop = asyncio.Event()
    runs: list[str] = []

    async def prune_webhooks() -> dict[str, int]:
        runs.append("pruned")
        stop.set()  # one round is enough
        return {"webhooks_deleted": 5}

    deleted = metrics.RETENTION_DELETED.labels("webhooks")._value.get()
    ok = metrics.RETENTION_RUNS.labels("webhooks", "ok")._value.get()
    await asyncio.wait_for(housekeeping(_Sessions(), 30, stop, prune_webhooks=prune_webhooks), 5)  # type: ignore[arg-type]
    assert runs == ["pruned"]
    assert metrics.RETENTION_DELETED.labels("webhooks")._value.get() == deleted + 5
    assert metrics.RETENTION_RUNS.labels("webhooks", "ok")._value.get() == ok + 1
    assert metrics.RETENTION_LAST_SUCCESS.labels("webhooks")._value.get() > 0
