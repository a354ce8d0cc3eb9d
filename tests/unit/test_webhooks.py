"""Webhook signatures, retry spacing, a refused delivery and the outbox's retention (bridge/webhooks.py)."""

from __future__ import annotations

import asyncio
import contextlib
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
from bridge.webhooks import ATTEMPTS, OUTBOX_WAIT_MAX, Deliverer, backoff, prune, signature


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

    async def claim(self, limit: int, lease_seconds: int, fresh_first: bool = False) -> list[Any]:
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


# --- an endpoint that is down ---------------------------------------------------------------------


class _Outbox2:
    """The outbox, in memory, as the database keeps it: a failed event is due again (at
    once: the pause is the deliverer's own), a delivered one is done; every claim's limit kept."""

    def __init__(self, count: int, requeue: bool = True, kind: str = "call.ended", front: bool = False) -> None:
        self.requeue = requeue
        self.front = front  # a failed event due again before the others (its retry time came first)
        self.due: list[Pending] = []
        self.add(count, kind)
        self.limits: list[int] = []
        self.delivered_ids: list[uuid.UUID] = []
        self.failed_ids: list[uuid.UUID] = []
        self.errors: list[str] = []
        self.outcomes: list[str] = []  # "delivered" or "failed", attempt after attempt
        self.changed = asyncio.Event()

    def add(self, count: int, kind: str) -> list[uuid.UUID]:
        now = datetime.now(timezone.utc)
        events = [Pending(uuid.uuid4(), len(self.due) + i, kind, '{"call_id": "c"}', now, 0) for i in range(count)]
        self.due += events
        return [e.id for e in events]

    async def claim(self, limit: int, lease_seconds: int, fresh_first: bool = False) -> list[Any]:
        self.limits.append(limit)
        if fresh_first:
            self.due.sort(key=lambda e: e.attempts > 0)  # (stable: oldest first within each)
        batch, self.due = self.due[:limit], self.due[limit:]
        return batch

    async def delivered(self, event_id: uuid.UUID) -> None:
        self.delivered_ids.append(event_id)
        self.outcomes.append("delivered")
        self.changed.set()

    async def failed(self, event_id: uuid.UUID, error: str, retry_in: float | None) -> None:
        self.failed_ids.append(event_id)
        self.outcomes.append("failed")
        self.errors.append(error)
        if self.requeue:
            again = Pending(event_id, 0, "call.ended", '{"call_id": "c"}', datetime.now(timezone.utc),
                            self.failed_ids.count(event_id))
            self.due.insert(0, again) if self.front else self.due.append(again)
        self.changed.set()


class _Receiver:
    """An order system's endpoint that refuses (503) until told to answer; it counts the
    requests and the most it had in flight at once."""

    def __init__(self) -> None:
        self.up = False
        self.refused: set[uuid.UUID] = set()  # refused (400) even while up
        self.refused_kinds: set[str] = set()  # refused (422) even while up
        self.redirect = False  # answer 302 to /sink, which takes anything with 200
        self.down_status = 503  # the answer while down
        self.sink: list[tuple[str, int]] = []  # (method, body length) of what reached /sink
        self.requests = 0
        self.in_flight = 0
        self.most_in_flight_while_down = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.in_flight += 1
        try:
            await asyncio.sleep(0)  # wait-ok: lets requests sent together overlap, as on a network
            if not self.up:
                self.most_in_flight_while_down = max(self.most_in_flight_while_down, self.in_flight)
            if not self.up:
                return web.Response(status=self.down_status)
            if self.redirect:
                raise web.HTTPFound("/sink")
            if uuid.UUID(request.headers["X-Maskbridge-Delivery"]) in self.refused:
                return web.Response(status=400)
            if request.headers["X-Maskbridge-Event"] in self.refused_kinds:
                return web.Response(status=422)
            return web.Response(status=204)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[_Receiver, str]]:
    state = _Receiver()
    app = web.Application()
    app.router.add_post("/hooks", state.handle)

    async def sink(request: web.Request) -> web.Response:
        state.sink.append((request.method, len(await request.read())))
        return web.Response(status=200)

    app.router.add_route("*", "/sink", sink)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield state, f"http://127.0.0.1:{port}/hooks"
    await runner.cleanup()


async def _until(condition: Any, outbox: _Outbox2, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            outbox.changed.clear()
            await outbox.changed.wait()


async def _proven(deliverer: Deliverer, outbox: _Outbox2, state: _Receiver) -> asyncio.Task[None]:
    """The deliverer running, past its first delivery (it sends batches from then on); the
    receiver down again after it."""
    state.up = True
    outbox.add(1, "call.started")
    task = asyncio.create_task(deliverer.run(asyncio.Event()))
    await _until(lambda: len(outbox.delivered_ids) == 1, outbox)
    state.up = False
    return task


async def _until_paused(deliverer: Deliverer) -> None:
    """Until the deliverer pauses, once the attempt or batch that failed is done (it has no
    event of its own to wait on)."""
    for _ in range(1000):
        if deliverer.paused:
            return
        await asyncio.sleep(0)  # wait-ok: yields to the deliverer, which pauses once its batch is done
    raise AssertionError("the deliverer did not pause")


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_an_endpoint_that_fails_every_attempt_is_probed_one_event_at_a_time(receiver):
    """A batch that all failed pauses deliveries: then one event at a time is tried, the
    pauses doubling; the events waiting meanwhile are not tried (they keep their attempts)."""
    state, url = receiver
    outbox = _Outbox2(0)
    metrics.WEBHOOK_ENDPOINT_DOWN.set(0)
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=0.01, pause_max=0.04)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        task = await _proven(deliverer, outbox, state)
        proven = len(outbox.limits)
        outbox.add(40, "call.ended")
        await _until(lambda: len(outbox.failed_ids) >= 32 + 6, outbox)
        assert deliverer.paused and metrics.WEBHOOK_ENDPOINT_DOWN._value.get() == 1
        await _stopped(task)
    limits = outbox.limits[proven:]
    assert limits[0] == 32 and set(limits[1:]) == {1}, "after the first batch, one event a claim"
    assert state.requests == len(outbox.failed_ids) + 1, "every attempt reached the endpoint and was recorded"
    assert state.most_in_flight_while_down >= 2, "the first batch went out together"
    down = [e for e in logs if e["event"] == "webhook.endpoint_down"]
    assert len(down) == 1 and down[0]["error"] == "HTTP 503" and down[0]["failed_in_row"] >= 5
    assert not [e for e in logs if e["event"] == "webhook.endpoint_up"]


async def test_the_first_delivered_probe_resumes_every_delivery(receiver):
    state, url = receiver
    outbox = _Outbox2(0)
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=0.01, pause_max=0.04)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        task = await _proven(deliverer, outbox, state)
        proven = len(outbox.limits)
        outbox.add(40, "call.ended")
        await _until(lambda: len(outbox.failed_ids) >= 32 + 3, outbox)
        assert deliverer.paused
        state.up = True
        await _until(lambda: len(outbox.delivered_ids) == 41, outbox)
        await _stopped(task)
    assert sorted(outbox.delivered_ids) == sorted(set(outbox.delivered_ids)), "each event delivered once"
    assert not deliverer.paused and metrics.WEBHOOK_ENDPOINT_DOWN._value.get() == 0
    limits = outbox.limits[proven:]
    resumed = limits.index(1) + limits[limits.index(1):].index(32)
    assert resumed > 0 and all(limit == 32 for limit in limits[resumed:]), "batches again once it answered"
    events = [e["event"] for e in logs if e["event"].startswith("webhook.endpoint_")]
    assert events == ["webhook.endpoint_down", "webhook.endpoint_up"]


async def test_a_deliverer_just_started_sends_one_event_first(receiver):
    """Started (or restarted) while the endpoint is down, with a backlog: one event is tried and
    fails, and deliveries pause at once; the backlog spends no attempt (adversary finding: each
    restart during an outage cost a batch of 32 events an attempt)."""
    state, url = receiver
    outbox = _Outbox2(40, requeue=False)
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=5.0)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(deliverer.run(asyncio.Event()))
        await _until(lambda: len(outbox.failed_ids) == 1, outbox)
        await _until_paused(deliverer)
        await _stopped(task)
    assert outbox.limits == [1] and len(outbox.failed_ids) == 1 and len(outbox.due) == 39
    assert [e["event"] for e in logs if e["event"].startswith("webhook.endpoint_")] == ["webhook.endpoint_down"]


async def test_refused_events_among_delivered_ones_pause_nothing(receiver):
    """An endpoint that refuses some events (say their payload) but takes the others is up:
    its refusals are retried on their own schedule, the rest go on in batches."""
    state, url = receiver
    outbox = _Outbox2(20, requeue=False)
    refused = state.refused = {e.id for e in outbox.due[3::4]}
    state.up = True
    stop = asyncio.Event()
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=0.01)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(deliverer.run(stop))
        await _until(lambda: len(outbox.delivered_ids) + len(outbox.failed_ids) == 20, outbox)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert set(outbox.failed_ids) == refused and len(outbox.delivered_ids) == 15
    assert not deliverer.paused
    assert not [e for e in logs if e["event"] == "webhook.endpoint_down"]


async def test_a_refused_kind_of_event_pauses_nothing_and_the_others_go_on_at_once(receiver):
    """An order system that answers 422 to every call.ended and takes the rest is up: fresh
    call.ended events refused six in a row pause nothing, and call.started events that come
    after them are delivered in the next batch (adversary finding: they waited ~3 minutes
    behind the refused ones' probes)."""
    state, url = receiver
    state.up = True
    state.refused_kinds = {"call.ended"}
    outbox = _Outbox2(0, requeue=False)
    ended = outbox.add(8, "call.ended")
    stop = asyncio.Event()
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=0.01)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(deliverer.run(stop))
        await _until(lambda: len(outbox.failed_ids) == 8, outbox)
        started = outbox.add(3, "call.started")
        await _until(lambda: len(outbox.delivered_ids) == 3, outbox)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert set(outbox.failed_ids) == set(ended) and set(outbox.errors) == {"HTTP 422"}
    assert sorted(outbox.delivered_ids) == sorted(started)
    assert not deliverer.paused and 1 not in outbox.limits[1:], "never paused: batches all along"
    assert not [e for e in logs if e["event"] == "webhook.endpoint_down"]


@pytest.mark.parametrize("status", [404, 401, 500, 503])
async def test_fresh_events_failing_as_an_endpoint_that_is_not_there_pause_deliveries(receiver, status):
    """No such URL, no access, a server in trouble: five fresh events failed in a row pause it."""
    state, url = receiver
    outbox = _Outbox2(6, requeue=False)
    state.down_status = status
    stop = asyncio.Event()
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(deliverer.run(stop))
    await _until(lambda: len(outbox.failed_ids) == 6, outbox)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert deliverer.paused and set(outbox.errors) == {f"HTTP {status}"}


async def test_a_redirect_is_a_failed_attempt_never_a_delivery(receiver):
    """302 to a page that answers 200: followed, the POST became a GET with no body and the
    event counted as delivered though the order system never got it (adversary finding)."""
    state, url = receiver
    state.up = True
    state.redirect = True
    outbox = _Outbox2(3, requeue=False)
    stop = asyncio.Event()
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(deliverer.run(stop))
    await _until(lambda: len(outbox.failed_ids) == 3, outbox)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert outbox.delivered_ids == [] and state.sink == []
    assert set(outbox.errors) == {"HTTP 302"}


class _UnreadableOutbox(_Outbox2):
    """An outbox whose database is down for the first `down` claims."""

    def __init__(self, down: int) -> None:
        super().__init__(2, requeue=False, kind="call.started")
        self.down = down

    async def claim(self, limit: int, lease_seconds: int, fresh_first: bool = False) -> list[Any]:
        if self.down:
            self.down -= 1
            self.changed.set()
            raise ConnectionRefusedError("connection refused")
        return await super().claim(limit, lease_seconds, fresh_first)


async def test_an_outbox_that_cannot_be_read_is_said_once_without_a_traceback(receiver):
    state, url = receiver
    state.up = True
    outbox = _UnreadableOutbox(down=4)
    stop = asyncio.Event()
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.001)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(deliverer.run(stop))
        await _until(lambda: len(outbox.delivered_ids) == 2, outbox)
        stop.set()
        await asyncio.wait_for(task, 5)
    events = [e["event"] for e in logs if e["event"].startswith("webhook.")]
    assert events.count("webhook.outbox_unreadable") == 1 and events.count("webhook.outbox_readable") == 1
    assert "webhook.delivery_failed" not in events, "no traceback for a database that is down"


async def test_an_outbox_that_cannot_be_read_is_read_again_twice_as_late_each_time_at_most_10_s(receiver):
    """The database down for long (poll 0.5 s): the outbox is read again after 1, 2, 4, 8 s, then every
    10 s (OUTBOX_WAIT_MAX), never later; and as usual once it could be read."""
    state, url = receiver
    outbox = _UnreadableOutbox(down=8)
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.5)  # type: ignore[arg-type]
    waits = []
    for _ in range(8):
        assert await deliverer._claim() is None
        waits.append(deliverer._outbox_wait())
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    assert OUTBOX_WAIT_MAX == 10.0
    assert await deliverer._claim() is not None and deliverer._unreadable == 0


async def test_a_probe_takes_an_event_never_tried_before_the_ones_refused_already(receiver):
    """Paused, with events refused before due first: the probe is a fresh event, so an
    endpoint back up (that still refuses the old ones) resumes at the first probe."""
    state, url = receiver
    state.refused_kinds = {"call.ended"}
    outbox = _Outbox2(6, front=True)  # six call.ended, failed while the endpoint is down: due first again
    stop = asyncio.Event()
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=0.05, pause_max=0.1)  # type: ignore[arg-type]
    task = asyncio.create_task(deliverer.run(stop))
    await _until(lambda: len(outbox.failed_ids) >= 6 and deliverer.paused, outbox)
    state.up = True
    started = outbox.add(2, "call.started")
    attempts_before = len(outbox.outcomes)
    await _until(lambda: len(outbox.delivered_ids) == 2, outbox)
    stop.set()
    await asyncio.wait_for(task, 5)
    # (at most one probe was on its way when it came up)
    first = outbox.outcomes[attempts_before:].index("delivered")
    assert first <= 1, "no probe spent on an event refused already"
    assert outbox.delivered_ids[0] in started and not deliverer.paused


async def test_a_probe_refused_as_one_event_ends_the_pause(receiver):
    """Paused, the endpoint comes back refusing call.ended (422) and the probe is one: the
    endpoint answered, so deliveries resume at once and the call.started behind it go."""
    state, url = receiver
    outbox = _Outbox2(0, requeue=False)
    deliverer = Deliverer(outbox, url, "s" * 20, poll=0.01, pause_first=0.02)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        task = await _proven(deliverer, outbox, state)
        outbox.add(6, "call.ended")
        await _until(lambda: len(outbox.failed_ids) == 6, outbox)
        await _until_paused(deliverer)
        state.up = True
        state.refused_kinds = {"call.ended"}
        ended = outbox.add(1, "call.ended")  # the oldest fresh event: the next probe
        started = outbox.add(2, "call.started")
        await _until(lambda: len(outbox.delivered_ids) == 3, outbox)
        await _stopped(task)
    assert outbox.failed_ids[-1] == ended[0] and sorted(outbox.delivered_ids[1:]) == sorted(started)
    assert not deliverer.paused
    ends = [e for e in logs if e["event"].startswith("webhook.endpoint_")]
    assert [e["event"] for e in ends] == ["webhook.endpoint_down", "webhook.endpoint_up"]
    assert ends[1]["probes"] == 1, "the refused probe itself ended the pause (no second pause)"
