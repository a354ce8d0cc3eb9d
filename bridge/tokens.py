"""API tokens: who may do what through the HTTP API.

A token has a name and scopes. Named tokens live in Postgres (api_tokens): only a SHA-256 of
the secret is kept, and the secret, `mbt_<key id>_<43 random characters>`, is shown once, when
maskbridge-admin adds the token. Every request looks its token up by the key id (the public
part) and compares the hash in constant time, so a token added or revoked by any process
counts on every bridge at the next request, without a restart or a cache to go stale.

The settings' own tokens stay: MB_API_TOKEN is the token "env", with every scope the API token
ever had (all but the recordings), and MB_RECORDING_TOKEN the token "recording" (the
recordings and their audit, nothing else).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from collections.abc import Callable
from datetime import datetime
from typing import Literal

import structlog

from bridge.errors import InvalidInput, TokenNotFound
from bridge.store.tokens import TokenRepo, TokenRow

log = structlog.get_logger(__name__)

# Every scope, with what it reaches. The HTTP API's operations each need one (their OpenAPI
# security requirement, bridge.api.openapi).
SCOPES: dict[str, str] = {
    "sessions:read": "read sessions, their participants, history and calls",
    "sessions:write": "open, extend and close sessions, reassign the courier",
    "pools:read": "read pool numbers and their utilisation",
    "pools:admin": "import and retire pool numbers, change their mode",
    "blocklist:read": "read the blocklist",
    "blocklist:write": "block and unblock real numbers",
    "recordings:read": "a recorded call's metadata and audio",
    "audit:read": "the recordings' access audit",
}
RECORDING_SCOPES = frozenset({"recordings:read", "audit:read"})
ENV_TOKEN = "env"  # MB_API_TOKEN: every scope but the recordings (the order system never reaches audio)
RECORDING_TOKEN = "recording"  # MB_RECORDING_TOKEN: the recordings and their audit
ENV_SCOPES = frozenset(SCOPES) - RECORDING_SCOPES
RESERVED_NAMES = frozenset({ENV_TOKEN, RECORDING_TOKEN})

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
PREFIX = "mbt_"
_KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_SECRET = re.compile(r"mbt_([a-z0-9]{12})_[A-Za-z0-9_-]{43}")
TOUCH_EVERY = 60.0  # seconds between two writes of a token's last_used_at by one process
TOUCH_RETRY = 5.0  # seconds after a write of it failed before a request tries again

@dataclass(frozen=True)
class Caller:
    """Who a request says it is: a valid token (its name and scopes), a token that is not
    one (wrong, revoked, expired), or none."""

    kind: Literal["token", "invalid_token", "no_token"]
    token: str | None = None  # the token's name; of an invalid one, when it names one (revoked, expired)
    scopes: frozenset[str] = frozenset()
    rate: float | None = None  # the token's own rate limit (requests per second); None: the default
    why: str = "missing or wrong bearer token"  # for an invalid one, what the 401 says

    def may(self, scope: str) -> bool:
        return self.kind == "token" and scope in self.scopes


NO_TOKEN = Caller("no_token")
INVALID = Caller("invalid_token")
TWO_TOKENS = Caller("invalid_token", why="give one Authorization header, not several")


def secret_hash(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def new_secret() -> tuple[str, str]:
    """(key id, secret): 12 characters of public key id, and 256 random bits."""
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(12))
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def parse_scopes(raw: list[str]) -> list[str]:
    """Scopes as given to maskbridge-admin (repeated or comma separated; `all` for every
    one): known ones only, in SCOPES' order."""
    given = {s.strip() for item in raw for s in item.split(",") if s.strip()}
    if "all" in given:
        given = (given - {"all"}) | set(SCOPES)
    unknown = sorted(given - set(SCOPES))
    if unknown:
        raise InvalidInput(f"unknown scope {', '.join(unknown)}; the scopes are {', '.join(SCOPES)}", field="scope")
    if not given:
        raise InvalidInput("give at least one --scope", field="scope")
    return [s for s in SCOPES if s in given]


class Tokens:
    """Authenticates requests, and adds, lists and revokes the named tokens."""

    def __init__(self, repo: TokenRepo | None, api_token: str = "", recording_token: str = "") -> None:
        self.repo = repo
        # The settings' tokens: (name, secret, scopes); an empty secret is no token.
        self._env = [(name, secret.encode(), scopes) for name, secret, scopes in (
            (ENV_TOKEN, api_token, ENV_SCOPES), (RECORDING_TOKEN, recording_token, RECORDING_SCOPES)) if secret]
        self._touched: dict[str, float] = {}  # name -> when its last use was last written (or tried)
        self._due: set[str] = set()  # names whose last use is to be written
        self._touching: asyncio.Task[None] | None = None
        self._valid_keys: set[str] = set()  # key ids this process found valid lately

    def known(self, key_id: str) -> bool:
        """Whether the token of `key_id` was valid at its last request here."""
        return key_id in self._valid_keys

    async def caller(self, authorization: str, before_lookup: Callable[[str], None] | None = None) -> Caller:
        """Who the Authorization header says the request is from (compared in constant time).
        `before_lookup(key id)` is called before a named token is looked up in the database,
        and may raise to refuse the request without the lookup."""
        if not authorization:
            return NO_TOKEN
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return INVALID
        # surrogateescape: a header with bytes that are not UTF-8 is a wrong token, not a crash
        presented = given.strip().encode("utf-8", "surrogateescape")
        found = None
        for name, secret, scopes in self._env:  # (every one compared: no early exit)
            if hmac.compare_digest(presented, secret):
                found = Caller("token", name, scopes)
        if found is not None:
            return found
        match = _SECRET.fullmatch(presented.decode("utf-8", "replace"))
        if match is None or self.repo is None:
            return INVALID
        key_id = match.group(1)
        if before_lookup is not None:
            before_lookup(key_id)
        row = await self.repo.by_key_id(key_id)
        if row is None or not hmac.compare_digest(secret_hash(presented), row.secret_hash):
            return INVALID
        # A revoked or expired token presented with its secret is that token: the audit names it.
        if row.revoked_at is not None:
            self._valid_keys.discard(key_id)
            return Caller("invalid_token", row.name, why="the token was revoked")
        if row.expired:
            self._valid_keys.discard(key_id)
            return Caller("invalid_token", row.name, why="the token expired")
        self._valid_keys.add(key_id)
        self._touch(row.name)
        return Caller("token", row.name, frozenset(row.scopes), row.rate_per_second)

    def _touch(self, name: str) -> None:
        """Note that the token was used (at most once a minute per process), after the
        request: the write goes in a task of its own, with the other tokens due meanwhile, and
        no request waits for it. A row another transaction holds is written by the token's
        next request; a write that failed (the database's trouble) by a request
        TOUCH_RETRY seconds later or more."""
        now = time.monotonic()
        if self.repo is None or now - self._touched.get(name, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        self._touched[name] = now
        self._due.add(name)
        if self._touching is None or self._touching.done():
            self._touching = asyncio.get_running_loop().create_task(self._write_touches(self.repo),
                                                                    name="token-touches")

    async def _write_touches(self, repo: TokenRepo) -> None:
        while self._due:
            names, self._due = sorted(self._due), set()
            try:
                written = await repo.touch(names)
            except Exception as exc:  # noqa: BLE001 - the requests were answered; only the last use waits
                log.info("api.token_last_use_not_written", tokens=len(names), error=type(exc).__name__)
                due_again = time.monotonic() - TOUCH_EVERY + TOUCH_RETRY  # (as if written that long ago)
                for name in names:
                    self._touched[name] = due_again
                continue
            for name in names:
                if name not in written:
                    self._touched.pop(name, None)

    async def touches_written(self) -> None:
        """Until the last uses due so far are written (or given up on)."""
        while self._touching is not None and not self._touching.done():
            await asyncio.wait([self._touching])

    # --- maskbridge-admin ----------------------------------------------------------------

    def _repo(self) -> TokenRepo:
        if self.repo is None:
            raise RuntimeError("named tokens need the database")
        return self.repo

    async def add(
        self, name: str, scopes: list[str], expires_at: datetime | None = None, rate: float | None = None
    ) -> tuple[TokenRow, str]:
        """A new token and its secret (shown once: only its hash is kept)."""
        if not NAME.fullmatch(name):
            raise InvalidInput("a token's name is 1 to 63 of a-z, 0-9, '.', '_' and '-', starting with a letter "
                               "or digit", field="name")
        if name in RESERVED_NAMES:
            raise InvalidInput(f"{name!r} is the name of a token of the settings", field="name")
        if rate is not None and not 0 < rate <= 100_000:
            raise InvalidInput("--rate must be from 0 (exclusive) to 100000 requests a second", field="rate")
        key_id, secret = new_secret()
        row = await self._repo().insert(name, key_id, secret_hash(secret), parse_scopes(scopes), expires_at, rate)
        if row is None:
            raise InvalidInput(f"a token named {name!r} exists or existed (names are never reused, so that the "
                               "audit names one token)", field="name")
        log.info("token.added", token=name, scopes=row.scopes)
        return row, secret

    async def revoke(self, name: str) -> TokenRow:
        row = await self._repo().revoke(name)
        if row is None:
            raise TokenNotFound(f"no token named {name!r}")
        log.info("token.revoked", token=name)
        return row

    async def find(self) -> list[TokenRow]:
        return await self._repo().all()
