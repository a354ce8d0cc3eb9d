"""Real numbers at rest: envelope encryption with a data key per UTC day (so that retention
can destroy a day's key: crypto-shredding), versioned master keys that wrap the data keys,
and a keyed blind index to find the numbers.

Keys (docs/production.md, "Real numbers at rest: keys, shredding, rotation"):
- master keys (MB_NUMBER_KEY is version 1, MB_NUMBER_KEYS adds versions) never reach the
  database. The active version (a row of the database: every bridge wraps with the same one)
  wraps new data keys; every configured version unwraps.
- a data key: 32 random bytes per UTC day ("period"), created on first use by whichever
  bridge needs it first, stored wrapped (AES-256-GCM, bound to its period and master
  version), and kept unwrapped in each bridge's memory. The retention job destroys a day's
  key once everything sealed with it is past its retention (bridge.number_keys).
- the blind index key (HMAC-SHA256): one, for good, stored wrapped like a data key. An
  unkeyed hash would be no protection at all: there are only about 10^10 mobile numbers,
  and a laptop hashes them all in minutes. Without the key, the index says nothing.

A sealed number (format 2) is self-describing: b"\\x02", its period (days since 1970-01-01,
4 bytes big-endian), a 12-byte nonce and the AES-256-GCM ciphertext. Its associated data
binds it to its table, column and row id (`Binding`), so a ciphertext copied into another
row does not open. Format 1 (before sql/023: one key derived from MB_NUMBER_KEY, the same
associated data for all) is still read; the migration and the retention job re-seal it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT_1 = b"\x01"
FORMAT_2 = b"\x02"
_NONCE = 12
_TAG = 16
_HEADER = 1 + 4  # format, period
_LEGACY_AAD = b"maskbridge real number v1"
EPOCH = date(1970, 1, 1)
MIN_KEY_CHARS = 32
DATA_KEY_BYTES = 32
MAX_KEY_VERSION = 2**31 - 1  # master key versions are Postgres integers (number_master, the keys' rows)


class VaultError(Exception):
    """A master key is missing or too short, or a stored number or key does not open (a
    wrong key, a damaged or moved ciphertext)."""


class NoKeyStore(VaultError):
    """This vault was made without a key store: it can compute the blind index only."""


class KeyNotLoaded(VaultError):
    """open_cached() met a period whose key was never looked up: load() the numbers first."""


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"maskbridge", info=purpose).derive(master)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Binding:
    """The row and column a sealed number belongs to, bound into its ciphertext."""

    table: str
    column: str
    row: uuid.UUID

    def aad(self, header: bytes) -> bytes:
        return b"|".join((b"maskbridge number", header, self.table.encode(), self.column.encode(), self.row.bytes))


def participant_number(participant_id: uuid.UUID) -> Binding:
    return Binding("participants", "number_enc", participant_id)


def blocked_number(entry_id: uuid.UUID) -> Binding:
    return Binding("blocked_numbers", "number_enc", entry_id)


def period_header(period: date) -> bytes:
    """The first bytes of every number sealed with `period`'s data key."""
    return FORMAT_2 + struct.pack(">I", (period - EPOCH).days)


def period_of(sealed: bytes) -> date | None:
    """The period whose data key opens `sealed`; None for format 1 (one key for all)."""
    if sealed[:1] == FORMAT_1:
        return None
    if sealed[:1] != FORMAT_2 or len(sealed) < _HEADER + _NONCE + _TAG:
        raise VaultError("unknown sealed-number format")
    return EPOCH + timedelta(days=struct.unpack(">I", sealed[1:_HEADER])[0])


def _data_key_purpose(period: date, version: int) -> bytes:
    return f"maskbridge data key|{period.isoformat()}|v{version}".encode()


def _index_key_purpose(version: int) -> bytes:
    return f"maskbridge index key|v{version}".encode()


class MasterKeys:
    """The configured master key versions (version -> key text)."""

    def __init__(self, versions: Mapping[int, str]) -> None:
        if not versions:
            raise VaultError("no number key is configured (MB_NUMBER_KEY or MB_NUMBER_KEYS)")
        for version, key in versions.items():
            if not 1 <= version <= MAX_KEY_VERSION:
                raise VaultError(f"number key versions are whole numbers from 1 to {MAX_KEY_VERSION}")
            if len(key) < MIN_KEY_CHARS:
                raise VaultError(f"number key version {version} must be at least {MIN_KEY_CHARS} characters "
                                 "of random text")
        self._keks = {v: AESGCM(_derive(k.encode(), b"data key wrapping")) for v, k in versions.items()}
        self._legacy = [AESGCM(_derive(versions[v].encode(), b"number encryption")) for v in sorted(versions)]
        self._first_index_key = _derive(versions[min(versions)].encode(), b"number blind index")
        self.versions = tuple(sorted(versions))

    @property
    def newest(self) -> int:
        return self.versions[-1]

    def _kek(self, version: int) -> AESGCM:
        kek = self._keks.get(version)
        if kek is None:
            raise VaultError(f"master key version {version} is not configured (MB_NUMBER_KEYS)")
        return kek

    def _wrap(self, version: int, purpose: bytes, key: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._kek(version).encrypt(nonce, key, purpose)

    def _unwrap(self, version: int, purpose: bytes, wrapped: bytes) -> bytes:
        try:
            return self._kek(version).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], purpose)
        except InvalidTag:
            raise VaultError(f"a stored key does not open with master key version {version}") from None

    def wrap_data_key(self, period: date, version: int, key: bytes) -> bytes:
        return self._wrap(version, _data_key_purpose(period, version), key)

    def unwrap_data_key(self, period: date, version: int, wrapped: bytes) -> bytes:
        return self._unwrap(version, _data_key_purpose(period, version), wrapped)

    def wrap_index_key(self, version: int, key: bytes) -> bytes:
        return self._wrap(version, _index_key_purpose(version), key)

    def unwrap_index_key(self, version: int, wrapped: bytes) -> bytes:
        return self._unwrap(version, _index_key_purpose(version), wrapped)

    @property
    def first_index_key(self) -> bytes:
        """The blind index key a new database gets: the one numbers were indexed with before
        sql/023 (derived from the oldest version, MB_NUMBER_KEY), so existing indexes hold."""
        return self._first_index_key

    def open_legacy(self, sealed: bytes) -> str:
        """A format-1 number (one key derived from the master key, no row binding)."""
        nonce, body = sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :]
        for aead in self._legacy:
            try:
                return aead.decrypt(nonce, body, _LEGACY_AAD).decode()
            except InvalidTag:
                continue
        raise VaultError("a stored number does not open with any configured number key (wrong MB_NUMBER_KEY?)")

    def seal_legacy(self, number: str) -> bytes:
        """Format 1, for the migration from plaintext (sql/002) only: sql/023 re-seals it."""
        nonce = os.urandom(_NONCE)
        return FORMAT_1 + nonce + self._legacy[0].encrypt(nonce, number.encode(), _LEGACY_AAD)


@dataclass(frozen=True)
class WrappedKey:
    """A key as stored: wrapped by master key `master_version`. period None: the index key."""

    period: date | None
    master_version: int
    wrapped: bytes


class KeyStore(Protocol):
    """Where the wrapped keys live (bridge.store.number_keys; a dict in unit tests)."""

    async def data_keys(self, periods: Sequence[date]) -> list[WrappedKey]: ...

    async def add_data_key(self, period: date, wrap: Callable[[int], bytes]) -> None:
        """Store `period`'s key, wrapped (wrap(version)) by the active master version,
        unless another process stored one first (then theirs is the key)."""

    async def index_key(self) -> WrappedKey | None: ...

    async def add_index_key(self, wrap: Callable[[int], bytes]) -> None: ...


class NumberVault:
    """Seals and opens real phone numbers (E.164) and computes their blind index."""

    def __init__(self, masters: MasterKeys | str, store: KeyStore | None = None,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        self.masters = masters if isinstance(masters, MasterKeys) else MasterKeys({1: masters})
        self.store = store
        self.clock = clock
        self._keys: dict[date, AESGCM] = {}
        self._gone: set[date] = set()  # periods looked up and found destroyed
        self._index_key = self.masters.first_index_key  # until start() reads the database's

    def bound_to(self, store: KeyStore) -> NumberVault:
        """A vault of the same master keys over another key store (a migration's connection)."""
        return NumberVault(self.masters, store, self.clock)

    def today(self) -> date:
        return self.clock().astimezone(timezone.utc).date()

    async def start(self) -> None:
        """Read the blind index key (stored by the first bridge that started on this database)."""
        store = self._store()
        stored = await store.index_key()
        if stored is None:
            key = self.masters.first_index_key
            await store.add_index_key(lambda version: self.masters.wrap_index_key(version, key))
            stored = await store.index_key()
            if stored is None:
                raise VaultError("the blind index key vanished while it was stored")
        self._index_key = self.masters.unwrap_index_key(stored.master_version, stored.wrapped)

    def _store(self) -> KeyStore:
        if self.store is None:
            raise NoKeyStore("this number vault has no key store")
        return self.store

    def index(self, number: str) -> bytes:
        return hmac.new(self._index_key, number.encode(), hashlib.sha256).digest()

    # --- sealing ------------------------------------------------------------------------

    async def _data_key(self, period: date) -> AESGCM:
        key = self._keys.get(period)
        if key is None:
            await self.load_periods([period])
            key = self._keys.get(period)
        if key is None:
            # (a new period: made here unless another bridge makes it first, then read back)
            fresh = os.urandom(DATA_KEY_BYTES)
            await self._store().add_data_key(
                period, lambda version: self.masters.wrap_data_key(period, version, fresh))
            self._gone.discard(period)
            await self.load_periods([period])
            key = self._keys.get(period)
            if key is None:
                raise VaultError(f"the data key of {period} vanished while it was made")
        return key

    async def seal(self, number: str, binding: Binding, period: date | None = None) -> bytes:
        """`number` sealed with the data key of `period` (today, UTC, by default)."""
        period = period or self.today()
        aead = await self._data_key(period)
        header = period_header(period)
        nonce = os.urandom(_NONCE)
        return header + nonce + aead.encrypt(nonce, number.encode(), binding.aad(header))

    # --- opening ------------------------------------------------------------------------

    async def load_periods(self, periods: Iterable[date]) -> None:
        missing = sorted({p for p in periods if p not in self._keys})
        if not missing:
            return
        found = {k.period: k for k in await self._store().data_keys(missing)}
        for period in missing:
            stored = found.get(period)
            if stored is None:
                self._gone.add(period)
                continue
            self._keys[period] = AESGCM(self.masters.unwrap_data_key(period, stored.master_version, stored.wrapped))
            self._gone.discard(period)

    async def load(self, sealed: Iterable[bytes | None]) -> None:
        """Make sure the keys of these sealed numbers are in memory (one query for those
        that are not), so that open_cached() can answer. (One of an unknown format is left
        to open_cached(), which says so.)"""
        periods = set()
        for s in sealed:
            try:
                periods.add(period_of(s) if s is not None else None)
            except VaultError:
                continue
        await self.load_periods([p for p in periods if p is not None and p not in self._keys])

    def open_cached(self, sealed: bytes | None, binding: Binding) -> str | None:
        """The number, or None once retention purged it (the row's column emptied, or its
        period's data key destroyed). Raises VaultError for a ciphertext that does not
        belong to `binding` or was damaged, KeyNotLoaded when load() was not called first."""
        if sealed is None:
            return None
        period = period_of(sealed)
        if period is None:
            return self.masters.open_legacy(sealed)
        aead = self._keys.get(period)
        if aead is None:
            if period in self._gone:
                return None
            raise KeyNotLoaded(f"the data key of {period} was not loaded")
        try:
            return aead.decrypt(sealed[_HEADER : _HEADER + _NONCE], sealed[_HEADER + _NONCE :],
                                binding.aad(sealed[:_HEADER])).decode()
        except InvalidTag:
            raise VaultError("a stored number does not open: damaged, or not this row's") from None

    async def open(self, sealed: bytes | None, binding: Binding) -> str | None:
        """open_cached(), loading the key first if needed."""
        await self.load([sealed])
        return self.open_cached(sealed, binding)

    def forget(self, periods: Iterable[date]) -> None:
        """These periods' data keys were destroyed: drop them from memory."""
        for period in periods:
            self._keys.pop(period, None)
            self._gone.add(period)

    def cached_periods(self) -> set[date]:
        return set(self._keys)
