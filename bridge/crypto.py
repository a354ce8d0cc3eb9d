"""Real numbers at rest: authenticated encryption, and a keyed blind index to find them.

The key lives outside the database (MB_NUMBER_KEY). Two independent subkeys are derived
from it with HKDF: one for AES-256-GCM, one for the HMAC-SHA256 blind index. An unkeyed
hash would be no protection at all: there are only about 10^10 mobile numbers, and a
laptop hashes them all in minutes. Without the key, the index says nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = b"\x01"
_NONCE = 12
_AAD = b"maskbridge real number v1"
MIN_KEY_CHARS = 32


class VaultError(Exception):
    """The number key is missing, too short, or does not open the stored numbers."""


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"maskbridge", info=purpose).derive(master)


class NumberVault:
    """Seals and opens real phone numbers (E.164) and computes their blind index."""

    def __init__(self, key: str) -> None:
        if len(key) < MIN_KEY_CHARS:
            raise VaultError(f"the number key must be at least {MIN_KEY_CHARS} characters of random text")
        master = key.encode()
        self._aead = AESGCM(_derive(master, b"number encryption"))
        self._index_key = _derive(master, b"number blind index")

    def seal(self, number: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, number.encode(), _AAD)

    def open(self, sealed: bytes) -> str:
        if sealed[:1] != _VERSION:
            raise VaultError("unknown sealed-number format")
        nonce, body = sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :]
        try:
            return self._aead.decrypt(nonce, body, _AAD).decode()
        except InvalidTag:
            raise VaultError("a stored number does not open with this key (wrong MB_NUMBER_KEY?)") from None

    def index(self, number: str) -> bytes:
        return hmac.new(self._index_key, number.encode(), hashlib.sha256).digest()
