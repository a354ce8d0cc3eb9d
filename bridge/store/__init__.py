"""Storage: every SQL statement of the bridge lives in this package."""

from bridge.store.db import connect, migrate, pending
from bridge.store.queries import Store

__all__ = ["Store", "connect", "migrate", "pending"]
