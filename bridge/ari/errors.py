"""ARI errors, one tree: catch AriError for any of them."""

from __future__ import annotations


class AriError(Exception):
    """An ARI request failed."""

    def __init__(self, method: str, path: str, status: int | None, message: str) -> None:
        super().__init__(f"ARI {method} {path}: {status or 'no answer'} {message}".strip())
        self.method = method
        self.path = path
        self.status = status
        self.message = message


class AriNotFound(AriError):
    """The channel, bridge or playback does not exist (any more). Often an expected outcome:
    the other side hung up first."""


class AriConflict(AriError):
    """The object exists but is not in a state for this request (e.g. channel not in Stasis)."""


class AriUnavailable(AriError):
    """Asterisk did not answer, or answered with a server error."""


def from_status(method: str, path: str, status: int, message: str) -> AriError:
    if status == 404:
        return AriNotFound(method, path, status, message)
    if status in (409, 412, 422):
        return AriConflict(method, path, status, message)
    if status >= 500:
        return AriUnavailable(method, path, status, message)
    return AriError(method, path, status, message)
