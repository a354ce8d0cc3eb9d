"""Settings of the bridge process, read from the environment (see README, "Settings")."""

from __future__ import annotations

import os
from dataclasses import dataclass


class ConfigError(Exception):
    pass


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"{name} is not set")
    return value


@dataclass(frozen=True)
class Settings:
    database_url: str
    ari_url: str
    ari_user: str
    ari_password: str
    ari_app: str = "maskbridge"
    api_bind: str = "127.0.0.1"
    api_port: int = 8080
    api_token: str = ""
    default_region: str = "RU"
    trunk_endpoint: str = "trunk"
    ring_timeout: float = 30.0
    log_level: str = "info"

    @classmethod
    def from_env(cls) -> "Settings":
        token = _required("MB_API_TOKEN")
        if len(token) < 16:
            raise ConfigError("MB_API_TOKEN must be at least 16 characters")
        return cls(
            database_url=_required("MB_DATABASE_URL"),
            ari_url=_required("MB_ARI_URL"),
            ari_user=_required("MB_ARI_USER"),
            ari_password=_required("MB_ARI_PASSWORD"),
            ari_app=os.environ.get("MB_ARI_APP", "maskbridge"),
            api_bind=os.environ.get("MB_API_BIND", "127.0.0.1"),
            api_port=int(os.environ.get("MB_API_PORT", "8080")),
            api_token=token,
            default_region=os.environ.get("MB_DEFAULT_REGION", "RU"),
            trunk_endpoint=os.environ.get("MB_TRUNK_ENDPOINT", "trunk"),
            ring_timeout=float(os.environ.get("MB_RING_TIMEOUT", "30")),
            log_level=os.environ.get("MB_LOG_LEVEL", "info"),
        )
