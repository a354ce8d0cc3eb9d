"""Demo data: a small pool and one open order session, so that `make call` works at once."""

from __future__ import annotations

from bridge.sessions import Sessions
from bridge.store import Store, connect, migrate

DEMO_POOL = [f"+7495000000{i}" for i in range(1, 10)]
DEMO_ORDER = "demo-1001"
DEMO_COURIER = "+79160000001"
DEMO_CLIENT = "+79160000002"


async def load(database_url: str) -> str:
    """Migrate, add the demo pool, open the demo session; returns its pool number."""
    pool = await connect(database_url, max_size=2)
    try:
        await migrate(pool)
        store = Store(pool)
        await store.add_pool_numbers(DEMO_POOL, region="RU-MOW")
        session, _ = await Sessions(store).open(DEMO_ORDER, DEMO_COURIER, DEMO_CLIENT)
        return session.pool_number
    finally:
        await pool.close()
