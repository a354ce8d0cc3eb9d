"""Settings of the bridge process, read from the environment (see README, "Settings").

Every MB_ setting is typed and bounded here. A bad value stops the process at start: the
error names every setting that is wrong at once (the bridge exits with status 2), so an
operator fixes them in one go instead of one per restart.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from bridge.destinations import DEFAULT as DEFAULT_DESTINATIONS, Destinations
from bridge.crypto import MAX_KEY_VERSION
from bridge.envtext import whole
from bridge.languages import LANGUAGES
from bridge.limits import MAX_SECONDS, ORDER_CODE_LENGTHS
from bridge.phone import InvalidNumber, normalize
from bridge.terms import Terms

DAY = 24 * 3600
# Characters that would change the meaning of a value rendered into Asterisk's configuration
# (";" starts a comment there; a line break starts a new line) or cannot be one at all.
_ASTERISK_UNSAFE = re.compile(r"[;\x00-\x1f\x7f]")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LOG_LEVELS = ("debug", "info", "warning", "error")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$")


class ConfigError(Exception):
    """Settings that are wrong: one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- the value parsers: text -> value, or ValueError saying what is wrong ----------------


def text(*, required: bool = False, pattern: re.Pattern[str] | None = None, min_length: int = 0,
         what: str = "") -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if not raw:
            if required:
                raise ValueError("is not set")
            return raw
        if len(raw) < min_length:
            raise ValueError(f"must be at least {min_length} characters")
        if pattern is not None and not pattern.fullmatch(raw):
            raise ValueError(f"must be {what or 'of the form ' + pattern.pattern}")
        return raw

    return parse


_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")


def seconds(low: float, high: float, unit: str = "seconds") -> Callable[[str], float]:
    def parse(raw: str) -> float:
        if not _DECIMAL.fullmatch(raw.strip()):
            raise ValueError(f"must be a number of {unit} (like 30 or 2.5)")
        value = float(raw.strip())
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"must be a number of {unit} from {low:g} to {high:g}")
        return value

    return parse


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw

    return parse


def secret(min_length: int, *, required: bool = True) -> Callable[[str], str]:
    """A secret that is also rendered into Asterisk's configuration or a URL: long enough,
    and nothing in it that those would cut or misread."""

    def parse(raw: str) -> str:
        if not raw:
            if required:
                raise ValueError("is not set")
            return raw
        if len(raw) < min_length:
            raise ValueError(f"must be at least {min_length} characters")
        if _ASTERISK_UNSAFE.search(raw) or raw != raw.strip():
            raise ValueError("must not hold ';', control characters or surrounding spaces "
                             "(Asterisk's configuration would cut it)")
        return raw

    return parse


def url(*schemes: str, required: bool = True) -> Callable[[str], str]:
    """A URL of one of `schemes` naming a host (a port, if given, from 1 to 65535). A
    postgresql:// URL may name several hosts (host1:5432,host2:5432: a highly available
    cluster), and its sslmode must be one Postgres knows."""

    def parse(raw: str) -> str:
        if not raw:
            if required:
                raise ValueError("is not set")
            return raw
        if not raw.startswith(tuple(f"{s}://" for s in schemes)) or any(c.isspace() for c in raw):
            raise ValueError(f"must be a {' or '.join(s + '://' for s in schemes)} URL")
        try:
            parts = urlsplit(raw)
        except ValueError as exc:
            raise ValueError(f"is not a valid URL ({exc})") from None
        hosts = parts.netloc.rpartition("@")[2]
        postgres = parts.scheme.startswith("postgres")
        # (postgresql:///db?host=/run/postgresql: a Unix socket, named in the query)
        for host in ([] if postgres and not hosts else hosts.split(",") if postgres else [hosts]):
            _host_and_port(host, parts.scheme)
        sslmode = dict(parse_qsl(parts.query)).get("sslmode")
        if sslmode is not None and sslmode not in _SSLMODES:
            raise ValueError(f"has sslmode={sslmode}: must be one of {', '.join(_SSLMODES)}")
        return raw

    return parse


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:([0-9]{1,5}))?")


def _host_and_port(text: str, scheme: str) -> None:
    match = _HOST.fullmatch(text)
    if not match:
        raise ValueError(f"must name a host (a {scheme}:// URL like {scheme}://host:port/...)")
    if match.group(3) is not None and not 1 <= int(match.group(3)) <= 65535:
        raise ValueError(f"has port {match.group(3)}: must be from 1 to 65535")


def destinations(raw: str) -> str:
    """MB_ALLOWED_DESTINATIONS, checked here; read into Destinations with the default region
    (a kind without a region is of MB_DEFAULT_REGION) by _together."""
    Destinations.parse(raw)
    return raw


def keypad(raw: str) -> str:
    if not 1 <= len(raw) <= 8 or any(k not in "0123456789*#" for k in raw):
        raise ValueError("must be 1 to 8 keypad keys (0-9, *, #)")
    return raw


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    parse: Callable[[str], Any]
    service: bool = False  # needed only by the bridge process (not by the admin tool)


# field of Settings -> its MB_ setting. (The session terms' defaults are read by bridge.terms.)
SETTINGS: dict[str, Setting] = {
    "database_url": Setting("MB_DATABASE_URL", "", url("postgresql", "postgres")),
    "ari_url": Setting("MB_ARI_URL", "", url("http", "https"), service=True),
    "ari_user": Setting("MB_ARI_USER", "", text(required=True, pattern=_NAME, what="1 to 64 letters, digits, - or _"),
                        service=True),
    "ari_password": Setting("MB_ARI_PASSWORD", "", secret(8), service=True),
    "ari_app": Setting("MB_ARI_APP", "maskbridge", text(required=True, pattern=_NAME,
                                                        what="1 to 64 letters, digits, - or _")),
    "api_bind": Setting("MB_API_BIND", "127.0.0.1", text(required=True)),
    "api_port": Setting("MB_API_PORT", "8080", whole(1, 65535)),
    "api_token": Setting("MB_API_TOKEN", "", secret(16), service=True),
    "api_rate": Setting("MB_API_RATE", "1000", seconds(0, 100_000, "requests a second"),
                        service=True),
    "api_burst": Setting("MB_API_BURST", "500", whole(1, 1_000_000), service=True),
    "api_conflict_rate": Setting("MB_API_CONFLICT_RATE", "10", seconds(0, 100_000, "conflicts a minute"),
                                 service=True),
    "api_conflict_burst": Setting("MB_API_CONFLICT_BURST", "20", whole(1, 1_000_000), service=True),
    "api_address_rate": Setting("MB_API_ADDRESS_RATE", "20", seconds(0, 100_000, "requests a second"),
                                service=True),
    "api_address_burst": Setting("MB_API_ADDRESS_BURST", "40", whole(1, 1_000_000), service=True),
    "api_db_connections": Setting("MB_API_DB_CONNECTIONS", "2", whole(1, 100), service=True),
    "default_region": Setting("MB_DEFAULT_REGION", "RU", text(required=True, pattern=re.compile(r"^[A-Z]{2}$"),
                                                              what="a two-letter region code like RU")),
    "trunk_endpoint": Setting("MB_TRUNK_ENDPOINT", "trunk", text(required=True, pattern=_NAME,
                                                                 what="a PJSIP endpoint name")),
    "ring_timeout": Setting("MB_RING_TIMEOUT", "30", seconds(1, 600)),
    "log_level": Setting("MB_LOG_LEVEL", "info", one_of(LOG_LEVELS)),
    "session_ttl": Setting("MB_SESSION_TTL", "86400", whole(1, MAX_SECONDS)),
    "grace_period": Setting("MB_GRACE_PERIOD", "0", whole(0, MAX_SECONDS)),
    "pair_cooloff": Setting("MB_PAIR_COOLOFF", "86400", whole(0, 365 * DAY)),
    "number_cooling": Setting("MB_NUMBER_COOLING", "604800", whole(0, 365 * DAY)),
    "retention_days": Setting("MB_RETENTION_DAYS", "30", whole(1, 3650)),
    "support_number": Setting("MB_SUPPORT_NUMBER", "", text()),
    "allowed_destinations": Setting("MB_ALLOWED_DESTINATIONS", DEFAULT_DESTINATIONS, destinations),
    "sweep_interval": Setting("MB_SWEEP_INTERVAL", "30", seconds(1, 3600)),
    "duration_warning": Setting("MB_CALL_WARNING", "30", seconds(1, 3600)),
    "confirm_timeout": Setting("MB_CONFIRM_TIMEOUT", "6", seconds(1, 60)),
    "block_keys": Setting("MB_BLOCK_KEYS", "*9", keypad),
    "default_language": Setting("MB_DEFAULT_LANGUAGE", "en", one_of(LANGUAGES)),
    "webhook_url": Setting("MB_WEBHOOK_URL", "", url("http", "https", required=False)),
    "webhook_secret": Setting("MB_WEBHOOK_SECRET", "", secret(16, required=False)),
    "recording_token": Setting("MB_RECORDING_TOKEN", "", secret(16, required=False)),
    "recording_retention_days": Setting("MB_RECORDING_RETENTION_DAYS", "30", whole(1, 3650)),
    "webhook_retention_days": Setting("MB_WEBHOOK_RETENTION_DAYS", "7", whole(1, 3650)),
    "order_code_length": Setting("MB_ORDER_CODE_LENGTH", "6", whole(*ORDER_CODE_LENGTHS)),
    "order_code_attempts": Setting("MB_ORDER_CODE_ATTEMPTS", "3", whole(1, 20)),
    "order_code_lockout": Setting("MB_ORDER_CODE_LOCKOUT", "900", whole(1, 31 * DAY)),
    "unknown_caller_limit": Setting("MB_UNKNOWN_CALLER_LIMIT", "10", whole(0, 1_000_000), service=True),
    "unknown_caller_total": Setting("MB_UNKNOWN_CALLER_TOTAL", "100", whole(0, 1_000_000), service=True),
    "node_id": Setting("MB_NODE_ID", "node-1", text(required=True, pattern=_NAME,
                                                    what="1 to 64 letters, digits, - or _")),
    "node_timeout": Setting("MB_NODE_TIMEOUT", "15", seconds(3, 600)),
    "node_api_url": Setting("MB_NODE_API_URL", "", url("http", "https", required=False)),
    "node_sip_address": Setting("MB_NODE_SIP_ADDRESS", "", text(pattern=_HOST_PORT, what="host:port")),
}


@dataclass(frozen=True)
class Settings:
    database_url: str
    ari_url: str = ""
    ari_user: str = ""
    ari_password: str = ""
    ari_app: str = "maskbridge"
    api_bind: str = "127.0.0.1"
    api_port: int = 8080
    api_token: str = ""
    api_rate: float = 1000.0  # requests a second per token and bridge process (0: no limit)
    api_burst: int = 500
    api_conflict_rate: float = 10.0  # conflicts a minute per token and bridge process (0: no limit)
    api_conflict_burst: int = 20
    api_address_rate: float = 20.0  # requests a second without a valid token, per remote address (0: no limit)
    api_address_burst: int = 40
    api_db_connections: int = 2
    default_region: str = "RU"
    trunk_endpoint: str = "trunk"
    ring_timeout: float = 30.0
    log_level: str = "info"
    number_key: str = ""  # master key version 1 (MB_NUMBER_KEY)
    number_keys: dict[int, str] = field(default_factory=dict)  # every master key version, 1 included
    session_ttl: int = 86400
    grace_period: int = 0
    pair_cooloff: int = 86400
    number_cooling: int = 604800
    retention_days: int = 30
    support_number: str = ""
    allowed_destinations: Destinations = field(default_factory=Destinations)
    sweep_interval: float = 30.0
    duration_warning: float = 30.0
    confirm_timeout: float = 6.0
    block_keys: str = "*9"
    default_language: str = "en"
    webhook_url: str = ""
    webhook_secret: str = ""
    recording_token: str = ""
    recording_retention_days: int = 30
    webhook_retention_days: int = 7
    order_code_length: int = 6
    order_code_attempts: int = 3
    order_code_lockout: int = 900
    unknown_caller_limit: int = 10  # unknown callers announced per pool number per minute (0: no limit)
    unknown_caller_total: int = 100  # unknown callers announced per minute in all, per bridge process (0: no limit)
    node_id: str = "node-1"
    node_timeout: float = 15.0
    node_api_url: str = ""
    node_sip_address: str = ""
    terms: Terms = field(default_factory=lambda: Terms.defaults_from_env({}))  # the session terms' defaults

    @classmethod
    def from_env(cls, services: bool = True, environ: Mapping[str, str] | None = None) -> "Settings":
        """The bridge's settings. services=False: only what the admin tool needs (the
        database, the number key and the session policy), not ARI or the API token.
        Raises ConfigError listing every setting that is wrong."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, setting in SETTINGS.items():
            raw = env.get(setting.env, "") or setting.default
            if setting.service and not services and not env.get(setting.env):
                continue
            try:
                values[name] = setting.parse(raw)
            except ValueError as exc:
                problems.append(f"{setting.env} {exc}")
        try:
            values["number_keys"] = _number_keys(env)
            values["number_key"] = values["number_keys"].get(1, "")
        except ValueError as exc:
            problems.append(str(exc))
        try:
            values["terms"] = Terms.defaults_from_env(env)
        except ValueError as exc:
            problems += str(exc).split("; ")
        problems += _together(values, env)
        if problems:
            raise ConfigError(problems)
        return cls(**values)


def _secret(env: Mapping[str, str], name: str) -> str:
    """`name`, or the contents of the file `name`_FILE (a docker secret)."""
    path = env.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise ValueError(f"{name}_FILE cannot be read: {exc.strerror}") from None
    return env.get(name, "").strip()


def _number_keys(env: Mapping[str, str]) -> dict[int, str]:
    """The master key versions: MB_NUMBER_KEY is version 1; MB_NUMBER_KEYS (or the file
    MB_NUMBER_KEYS_FILE) adds `VERSION=KEY` items, separated by blanks or lines (# comments)."""
    keys: dict[int, str] = {}
    first = _secret(env, "MB_NUMBER_KEY")
    if first:
        keys[1] = first
    for line in _secret(env, "MB_NUMBER_KEYS").splitlines():
        for item in line.split("#", 1)[0].split():
            number, sep, key = item.partition("=")
            if not sep or not number.isascii() or not number.isdigit() or not 1 <= int(number) <= MAX_KEY_VERSION:
                raise ValueError(f"MB_NUMBER_KEYS must be VERSION=KEY items (VERSION a whole number from 1 to "
                                 f"{MAX_KEY_VERSION})")
            if int(number) in keys:
                raise ValueError(f"MB_NUMBER_KEYS gives version {int(number)} twice (MB_NUMBER_KEY is version 1)")
            keys[int(number)] = key
    if not keys:
        raise ValueError("MB_NUMBER_KEY is not set")
    for version, text in keys.items():
        if len(text) < 32:
            raise ValueError("MB_NUMBER_KEY must be at least 32 characters" if version == 1
                             else f"MB_NUMBER_KEYS version {version} must be at least 32 characters")
    return keys


def _together(values: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """Rules between settings."""
    problems: list[str] = []
    if values.get("webhook_url") and len(values.get("webhook_secret", "")) < 16:
        problems.append("MB_WEBHOOK_SECRET (at least 16 characters) signs the webhooks of MB_WEBHOOK_URL")
    token = values.get("recording_token")
    if token and token == values.get("api_token"):
        problems.append("MB_RECORDING_TOKEN must differ from MB_API_TOKEN: the order system must not reach audio")
    region = values.get("default_region", "RU")
    allowed = Destinations()
    if isinstance(values.get("allowed_destinations"), str):  # (not when it was refused above)
        try:
            allowed = Destinations.parse(values["allowed_destinations"], region)
        except ValueError as exc:  # a kind without a region, and MB_DEFAULT_REGION no region of the plan
            problems.append(f"MB_ALLOWED_DESTINATIONS {exc} (MB_DEFAULT_REGION)")
    values["allowed_destinations"] = allowed
    support = values.get("support_number")
    if support:
        try:
            values["support_number"] = normalize(support, region)
        except InvalidNumber:
            problems.append("MB_SUPPORT_NUMBER is not a valid phone number")
        else:
            if not allowed.allows(values["support_number"]):
                problems.append("MB_SUPPORT_NUMBER is outside MB_ALLOWED_DESTINATIONS (or a premium-rate or "
                                "international-network number, never allowed): the bridge would dial it")
    return problems
