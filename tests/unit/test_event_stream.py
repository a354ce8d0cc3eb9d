"""The ARI event stream against the scripted fake: it says it is connected only once the
owner has caught up, and an Asterisk that accepts and drops the websocket at once is not
hammered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ari_fake import AriFake
from bridge.ari import AriClient, EventStream

APP = "maskbridge"


@asynccontextmanager
async def _stream(fake: AriFake, **kw) -> AsyncIterator[EventStream]:
    """An event stream running against `fake` (started here) for the block."""
    await fake.start()
    ari = AriClient(fake.base_url, "bridge", "secret", APP, request_timeout=5.0)

    async def handle(_event: dict) -> None:
        pass

    stream = EventStream(ari, handle, **kw)
    task = asyncio.create_task(stream.run())
    try:
        yield stream
    finally:
        stream.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ari.close()
        await fake.stop()


async def test_the_backoff_grows_across_connections_that_drop_at_once() -> None:
    fake = AriFake(app=APP)
    fake.close_at_once = True
    async with _stream(fake, min_backoff=0.05, max_backoff=0.4, stable_after=10.0):
        await fake._wait(lambda: fake.connects >= 5, 10, "five connects")
    gaps = [b - a for a, b in zip(fake.connect_times, fake.connect_times[1:])]
    # Each wait is at least half its backoff (jitter): 0.05, 0.1, 0.2, 0.4 -> the fourth
    # gap is at least 0.2 s. (Reset at every connect, every gap would be 0.025 s or so.)
    assert gaps[3] >= 0.2, gaps


async def test_connected_is_said_only_once_the_owner_has_caught_up() -> None:
    caught_up = asyncio.Event()
    release = asyncio.Event()

    async def reconcile() -> None:
        caught_up.set()
        await release.wait()

    async with _stream(AriFake(app=APP), on_connected=reconcile) as stream:
        await asyncio.wait_for(caught_up.wait(), 10)
        assert not stream.connected.is_set(), "healthy before calls left behind were taken over"
        release.set()
        await asyncio.wait_for(stream.connected.wait(), 10)


async def test_a_connection_whose_application_is_not_registered_is_made_again() -> None:
    """An Asterisk that hung and came back can accept the websocket and yet not deliver the
    application to it (404): the stream connects again until it does, and is not
    connected meanwhile."""
    fake = AriFake(app=APP)
    fake.app_registered = False
    async with _stream(fake, min_backoff=0.01, max_backoff=0.05) as stream:
        await fake._wait(lambda: fake.connects >= 3, 10, "three connects")
        assert not stream.connected.is_set()
        fake.app_registered = True
        await asyncio.wait_for(stream.connected.wait(), 10)


async def test_an_application_lost_while_connected_is_noticed_and_the_stream_reconnects() -> None:
    fake = AriFake(app=APP)
    async with _stream(fake, min_backoff=0.01, max_backoff=0.05, check_every=0.05) as stream:
        await asyncio.wait_for(stream.connected.wait(), 10)
        connects = fake.connects
        fake.app_registered = False
        await fake._wait(lambda: not stream.connected.is_set(), 10, "the stream no longer says it is connected")
        fake.app_registered = True
        await fake._wait(lambda: fake.connects > connects and stream.connected.is_set(), 10, "connected again")


async def test_asterisk_is_asked_for_the_wanted_events_alone_at_every_connection() -> None:
    """The filter is set at each connection, before the stream says it is connected: events
    of other types are never sent (a bridged call raised about 80, of which the bridge reads
    about 18)."""
    fake = AriFake(app=APP)
    async with _stream(fake, event_types=("StasisStart", "ChannelDestroyed")) as stream:
        await asyncio.wait_for(stream.connected.wait(), 10)
        assert fake.events_allowed == {"StasisStart", "ChannelDestroyed"}
        fake.events_allowed = None  # (as if Asterisk forgot it with the application)
        await fake.drop(refuse=False)
        await fake._wait(lambda: fake.connects >= 2 and fake.events_allowed is not None, 10, "a second filter")
        assert fake.events_allowed == {"StasisStart", "ChannelDestroyed"}


async def test_a_refused_event_filter_costs_cpu_not_the_stream() -> None:
    """Asterisk refusing the filter (an old version, a hiccup): the stream connects anyway
    and the owner gets every event."""
    fake = AriFake(app=APP)
    fake.fail("PUT", f"/ari/applications/{APP}/eventFilter", 500, "Internal Server Error", times=None)
    async with _stream(fake, event_types=("StasisStart",)) as stream:
        await asyncio.wait_for(stream.connected.wait(), 10)
        assert fake.events_allowed is None and fake.connects == 1


async def test_a_message_that_is_json_but_no_event_is_dropped_and_the_next_one_delivered() -> None:
    delivered: list[dict] = []

    async def handle(event: dict) -> None:
        delivered.append(event)

    stream = EventStream(AriClient("http://127.0.0.1:1", "bridge", "secret", APP), handle)
    for data in ("[1, 2]", '"StasisStart"', "null", "not json", '{"type": "StasisStart"}'):
        await stream._deliver(data)
    assert delivered == [{"type": "StasisStart"}]


def test_an_asterisk_time_is_read_with_its_offset_and_anything_else_is_no_time() -> None:
    from datetime import UTC, datetime, timedelta

    from bridge.calls.events import moment

    assert moment("2026-12-05T08:50:51.514+0000") == datetime(2026, 12, 5, 8, 50, 51, 514000, tzinfo=UTC)
    assert moment("2026-12-05T11:50:51.514+0300") == datetime(2026, 12, 5, 8, 50, 51, 514000, tzinfo=UTC)
    assert moment("2026-12-05T08:50:51.514+0300").utcoffset() == timedelta(hours=3)
    for nothing in ("2026-12-05T08:50:51.514", "yesterday", "", None, 17):
        assert moment(nothing) is None
