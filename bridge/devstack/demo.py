"""Demo data: a small pool and one open order session, so that `make call` works at once."""

from __future__ import annotations

from bridge.crypto import NumberVault
from bridge.store.number_keys import NumberKeyRepo
from bridge.pools import Pools
from bridge.limits import MAX_SECONDS
from bridge.requests import OpenSession
from bridge.sessions import Sessions
from bridge.store import Store, connect, migrate

DEMO_POOL = [f"+7495000000{i}" for i in range(1, 10)]
DEMO_REGION = "RU-MOW"
DEMO_ORDER = "demo-1001"
DEMO_COURIER = "+79160000001"
DEMO_CLIENT = "+79160000002"


async def load(database_url: str, number_key: str) -> str:
    """Migrate, add the demo pool, open the demo session; returns its pool number."""
    pool = await connect(database_url, max_size=2)
    try:
        vault = NumberVault(number_key, NumberKeyRepo(pool))
        await migrate(pool, vault)
        await vault.start()
        store = Store(pool)
        await Pools(store).import_numbers([{"number": n, "region": DEMO_REGION} for n in DEMO_POOL])
        session, _ = await Sessions(store, vault).open(OpenSession(
            order_id=DEMO_ORDER, courier_number=DEMO_COURIER, client_number=DEMO_CLIENT, region=DEMO_REGION,
            ttl_seconds=MAX_SECONDS,
        ))
        return session.pool_number
    finally:
        await pool.close()
