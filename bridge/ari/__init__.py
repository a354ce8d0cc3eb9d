"""A small ARI client of our own on aiohttp: REST with typed errors, and the event stream
with reconnect and backoff. It knows nothing about orders, sessions or masking."""

from bridge.ari.client import AriClient
from bridge.ari.errors import AriConflict, AriError, AriNotFound, AriUnavailable
from bridge.ari.events import EventStream

__all__ = ["AriClient", "AriConflict", "AriError", "AriNotFound", "AriUnavailable", "EventStream"]
