"""The life of the data keys that seal real numbers (bridge.crypto): retention destroys a day's
key, master key rotation rewraps them all.

When a day's key is destroyed. Everything sealed on day D belongs to a row that was live on
D; the earliest such a row can be purged is D + MB_RETENTION_DAYS (a participant who left on
D). So on day D + retention + 1 (UTC), after that day's purge, D's key goes. The rows still
sealed with it then are rows retention keeps (a session still open, a cool-off still running,
a blocked number) or that left later: each is re-sealed first, with the key of the day it
left when that key still has time to run (then its key goes a day after its own purge), else
with today's. A number is therefore unreadable, wherever a copy of it lies, at most a day
after its row's purge; and no key outlives its day by more than retention + 1 days, however
long a session lives. Format-1 numbers (sealed before sql/023) are re-sealed the same way.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date, timedelta, timezone
from typing import Any

import structlog

from bridge import metrics
from bridge.crypto import Binding, KeyNotLoaded, NumberVault, VaultError, period_header
from bridge.store.number_keys import SEALED_COLUMNS, NumberKeyRepo, SealedRow

log = structlog.get_logger(__name__)


def readable(vault: NumberVault, sealed: bytes | None, binding: Binding, where: str = "read") -> str | None:
    """vault.open_cached(), with a number that does not open (damaged, or another row's
    ciphertext) read as None, as a purged one: logged (its table and row, never a number) and
    counted. One bad row must not fail every listing it is in, nor the retention of every
    other number."""
    try:
        return vault.open_cached(sealed, binding)
    except KeyNotLoaded:
        raise  # (a bug of the caller: load() first)
    except VaultError as exc:
        log.warning("number.unreadable", table=binding.table, row_id=str(binding.row), where=where, error=str(exc))
        metrics.NUMBERS_UNREADABLE.labels(binding.table, where).inc()
        return None


@dataclass(frozen=True)
class Rewrapped:
    active_version: int
    previous_version: int | None
    keys_rewrapped: int


class NumberKeys:
    """Retention of the data keys, and master key rotation (maskbridge-admin keys)."""

    def __init__(self, repo: NumberKeyRepo, vault: NumberVault) -> None:
        self.repo = repo
        self.vault = vault

    @staticmethod
    def due(periods: list[date], today: date, retention_days: int) -> list[date]:
        """The periods whose keys may go today (see the module's docstring)."""
        return [p for p in periods if p + timedelta(days=retention_days + 1) <= today]

    def _target(self, row: SealedRow, today: date, retention_days: int | None) -> date:
        if row.left_at is not None and retention_days is not None:
            left = row.left_at.astimezone(timezone.utc).date()
            if left + timedelta(days=retention_days + 1) > today:
                return left
        return today

    async def reseal(
        self, periods: list[date], legacy: bool, retention_days: int | None
    ) -> tuple[int, list[uuid.UUID]]:
        """Re-seal every number sealed with these periods' keys (and format-1 numbers when
        `legacy`) with a key that lives on; returns how many, and the rows whose number does
        not open (left as they are: what cannot be read cannot be re-sealed)."""
        today = self.vault.today()
        headers = [period_header(p) for p in periods]
        total = 0
        unreadable: list[uuid.UUID] = []
        for table in SEALED_COLUMNS:
            rows = await self.repo.sealed_with(table, headers, legacy)
            await self.vault.load(r.number_enc for r in rows)
            changes = []
            for row in rows:
                binding = Binding(table, "number_enc", row.id)
                number = readable(self.vault, row.number_enc, binding, "retention")
                if number is None:  # (its key is gone already, or it is damaged: nothing to keep)
                    unreadable.append(row.id)
                    continue
                new = await self.vault.seal(number, binding, self._target(row, today, retention_days))
                changes.append((row.id, row.number_enc, new))
            await self.repo.reseal(table, changes)
            total += len(changes)
        return total, unreadable

    async def retire(self, retention_days: int) -> dict[str, int]:
        """Destroy the data keys whose time has come (after the purge of the same run). A
        number sealed with one of them that does not open does not keep its key: it is
        unreadable with or without it."""
        due = self.due(await self.repo.periods(), self.vault.today(), retention_days)
        resealed, unreadable = await self.reseal(due, True, retention_days)
        destroyed = await self.repo.destroy(due, [period_header(p) for p in due], unreadable) if due else []
        self.vault.forget(destroyed)
        if due and len(destroyed) < len(due):
            # (a row sealed with one of them appeared meanwhile: the next run takes it)
            log.warning("number_keys.kept", periods=[p.isoformat() for p in due if p not in destroyed])
        if destroyed or resealed:
            log.info("number_keys.destroyed", periods=[p.isoformat() for p in destroyed], numbers_resealed=resealed)
        return {"keys_destroyed": len(destroyed), "numbers_resealed": resealed, "numbers_unreadable": len(unreadable)}

    async def rewrap(self) -> Rewrapped:
        """Make this process's newest master key version the active one, and rewrap every
        key with it. No number is re-sealed; bridges keep running (their keys in memory are
        the same keys). Every bridge must have that version configured first."""
        version = self.vault.masters.newest
        previous = await self.repo.set_active_version(version)
        count = 0
        for key in await self.repo.keys_not_wrapped_by(version):
            if key.period is None:
                raw = self.vault.masters.unwrap_index_key(key.master_version, key.wrapped)
                wrapped = self.vault.masters.wrap_index_key(version, raw)
            else:
                raw = self.vault.masters.unwrap_data_key(key.period, key.master_version, key.wrapped)
                wrapped = self.vault.masters.wrap_data_key(key.period, version, raw)
            if await self.repo.rewrap(key, version, wrapped):
                count += 1
        log.info("number_keys.rewrapped", active_version=version, previous_version=previous, keys=count)
        return Rewrapped(version, previous, count)

    async def status(self) -> dict[str, Any]:
        """What the database holds, and what this process can open of it."""
        status = await self.repo.status()
        status["configured_versions"] = list(self.vault.masters.versions)
        status["legacy_numbers"] = await self.repo.legacy_numbers()
        return status

    async def check_versions(self) -> None:
        """Raise VaultError unless this process has every master version the database needs."""
        status = await self.repo.status()
        needed = {status.get("active_version"), status.get("index_key_version")}
        needed |= {int(v) for v in json.loads(status.get("data_keys_by_version") or "{}")}
        missing = sorted(v for v in needed if v is not None and v not in self.vault.masters.versions)
        if missing:
            raise VaultError(f"master key versions {', '.join(map(str, missing))} wrap keys of this database "
                             "but are not configured (MB_NUMBER_KEY, MB_NUMBER_KEYS)")
