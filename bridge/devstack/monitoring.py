"""Prometheus for the local stack: monitoring/prometheus.yml filled in with the stack's
addresses, and a Prometheus process (Debian's `prometheus` package) that scrapes it with the
alert rules of monitoring/alerts.yml. The live test runs one (tests/live/test_monitoring.py);
docker-compose.yml's profile `monitoring` fills in the same file its own way."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from bridge.devstack.settings import PROJECT_DIR, Stack

MONITORING_DIR = PROJECT_DIR / "monitoring"


def scrape_config(rules_dir: Path, api: str, ari: str, interval: str) -> str:
    """monitoring/prometheus.yml with its @NAME@ placeholders filled in."""
    text = (MONITORING_DIR / "prometheus.yml").read_text()
    for name, value in {"@RULES_DIR@": str(rules_dir), "@API_ADDRESS@": api, "@ARI_ADDRESS@": ari,
                        "@SCRAPE_INTERVAL@": interval}.items():
        text = text.replace(name, value)
    if "@" in re.sub(r"#.*", "", text):
        raise ValueError("monitoring/prometheus.yml has a placeholder this function does not fill in")
    return text


def start_prometheus(
    stack: Stack, workdir: Path, listen: str | None = None, interval: str | None = None
) -> subprocess.Popen[bytes]:
    """A Prometheus scraping the local stack's bridge and PBX every `interval` (default
    MB_SCRAPE_INTERVAL), with the alert rules, its data and log under `workdir`, answering on
    `listen` (host:port; default MB_PROMETHEUS_BIND:MB_PROMETHEUS_PORT)."""
    listen = listen or f"{stack.env['MB_PROMETHEUS_BIND']}:{stack.env['MB_PROMETHEUS_PORT']}"
    interval = interval or stack.env["MB_SCRAPE_INTERVAL"]
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is missing: run `make deps` (Debian's prometheus package)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(scrape_config(
        MONITORING_DIR,
        f"{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}",
        f"{stack.env['MB_ARI_BIND']}:{stack.env['MB_ARI_PORT']}",
        interval,
    ))
    with open(workdir / "prometheus.log", "ab") as log:  # (the process keeps its own copy of the file)
        return subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={listen}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )


def rule_count() -> int:
    """How many rules (recording and alerting) monitoring/alerts.yml defines."""
    import yaml  # (a dev dependency: only the tests ask)

    groups = yaml.safe_load((MONITORING_DIR / "alerts.yml").read_text())["groups"]
    return sum(len(group["rules"]) for group in groups)


def prometheus_of(workdir: Path) -> set[int]:
    """The Prometheus processes keeping their data in `workdir` (a `make monitor` of this stack)."""
    from bridge.devstack.processes import processes_with

    return processes_with(f"--storage.tsdb.path={workdir / 'data'}".encode())


def stop_prometheus(workdir: Path) -> None:
    from bridge.devstack.processes import terminate

    running = prometheus_of(workdir)
    if running:
        terminate(running)
