"""Pool numbers: import (CSV or JSON), list with their load, retire, utilisation."""

from __future__ import annotations

import asyncio
import csv
import io
from typing import Any

import structlog

from bridge.errors import InvalidImport, InvalidInput, PoolNumberInUse, PoolNumberNotFound
from bridge.languages import LANGUAGES
from bridge.limits import MAX_IMPORT, MAX_PHONE_NUMBER_LENGTH, MODES, POOL_STATES, REGION_FORM
from bridge.phone import InvalidNumber, normalize
from bridge.sessions import Policy
from bridge.store import Store
from bridge.store.pools import NumbersInUse, PoolNumberRow

log = structlog.get_logger(__name__)



Entry = tuple[str, object, object, object, object]  # (where, for errors; number; region; language; mode)


def parse_csv(text: str, default_region: str | None = None) -> list[Entry]:
    """`number[,region[,language[,mode]]]` per line; a header line naming `number` is
    allowed; # starts a comment. A line with more columns (not empty) is an error (csv.Error),
    as an unknown field of a JSON import is: it is not silently dropped."""
    rows: list[Entry] = []
    for line_no, fields in enumerate(csv.reader(io.StringIO(text.removeprefix("\ufeff"))), start=1):
        fields = [f.strip() for f in fields]
        if not fields or not fields[0] or fields[0].startswith("#"):
            continue
        if line_no == 1 and fields[0].lower() == "number":
            continue
        if any(fields[4:]):
            raise csv.Error(f"line {line_no} has {len(fields)} columns; at most 4: number, region, language, mode")
        region = fields[1] if len(fields) > 1 and fields[1] else default_region
        language = fields[2] if len(fields) > 2 and fields[2] else None
        mode = fields[3] if len(fields) > 3 and fields[3] else None
        rows.append((f"line {line_no}", fields[0], region, language, mode))
    return rows


# Rows checked between two yields to the event loop: an import of 100,000 numbers takes
# seconds of CPU (libphonenumber), and calls must not wait for it.
_CHECKED_PER_YIELD = 200


class Pools:
    def __init__(self, store: Store, policy: Policy | None = None) -> None:
        self.repo = store.pools
        self.policy = policy or Policy()
        self._importing = asyncio.Lock()  # one import at a time: others wait their turn

    def _canonical(self, raw: object, where: str) -> str:
        if not isinstance(raw, str) or len(raw) > MAX_PHONE_NUMBER_LENGTH:
            raise InvalidInput(f"{where}: number must be a string holding a phone number", field="number")
        try:
            return normalize(raw, self.policy.default_region)
        except InvalidNumber as exc:
            raise InvalidInput(f"{where}: not a valid phone number ({exc})", field="number") from None

    async def import_numbers(self, entries: list[Any]) -> dict[str, int]:
        """JSON entries: {"number", "region"?, "language"?, "mode"?} objects."""
        rows: list[Entry] = []
        problems: list[str] = []
        for i, entry in enumerate(entries, start=1):
            if not isinstance(entry, dict) or not set(entry) <= {"number", "region", "language", "mode"} \
                    or "number" not in entry:
                problems.append(f"entry {i}: must be an object with a number and optionally a region, a language "
                                "and a mode")
                continue
            rows.append((f"entry {i}", entry["number"], entry.get("region"), entry.get("language"), entry.get("mode")))
        return await self._import(rows, problems)

    async def import_csv(self, text: str, default_region: str | None = None) -> dict[str, int]:
        try:
            rows = parse_csv(text, default_region)
        except csv.Error as exc:
            raise InvalidImport(f"nothing was imported: the CSV is malformed ({exc})") from None
        return await self._import(rows, [])

    async def _import(self, entries: list[Entry], problems: list[str]) -> dict[str, int]:
        """All or nothing: one bad row rejects the import, and the error lists every bad row."""
        if not entries and not problems:
            raise InvalidInput("no numbers to import", field="numbers")
        if len(entries) > MAX_IMPORT:
            raise InvalidInput(f"at most {MAX_IMPORT} numbers per import", field="numbers")
        async with self._importing:
            return await self._import_checked(entries, problems)

    async def _import_checked(self, entries: list[Entry], problems: list[str]) -> dict[str, int]:
        rows: dict[str, tuple[str | None, str | None, str | None]] = {}
        for index, (where, raw_number, region, language, mode) in enumerate(entries):
            if index % _CHECKED_PER_YIELD == _CHECKED_PER_YIELD - 1:
                await asyncio.sleep(0)
            try:
                number = self._canonical(raw_number, where)
            except InvalidInput as exc:
                problems.append(str(exc))
                continue
            if region is not None and (not isinstance(region, str) or not REGION_FORM.fullmatch(region)):
                problems.append(f"{where}: region must look like RU or RU-MOW (ISO 3166)")
                continue
            if language is not None and language not in LANGUAGES:
                problems.append(f"{where}: language must be one of {', '.join(LANGUAGES)}")
                continue
            if mode is not None and mode not in MODES:
                problems.append(f"{where}: mode must be one of {', '.join(MODES)}")
                continue
            if number in rows and rows[number] != (region, language, mode):
                problems.append(f"{where}: {number} is listed twice, differently")
                continue
            rows[number] = (region, language, mode)  # type: ignore[assignment]
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise InvalidImport("nothing was imported: " + "; ".join(shown), problems=len(problems))
        try:
            counts = await self.repo.import_numbers([(n, r, lang, m) for n, (r, lang, m) in rows.items()])
        except NumbersInUse as exc:
            shown_numbers = exc.numbers[:20]
            raise InvalidImport(
                "nothing was imported: the mode of a number in use (live sessions or pairs cooling off) cannot "
                f"change: {', '.join(shown_numbers)}", problems=len(exc.numbers),
            ) from None
        log.info("pool.imported", **counts)
        return counts

    async def get(self, number: object) -> PoolNumberRow:
        canonical = self._canonical(number, "pool number")
        row = await self.repo.get(canonical)
        if row is None:
            raise PoolNumberNotFound()
        return row

    async def find(
        self, *, region: str | None, state: str | None, after: str | None, limit: int
    ) -> list[PoolNumberRow]:
        if state is not None and state not in POOL_STATES:
            raise InvalidInput(f"state must be one of {', '.join(POOL_STATES)}", field="state")
        return await self.repo.page(region=region, state=state, after=after, limit=limit)

    async def retire(self, number: object) -> PoolNumberRow:
        row = await self.get(number)
        retired = await self.repo.retire(row.number, self.policy.number_cooling)
        if retired is None:  # deleted between the two statements: nobody deletes pool numbers
            raise PoolNumberNotFound()
        log.info("pool.retired", pool_number=row.number, state=retired.state)
        return retired

    async def set_mode(self, number: object, mode: object) -> PoolNumberRow:
        """Make a number direct (routed by the caller's pair) or order_code (shared by many
        orders, told apart by the code the caller keys in). Only while nobody holds it."""
        if not isinstance(mode, str) or mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}", field="mode")
        row = await self.get(number)
        try:
            changed = await self.repo.set_mode(row.number, mode)
        except NumbersInUse:
            raise PoolNumberInUse(
                "the number is in use (live sessions, or pairs cooling off): its mode can change once nobody "
                "holds it", live_sessions=row.live_sessions,
                cooling_pairs=row.cooling_pairs,
            ) from None
        if changed is None:
            raise PoolNumberNotFound()
        if changed.mode != row.mode:
            log.info("pool.mode_changed", pool_number=row.number, mode=mode)
        return changed

    async def usage(self) -> list[dict[str, Any]]:
        return await self.repo.usage()
