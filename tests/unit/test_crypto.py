"""Sealing real numbers: per-day data keys wrapped by versioned master keys, bound to their
row, destroyed by retention; and their blind index (bridge/crypto.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest

from tests.unit.memory_keys import MemoryKeyStore
from bridge.crypto import (
    Binding, KeyNotLoaded, MasterKeys, NoKeyStore, NumberVault, VaultError, WrappedKey, blocked_number,
    participant_number, period_header, period_of,
)

NUMBER = "+79161234567"
KEY, OTHER_KEY = "k" * 40, "j" * 40
DAY = date(2025, 3, 1)


def vault(store: MemoryKeyStore | None = None, masters: MasterKeys | str = KEY, day: date = DAY) -> NumberVault:
    at = datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc)
    return NumberVault(masters, store if store is not None else MemoryKeyStore(), clock=lambda: at)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


ROW = participant_number(uuid.UUID(int=1))


def test_sealed_numbers_open_for_their_row_with_their_day_key():
    v = vault()
    sealed = run(v.seal(NUMBER, ROW))
    assert run(v.open(sealed, ROW)) == NUMBER
    assert b"9161234567" not in sealed
    assert sealed != run(v.seal(NUMBER, ROW)), "a fresh nonce every time"
    assert period_of(sealed) == DAY, "the sealed number names its data key's period"
    assert run(v.open(None, ROW)) is None, "a column the retention job emptied"


def test_a_sealed_number_does_not_open_in_another_row_or_column():
    v = vault()
    sealed = run(v.seal(NUMBER, ROW))
    for elsewhere in (participant_number(uuid.UUID(int=2)), blocked_number(uuid.UUID(int=1)),
                      Binding("participants", "other_column", uuid.UUID(int=1))):
        with pytest.raises(VaultError):
            run(v.open(sealed, elsewhere))


def test_a_tampered_number_is_refused():
    v = vault()
    sealed = bytearray(run(v.seal(NUMBER, ROW)))
    sealed[-1] ^= 1
    with pytest.raises(VaultError):
        run(v.open(bytes(sealed), ROW))
    moved = period_header(DAY + timedelta(days=1)) + run(v.seal(NUMBER, ROW))[5:]
    run(v.seal("+79160000000", ROW, DAY + timedelta(days=1)))  # (that day has a key too)
    with pytest.raises(VaultError):
        run(v.open(moved, ROW))
    with pytest.raises(VaultError):
        run(v.open(b"\x03" + bytes(sealed[1:]), ROW))


def test_each_day_has_its_own_key_made_once_for_every_bridge():
    store = MemoryKeyStore()
    one, two = vault(store), vault(store)
    sealed = run(one.seal(NUMBER, ROW))
    tomorrow = run(one.seal(NUMBER, ROW, DAY + timedelta(days=1)))
    assert set(store.data) == {DAY, DAY + timedelta(days=1)}
    assert run(two.open(sealed, ROW)) == NUMBER, "another bridge reads the same day's key"
    assert run(two.open(tomorrow, ROW)) == NUMBER
    queries = store.queries
    assert run(two.open(sealed, ROW)) == NUMBER and store.queries == queries, "keys are kept in memory"


def test_the_stored_data_keys_are_wrapped_by_the_master_key():
    store = MemoryKeyStore()
    sealed = run(vault(store).seal(NUMBER, ROW))
    stored = store.data[DAY]
    assert len(stored.wrapped) == 12 + 32 + 16
    stranger = MemoryKeyStore()
    stranger.data = dict(store.data)
    with pytest.raises(VaultError):
        run(vault(stranger, OTHER_KEY).open(sealed, ROW))


def test_a_destroyed_day_key_leaves_its_numbers_purged_not_broken():
    store = MemoryKeyStore()
    v, other = vault(store), vault(store)
    sealed = run(v.seal(NUMBER, ROW))
    assert run(other.open(sealed, ROW)) == NUMBER
    del store.data[DAY]  # the retention job's DELETE
    v.forget([DAY])  # (what every bridge's listener does on the NOTIFY)
    other.forget([DAY])
    assert run(v.open(sealed, ROW)) is None
    assert run(other.open(sealed, ROW)) is None
    fresh = vault(store)
    with pytest.raises(KeyNotLoaded):
        fresh.open_cached(sealed, ROW)
    run(fresh.load([sealed]))
    assert fresh.open_cached(sealed, ROW) is None, "looked up and found destroyed: purged"


def test_master_keys_rotate_old_versions_still_unwrap():
    store = MemoryKeyStore(active=1)
    old = vault(store, MasterKeys({1: KEY}))
    sealed = run(old.seal(NUMBER, ROW))
    both = MasterKeys({1: KEY, 2: OTHER_KEY})
    store.active = 2  # (maskbridge-admin keys rewrap makes the newest active ...)
    new = vault(store, both, DAY + timedelta(days=1))
    later = run(new.seal(NUMBER, ROW))
    assert store.data[DAY + timedelta(days=1)].master_version == 2
    assert run(new.open(sealed, ROW)) == NUMBER, "version 1 still unwraps"
    # (... and rewraps every key with it: then version 1 can go)
    day = store.data[DAY]
    raw = both.unwrap_data_key(DAY, 1, day.wrapped)
    store.data[DAY] = WrappedKey(DAY, 2, both.wrap_data_key(DAY, 2, raw))
    only_new = vault(store, MasterKeys({2: OTHER_KEY}))
    assert run(only_new.open(sealed, ROW)) == NUMBER, "the same data key, wrapped anew: no number re-sealed"
    assert run(only_new.open(later, ROW)) == NUMBER
    with pytest.raises(VaultError, match="version 2 is not configured"):
        MasterKeys({1: KEY}).unwrap_data_key(DAY, 2, store.data[DAY].wrapped)


def test_a_wrapped_key_is_bound_to_its_period_and_version():
    masters = MasterKeys({1: KEY, 2: OTHER_KEY})
    wrapped = masters.wrap_data_key(DAY, 1, b"x" * 32)
    assert masters.unwrap_data_key(DAY, 1, wrapped) == b"x" * 32
    with pytest.raises(VaultError):
        masters.unwrap_data_key(DAY + timedelta(days=1), 1, wrapped)
    with pytest.raises(VaultError):
        masters.unwrap_data_key(DAY, 2, wrapped)


def test_numbers_sealed_before_data_keys_still_open():
    masters = MasterKeys({1: KEY})
    legacy = masters.seal_legacy(NUMBER)
    assert period_of(legacy) is None
    assert run(vault(MemoryKeyStore(), masters).open(legacy, ROW)) == NUMBER
    with pytest.raises(VaultError):
        run(vault(MemoryKeyStore(), OTHER_KEY).open(legacy, ROW))


def test_the_index_is_stable_keyed_and_stored_wrapped():
    a, b = vault(), NumberVault(OTHER_KEY)
    assert a.index(NUMBER) == a.index(NUMBER)
    assert a.index(NUMBER) != a.index("+79161234568")
    assert a.index(NUMBER) != b.index(NUMBER), "without the key the index says nothing"
    # The index key a database gets is the one numbers were indexed with before sql/023 ...
    store = MemoryKeyStore()
    first = vault(store)
    before = first.index(NUMBER)
    run(first.start())
    assert first.index(NUMBER) == before and store.index is not None
    # ... and it stays when master key version 1 is retired (it is read, wrapped, from the database).
    masters = MasterKeys({1: KEY, 2: OTHER_KEY})
    store.index = WrappedKey(None, 2, masters.wrap_index_key(2, masters.unwrap_index_key(1, store.index.wrapped)))
    later = vault(store, MasterKeys({2: OTHER_KEY}))
    run(later.start())
    assert later.index(NUMBER) == before


def test_a_vault_without_a_key_store_only_indexes():
    v = NumberVault(KEY)
    assert v.index(NUMBER)
    with pytest.raises(NoKeyStore):
        run(v.seal(NUMBER, ROW))


def test_short_or_missing_master_keys_are_refused():
    with pytest.raises(VaultError):
        NumberVault("too-short")
    with pytest.raises(VaultError):
        MasterKeys({})
    with pytest.raises(VaultError):
        MasterKeys({0: KEY})


def test_a_number_that_does_not_open_reads_as_none_logged_by_row_never_by_number():
    """Another row's ciphertext, a damaged one, one of an unknown format: readable() says None
    (as for a purged number), logs the table and row, and counts it; load() is not stopped by
    them either, so the readable numbers of the same listing still open."""
    from structlog.testing import capture_logs

    from bridge import metrics
    from bridge.crypto import participant_number
    from bridge.number_keys import readable

    v = vault()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    sealed_a = run(v.seal("+79161234567", participant_number(a)))
    sealed_c = run(v.seal("+79161234569", participant_number(c)))
    damaged = sealed_c[:-1] + bytes([sealed_c[-1] ^ 1])
    fresh = vault(v.store)  # type: ignore[arg-type]  # (another process: nothing in memory)
    run(fresh.load([b"\x07garbage", sealed_a, damaged]))
    before = metrics.NUMBERS_UNREADABLE.labels("participants", "read")._value.get()
    with capture_logs() as logged:
        assert readable(fresh, sealed_a, participant_number(b)) is None  # a's number in b's row
        assert readable(fresh, damaged, participant_number(c)) is None
        assert readable(fresh, b"\x07garbage", participant_number(c)) is None
        assert readable(fresh, sealed_a, participant_number(a)) == "+79161234567"
    assert metrics.NUMBERS_UNREADABLE.labels("participants", "read")._value.get() == before + 3
    assert [(e["event"], e["table"], e["row_id"]) for e in logged] == [
        ("number.unreadable", "participants", str(b)), ("number.unreadable", "participants", str(c)),
        ("number.unreadable", "participants", str(c))]
    assert "+7916" not in str(logged)
