"""The bridge image's health check asks the address the API really listens on."""

from __future__ import annotations

import pytest

from bridge.healthcheck import healthz_url


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:8080/healthz"),
        ({"MB_API_BIND": "127.0.0.41", "MB_API_PORT": "8081"}, "http://127.0.0.41:8081/healthz"),
        ({"MB_API_BIND": "0.0.0.0"}, "http://127.0.0.1:8080/healthz"),
        ({"MB_API_BIND": "::"}, "http://[::1]:8080/healthz"),
        ({"MB_API_BIND": "fd00::5"}, "http://[fd00::5]:8080/healthz"),
    ],
)
def test_the_health_check_asks_where_the_api_listens(env, url):
    assert healthz_url(env) == url
