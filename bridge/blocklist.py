"""The blocklist: real numbers whose calls are refused on every session, and whose calls in
progress are ended at once (the bridge listens for blocks, from the API and the CLI alike)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime

import structlog

from bridge import metrics
from bridge.crypto import NumberVault, blocked_number
from bridge.number_keys import readable
from bridge.errors import BlockNotFound, InvalidInput
from bridge.sessions import Policy, phone_number, seconds
from bridge.store import Store
from bridge.store.blocklist import BlockedRow

log = structlog.get_logger(__name__)
_PHONE_LIKE = re.compile(r"\d[\d\s().-]{5,}\d")
_NOT_LETTER_OR_DIGIT = re.compile(r"[\W_]")  # every separator a number may be written with


def _holds_a_number(text: str) -> bool:
    """Seven digits or more, whatever separates them (spaces, dashes, underscores, slashes,
    quotes, dashes of other widths...): a number written to slip past a pattern."""
    return bool(_PHONE_LIKE.search(text) or re.search(r"\d{7,}", _NOT_LETTER_OR_DIGIT.sub("", text)))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from JSON "\ud800"
        return False
    return True


class Blocklist:
    def __init__(self, store: Store, vault: NumberVault, policy: Policy | None = None) -> None:
        self.repo = store.blocklist
        self.vault = vault
        self.policy = policy or Policy()

    async def add(
        self, number: object, reason: object = None, ttl_seconds: int | None = None
    ) -> tuple[BlockedRow, bool]:
        """Block a number everywhere, for `ttl_seconds` (None: until unblocked). Blocked
        already: its entry, whose expiry becomes the later of the two. Returns (entry, created)."""
        real = phone_number("number", number, self.policy.default_region)
        ttl = seconds("ttl_seconds", ttl_seconds)
        if reason is not None and (
            not isinstance(reason, str) or len(reason) > 500 or any(ord(ch) < 32 for ch in reason)
            or not _encodable(reason)
        ):
            raise InvalidInput("reason must be text of at most 500 characters", field="reason")
        if isinstance(reason, str) and _holds_a_number(reason):
            # The reason is kept in plaintext and shown to support staff: no number in it.
            raise InvalidInput("reason must not hold a phone number", field="reason")
        entry_id = uuid.uuid4()  # (made here: the sealed number is bound to its row)
        sealed = await self.vault.seal(real, blocked_number(entry_id))
        entry, created = await self.repo.add(entry_id, self.vault.index(real), sealed, reason, ttl)
        await self.vault.load([entry.number_enc])
        log.info("blocklist.added" if created else "blocklist.already_blocked", entry_id=str(entry.id),
                 expires_at=entry.expires_at.isoformat() if entry.expires_at else None)
        if created:
            metrics.BLOCKS.labels("api").inc()
        return entry, created

    async def find(self, after: tuple[datetime, uuid.UUID] | None, limit: int) -> list[BlockedRow]:
        rows = await self.repo.page(after, limit)
        await self.vault.load(r.number_enc for r in rows)
        return rows

    async def remove(self, entry_id: uuid.UUID) -> BlockedRow:
        entry = await self.repo.remove(entry_id)
        if entry is None:
            raise BlockNotFound()
        await self.vault.load([entry.number_enc])
        log.info("blocklist.removed", entry_id=str(entry_id))
        return entry

    def number_of(self, entry: BlockedRow) -> str | None:
        """The blocked number of an entry this service read (which loaded its key); None when
        it does not open (damaged: the block still holds, by the number's blind index).
        Retention never destroys the key of a readable blocked number (bridge.number_keys
        re-seals it first)."""
        return readable(self.vault, entry.number_enc, blocked_number(entry.id))
