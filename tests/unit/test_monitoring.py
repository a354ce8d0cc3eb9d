"""monitoring/: the alert rules pass promtool's own tests, every alert has one, and every
query of the rules and of the Grafana dashboard is valid PromQL over families the bridge (or
Asterisk, or Prometheus itself) really has. (tests/live/test_monitoring.py runs them all
against a real Prometheus scraping the running stack.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import metrics
from bridge.devstack.monitoring import scrape_config
from bridge.devstack.settings import PROJECT_DIR

MONITORING = PROJECT_DIR / "monitoring"
DASHBOARD = MONITORING / "grafana" / "maskbridge.json"
# Grafana's variables, as a query is run with every bridge and region selected.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$region": ".*"}

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool is missing: `make deps` installs Debian's prometheus package")


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query with Grafana's variables filled in) for every target."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def test_the_alert_rules_are_valid_and_pass_their_tests():
    check = promtool("check", "rules", "alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_test_that_makes_it_fire():
    fired = set()
    for case in yaml.safe_load((MONITORING / "alerts.test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                fired.add(check["alertname"])
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts and alerts == fired


def test_every_dashboard_query_is_valid_promql(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 10
    as_rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_title, expr) in enumerate(queries)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(as_rules))
    check = promtool("check", "rules", str(path), cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_dashboard_shows_what_the_issue_asks_for():
    titles = " | ".join(title for title, _ in dashboard_queries()).lower()
    for wanted in ("calls per second, by outcome", "calls in progress", "post-dial delay", "answer-seizure ratio",
                   "average call duration", "pool numbers per region"):
        assert wanted in titles


def _families_used(text: str) -> set[str]:
    return set(re.findall(r"\b(maskbridge_[a-z_]+|asterisk_[a-z_]+)\b", text))


def test_every_family_the_rules_and_dashboard_read_is_one_the_bridge_exports():
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
    exported = {family.name + suffix for family in metrics.REGISTRY.collect()
                for suffix in ("", *suffixes.get(family.type, ()))}  # (the annotations name families)
    used = _families_used((MONITORING / "alerts.yml").read_text()) | _families_used(DASHBOARD.read_text())
    ours = {name for name in used if name.startswith("maskbridge_")}
    assert ours, "the rules read the bridge's metrics"
    assert ours <= exported, f"not exported by the bridge: {sorted(ours - exported)}"
    # Asterisk's (res_prometheus): only the per-call families the scrape config keeps.
    assert {name for name in used if name.startswith("asterisk_")} <= {"asterisk_channels_count"}


def test_the_scrape_config_is_valid_once_filled_in(tmp_path):
    (tmp_path / "alerts.yml").write_text((MONITORING / "alerts.yml").read_text())
    text = scrape_config(tmp_path, "127.0.0.1:8080", "127.0.0.1:8088", "15s")
    (tmp_path / "prometheus.yml").write_text(text)
    check = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
