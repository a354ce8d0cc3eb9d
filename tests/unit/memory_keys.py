"""The key tables of sql/023 in memory: a KeyStore for the vault in unit tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date

from bridge.crypto import WrappedKey


class MemoryKeyStore:
    """The key tables of sql/023, in a dict."""

    def __init__(self, active: int = 1) -> None:
        self.active = active
        self.data: dict[date, WrappedKey] = {}
        self.index: WrappedKey | None = None
        self.queries = 0

    async def data_keys(self, periods: Sequence[date]) -> list[WrappedKey]:
        self.queries += 1
        return [self.data[p] for p in periods if p in self.data]

    async def add_data_key(self, period: date, wrap: Callable[[int], bytes]) -> None:
        self.data.setdefault(period, WrappedKey(period, self.active, wrap(self.active)))

    async def index_key(self) -> WrappedKey | None:
        return self.index

    async def add_index_key(self, wrap: Callable[[int], bytes]) -> None:
        self.index = self.index or WrappedKey(None, self.active, wrap(self.active))
