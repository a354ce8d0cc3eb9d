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
    # The HTTP API's own database connections: at least one, and not more than a server takes.
    ("MB_API_DB_CONNECTIONS", "0"), ("MB_API_DB_CONNECTIONS", "101"), ("MB_API_DB_CONNECTIONS", "two"),
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


@pytest.mark.parametrize("versions", ["2147483648=" + "k" * 40, "0=" + "k" * 40, "99999999999999999999=" + "k" * 40])
def test_a_master_key_version_beyond_a_postgres_integer_is_refused_at_start(versions):
    """Versions are stored as Postgres integers: a larger one would pass the start and fail in
    the middle of `keys rewrap` with a driver error. One line, exit 2, before any connection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MB_")}
    env.update(GOOD, MB_ARI_URL="http://127.0.0.1:1", MB_ARI_USER="maskbridge")
    env["MB_NUMBER_KEYS"] = versions
    for command in (["-m", "bridge"], ["-m", "bridge.cli", "keys", "rewrap"]):
        out = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and "k" * 40 not in out.stderr
        assert "MB_NUMBER_KEYS must be VERSION=KEY items (VERSION a whole number from 1 to 2147483647)" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_highest_master_key_version_is_taken():
    settings = Settings.from_env(services=False, environ={**GOOD, "MB_NUMBER_KEYS": "2147483647=" + "v" * 40})
    assert sorted(settings.number_keys) == [1, 2147483647]
