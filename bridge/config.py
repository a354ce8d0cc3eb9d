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


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative")
    return value


def _webhook() -> dict[str, str]:
    url = os.environ.get("MB_WEBHOOK_URL", "")
    if not url:
        return {}
    if not url.startswith(("http://", "https://")):
        raise ConfigError("MB_WEBHOOK_URL must be an http:// or https:// URL")
    secret = os.environ.get("MB_WEBHOOK_SECRET", "")
    if len(secret) < 16:
        raise ConfigError("MB_WEBHOOK_SECRET (at least 16 characters) signs the webhooks of MB_WEBHOOK_URL")
    return {"webhook_url": url, "webhook_secret": secret}


def _quiet_hours() -> str:
    from bridge.abuse import parse_quiet_setting  # the same rules as the API's
    from bridge.errors import InvalidInput

    text = os.environ.get("MB_QUIET_HOURS", "")
    try:
        parse_quiet_setting(text)
    except InvalidInput as exc:
        raise ConfigError(str(exc)) from None
    return text


def _language() -> str:
    language = os.environ.get("MB_DEFAULT_LANGUAGE", "en")
    if language not in ("en", "ru"):
        raise ConfigError("MB_DEFAULT_LANGUAGE must be en or ru")
    return language


def _block_keys() -> str:
    keys = os.environ.get("MB_BLOCK_KEYS", "*9")
    if not 1 <= len(keys) <= 8 or any(k not in "0123456789*#" for k in keys):
        raise ConfigError("MB_BLOCK_KEYS must be 1 to 8 keypad keys (0-9, *, #)")
    return keys


def _yes_no(name: str, default: str) -> bool:
    value = os.environ.get(name, default).strip().lower()
    if value not in ("yes", "no"):
        raise ConfigError(f"{name} must be yes or no")
    return value == "yes"


def _recording_token(api_token: str) -> str:
    """MB_RECORDING_TOKEN: the only key to recordings (empty: nobody reaches them)."""
    token = os.environ.get("MB_RECORDING_TOKEN", "")
    if token and len(token) < 16:
        raise ConfigError("MB_RECORDING_TOKEN must be at least 16 characters")
    if token and token == api_token:
        raise ConfigError("MB_RECORDING_TOKEN must differ from MB_API_TOKEN: the order system must not reach audio")
    return token


def _bounded(name: str, default: int, low: int, high: int) -> int:
    value = _int(name, default)
    if not low <= value <= high:
        raise ConfigError(f"{name} must be from {low} to {high}")
    return value


def _number_key() -> str:
    """MB_NUMBER_KEY, or the contents of the file MB_NUMBER_KEY_FILE (a docker secret)."""
    path = os.environ.get("MB_NUMBER_KEY_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return _required("MB_NUMBER_KEY")


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
    number_key: str = ""
    session_ttl: int = 86400
    grace_period: int = 0
    pair_cooloff: int = 86400
    number_cooling: int = 604800
    retention_days: int = 30
    support_number: str | None = None
    sweep_interval: float = 30.0
    calls_per_hour: int = 0
    calls_per_day: int = 0
    quiet_hours: str = ""
    max_call_duration: int = 0
    duration_warning: float = 30.0
    block_keys: str = "*9"
    default_language: str = "en"
    webhook_url: str = ""
    webhook_secret: str = ""
    record_calls: bool = False
    recording_token: str = ""
    recording_retention_days: int = 30
    order_code_length: int = 6
    order_code_attempts: int = 3
    order_code_lockout: int = 900

    @classmethod
    def from_env(cls, services: bool = True) -> "Settings":
        """The bridge's settings. services=False: only what the admin tool needs (the
        database, the number key and the session policy), not ARI or the API token."""
        need = _required if services else (lambda name: os.environ.get(name, ""))
        token = need("MB_API_TOKEN")
        if services and len(token) < 16:
            raise ConfigError("MB_API_TOKEN must be at least 16 characters")
        return cls(
            database_url=_required("MB_DATABASE_URL"),
            ari_url=need("MB_ARI_URL"),
            ari_user=need("MB_ARI_USER"),
            ari_password=need("MB_ARI_PASSWORD"),
            ari_app=os.environ.get("MB_ARI_APP", "maskbridge"),
            api_bind=os.environ.get("MB_API_BIND", "127.0.0.1"),
            api_port=int(os.environ.get("MB_API_PORT", "8080")),
            api_token=token,
            default_region=os.environ.get("MB_DEFAULT_REGION", "RU"),
            trunk_endpoint=os.environ.get("MB_TRUNK_ENDPOINT", "trunk"),
            ring_timeout=float(os.environ.get("MB_RING_TIMEOUT", "30")),
            log_level=os.environ.get("MB_LOG_LEVEL", "info"),
            number_key=_number_key(),
            session_ttl=_int("MB_SESSION_TTL", 86400),
            grace_period=_int("MB_GRACE_PERIOD", 0),
            pair_cooloff=_int("MB_PAIR_COOLOFF", 86400),
            number_cooling=_int("MB_NUMBER_COOLING", 604800),
            retention_days=_int("MB_RETENTION_DAYS", 30),
            support_number=os.environ.get("MB_SUPPORT_NUMBER") or None,
            sweep_interval=float(os.environ.get("MB_SWEEP_INTERVAL", "30")),
            calls_per_hour=_int("MB_CALLS_PER_HOUR", 0),
            calls_per_day=_int("MB_CALLS_PER_DAY", 0),
            quiet_hours=_quiet_hours(),
            max_call_duration=_int("MB_MAX_CALL_DURATION", 0),
            duration_warning=float(_int("MB_CALL_WARNING", 30)),
            block_keys=_block_keys(),
            default_language=_language(),
            record_calls=_yes_no("MB_RECORD_CALLS", "no"),
            recording_token=_recording_token(token),
            recording_retention_days=_bounded("MB_RECORDING_RETENTION_DAYS", 30, 1, 3650),
            order_code_length=_bounded("MB_ORDER_CODE_LENGTH", 6, 4, 12),
            order_code_attempts=_bounded("MB_ORDER_CODE_ATTEMPTS", 3, 1, 20),
            order_code_lockout=_bounded("MB_ORDER_CODE_LOCKOUT", 900, 1, 31 * 24 * 3600),
            **_webhook(),
        )
