"""Sealing real numbers and their blind index (bridge/crypto.py)."""

from __future__ import annotations

import pytest

from bridge.crypto import NumberVault, VaultError

NUMBER = "+79161234567"


def test_sealed_numbers_open_with_the_key_only():
    vault = NumberVault("k" * 40)
    sealed = vault.seal(NUMBER)
    assert vault.open(sealed) == NUMBER
    assert b"9161234567" not in sealed
    assert sealed != vault.seal(NUMBER), "a fresh nonce every time"
    with pytest.raises(VaultError):
        NumberVault("j" * 40).open(sealed)


def test_a_tampered_number_is_refused():
    vault = NumberVault("k" * 40)
    sealed = bytearray(vault.seal(NUMBER))
    sealed[-1] ^= 1
    with pytest.raises(VaultError):
        vault.open(bytes(sealed))
    with pytest.raises(VaultError):
        vault.open(b"\x02" + bytes(sealed[1:]))


def test_the_index_is_stable_and_keyed():
    a, b = NumberVault("k" * 40), NumberVault("j" * 40)
    assert a.index(NUMBER) == a.index(NUMBER)
    assert a.index(NUMBER) != a.index("+79161234568")
    assert a.index(NUMBER) != b.index(NUMBER), "without the key the index says nothing"


def test_a_short_key_is_refused():
    with pytest.raises(VaultError):
        NumberVault("too-short")
