"""The bridge's settings fail fast: a process given bad values stops at start, exit code 2,
with one message naming every bad variable (and no traceback); nothing is half started."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bridge.config import ConfigError, Settings

GOOD = {
    "MB_DATABASE_URL": "postgresql://maskbridge:pw@127.0.0.1:1/maskbridge",
    "MB_NUMBER_KEY": "k" * 40,
    "MB_ARI_PASSWORD": "ari-password-ari-password",
    "MB_API_TOKEN": "api-token-api-token-api-token",
}


def run_bridge(**settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MB_")}
    env.update(GOOD)
    env.update(settings)
    return subprocess.run([sys.executable, "-m", "bridge"], env=env, capture_output=True, text=True, timeout=30)


def good_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process environment holds the good settings, and no other MB_ one."""
    for key in [k for k in os.environ if k.startswith("MB_")]:
        monkeypatch.delenv(key)
    for key, good in GOOD.items():
        monkeypatch.setenv(key, good)


def test_every_bad_value_is_named_at_once_and_the_process_exits_2():
    bad = {
        "MB_API_PORT": "abc",
        "MB_RING_TIMEOUT": "-5",
        "MB_SWEEP_INTERVAL": "nan",
        "MB_LOG_LEVEL": "loud",
        "MB_ARI_PASSWORD": "abc;xyz",  # Asterisk's config syntax would cut it at the ;
        "MB_ARI_APP": "maskbridge\n",  # a name, checked whole
        "MB_DEFAULT_REGION": "RU\n",
    }
    out = run_bridge(**bad)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    for name in bad:
        assert name in out.stderr, (name, out.stderr)
    assert "abc;xyz" not in out.stderr, "a secret is not repeated"


@pytest.mark.parametrize(("name", "value"), [
    ("MB_RING_TIMEOUT", "inf"), ("MB_API_PORT", "70000"), ("MB_NUMBER_KEY", "short"), ("MB_API_TOKEN", ""),
    # Numbers are written in ASCII digits, nothing else int() or float() would take.
    ("MB_API_PORT", "+8091"), ("MB_API_PORT", "8_091"), ("MB_API_PORT", "\u0668\u0660\u0669\u0661"),
    ("MB_RING_TIMEOUT", "1e2"),
    # URLs name a host, and a port in range.
    ("MB_DATABASE_URL", "postgresql://u:p@127.0.0.1:99999/db"), ("MB_DATABASE_URL", "postgresql://u:p@127.0.0.1:abc/db"),
    ("MB_DATABASE_URL", "postgresql://u:p@[::1/db"), ("MB_DATABASE_URL", "postgresql://u:p@db/x?sslmode=bogus"),
    ("MB_ARI_URL", "http://"), ("MB_ARI_URL", "http://127.0.0.1:99999"),
])
def test_one_bad_value_is_refused(monkeypatch, name, value):
    good_env(monkeypatch)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env()
    assert any(problem.startswith(name) for problem in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("url", [
    "postgresql://u:p@db1:5432,db2:5432/maskbridge?target_session_attrs=read-write",  # a highly available cluster
    "postgresql://u:p@[::1]:5432/maskbridge", "postgresql:///maskbridge?host=/run/postgresql",
    "postgres://u:p@db/maskbridge?sslmode=verify-full",
])
def test_database_urls_of_every_supported_shape_are_accepted(monkeypatch, url):
    good_env(monkeypatch)
    monkeypatch.setenv("MB_DATABASE_URL", url)
    assert Settings.from_env(services=False).database_url == url
