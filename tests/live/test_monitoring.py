"""Metrics and monitoring against the running stack: /metrics of the bridge and of Asterisk
after real calls, and a real Prometheus (Debian's) scraping both with the alert rules, in
which every query of the Grafana dashboard finds data."""

from __future__ import annotations

import asyncio
import math
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.devstack.carrier import Carrier
from bridge.devstack.monitoring import rule_count, start_prometheus
from bridge.devstack.settings import Stack
from tests.live.conftest import Api, announced, wait_for_call_row
from tests.unit.test_monitoring import dashboard_queries


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def scrape(url: str) -> tuple[str, dict[str, float]]:
    """The text of a /metrics page, and its samples by name{labels}."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, url
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return text, samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for key, v in samples.items()
               if key.startswith(name + "{") and all(w in key for w in wanted))


async def answered_call(carrier: Carrier, api: Api, real_number: Any) -> tuple[str, str, str]:
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", tone=800)
    leg = await carrier.call(courier, session["pool_number"], tone=400, hangup_after=1.5)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 20)
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert leg.answered_at is not None
    return courier, client, session["id"]


async def test_metrics_show_live_values_after_calls_and_no_real_number(stack: Stack, carrier, api, db, real_number):
    bridge_url = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}/metrics"
    asterisk_url = f"http://{stack.env['MB_ARI_BIND']}:{stack.env['MB_ARI_PORT']}/metrics"
    _, before = await scrape(bridge_url)

    courier, client, session_id = await answered_call(carrier, api, real_number)
    await wait_for_call_row(db, session_id)
    stranger = real_number()
    await announced(carrier, stranger, "+74950000001")

    text, after = await scrape(bridge_url)

    def grew(name: str, **labels: str) -> bool:
        return total(after, name, **labels) > total(before, name, **labels)

    assert grew("maskbridge_calls_total", outcome="answered", direction="courier_to_client")
    assert grew("maskbridge_calls_total", outcome="unknown_caller", direction="unrouted")
    assert grew("maskbridge_calls_put_through_total", direction="courier_to_client")
    for histogram in ("maskbridge_post_dial_delay_seconds", "maskbridge_call_setup_seconds",
                      "maskbridge_call_duration_seconds", "maskbridge_route_lookup_seconds",
                      "maskbridge_ari_request_seconds", "maskbridge_db_pool_acquire_seconds",
                      "maskbridge_http_request_seconds"):
        assert grew(histogram + "_count"), histogram
    assert grew("maskbridge_sessions_opened_total", mode="direct")
    assert grew("maskbridge_http_requests_total", route="/v1/sessions", method="POST", status="201")
    assert total(after, "maskbridge_ari_connected") == 1
    assert total(after, "maskbridge_call_duration_seconds_sum") - total(before, "maskbridge_call_duration_seconds_sum") >= 1
    for family in ("maskbridge_calls_in_progress", "maskbridge_db_pool_connections", "maskbridge_pool_numbers",
                   "maskbridge_sessions", "maskbridge_webhook_backlog", "maskbridge_retention_runs_total",
                   "maskbridge_retention_last_success_timestamp_seconds", "maskbridge_blocks_total",
                   "maskbridge_order_code_lockouts_total", "maskbridge_pool_exhausted_total", "process_cpu_seconds_total"):
        assert any(key.startswith(family + "{") for key in after), family
    assert total(after, "maskbridge_retention_runs_total", result="ok") >= 2, "both retention jobs ran at start"

    asterisk_text, asterisk = await scrape(asterisk_url)
    # (asterisk_calls_sum counts every call since start; the parser names the counter _total.)
    processed = total(asterisk, "asterisk_calls_sum") + total(asterisk, "asterisk_calls_sum_total")
    assert processed >= 2 and "asterisk_core_uptime_seconds{" in asterisk_text
    for number in (courier, client, stranger):
        digits = number.lstrip("+")
        assert digits[-10:] not in text, "a real number in the bridge's metrics"
        assert digits[-10:] not in asterisk_text, "a real number in Asterisk's metrics"


@dataclass
class Prometheus:
    url: str

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.get(self.url + "/api/v1/query", params={"query": expr}) as r:
            body = await r.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as r:
            return (await r.json())["data"]

    async def until(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        """The first non-empty answer to `expr` (waiting for scrapes and rule evaluations)."""
        async with asyncio.timeout(timeout):
            while True:
                result = await self.query(expr)
                if result:
                    return result
                await asyncio.sleep(0.5)  # wait-ok: Prometheus scrapes every second


@pytest.fixture
async def prometheus(stack: Stack, tmp_path: Path) -> AsyncIterator[Prometheus]:
    listen = f"127.0.0.1:{_free_port()}"
    proc = start_prometheus(stack, tmp_path / "prometheus", listen, interval="1s")
    server = Prometheus(f"http://{listen}")
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as http:
            while True:
                assert proc.poll() is None, (tmp_path / "prometheus" / "prometheus.log").read_text()[-3000:]
                try:
                    async with http.get(server.url + "/-/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.2)  # wait-ok: a process starting
        yield server
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
        except TimeoutError:
            proc.kill()


def _finite(result: list[dict[str, Any]]) -> list[float]:
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]


async def test_prometheus_scrapes_both_evaluates_the_rules_and_every_dashboard_query_has_data(
    prometheus: Prometheus, carrier, api, db, real_number
):
    await prometheus.until('count(up{job=~"maskbridge|asterisk"} == 1) == 2')
    await prometheus.until("maskbridge_calls_total")  # a scrape before the calls: counters start from here

    _, _, session_id = await answered_call(carrier, api, real_number)
    await wait_for_call_row(db, session_id)
    await announced(carrier, real_number(), "+74950000001")
    # Once Prometheus has scraped the calls, every panel's window holds them.
    await prometheus.until('increase(maskbridge_call_duration_seconds_count[1m]) > 0')
    await prometheus.until('increase(maskbridge_calls_total{outcome="unknown_caller"}[1m]) > 0')

    empty = []
    for title, expr in dashboard_queries():
        if not _finite(await prometheus.query(expr)):
            empty.append(f"{title}: {expr}")
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)

    # The rules load and evaluate without error; the healthy stack raises none of the alerts
    # about itself.
    groups = (await prometheus.get("/api/v1/rules"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == rule_count()
    assert all(rule["health"] == "ok" and not rule.get("lastError") for rule in rules), rules
    await prometheus.until("maskbridge:answer_seizure_ratio:rate15m")
    active = {alert["labels"]["alertname"] for alert in (await prometheus.get("/api/v1/alerts"))["alerts"]}
    assert not active & {"MaskbridgeDown", "MaskbridgeAriDisconnected", "MaskbridgeRetentionNotRun"}, active
