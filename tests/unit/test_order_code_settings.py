"""The order-code settings: their defaults, and values out of range refused at start."""

from __future__ import annotations

import os

import pytest

from bridge.config import ConfigError, Settings

BASE = {"MB_DATABASE_URL": "postgresql://x@127.0.0.1/x", "MB_NUMBER_KEY": "k" * 40}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    for name in [n for n in os.environ if n.startswith("MB_")]:  # e.g. make test's MB_WEBHOOK_URL
        monkeypatch.delenv(name)
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_defaults(env) -> None:
    s = Settings.from_env(services=False)
    assert (s.order_code_length, s.order_code_attempts, s.order_code_lockout) == (6, 3, 900)


@pytest.mark.parametrize(
    ("name", "value"),
    [("MB_ORDER_CODE_LENGTH", "3"), ("MB_ORDER_CODE_LENGTH", "13"), ("MB_ORDER_CODE_ATTEMPTS", "0"),
     ("MB_ORDER_CODE_LOCKOUT", "0"), ("MB_ORDER_CODE_LENGTH", "six")],
)
def test_values_out_of_range_are_refused(env, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(services=False)


def test_values_in_range_are_taken(env) -> None:
    env.setenv("MB_ORDER_CODE_LENGTH", "4")
    env.setenv("MB_ORDER_CODE_ATTEMPTS", "5")
    env.setenv("MB_ORDER_CODE_LOCKOUT", "60")
    s = Settings.from_env(services=False)
    assert (s.order_code_length, s.order_code_attempts, s.order_code_lockout) == (4, 5, 60)
