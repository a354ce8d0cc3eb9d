"""Who the request being served is from: the name of its API token, for the audits it writes.

Set by the HTTP API once it has checked the request's token, for that request only (a
context variable: each request is served in its own context); by maskbridge-admin to
"admin:<unix user>" for its run; None in the bridge's own work (housekeeping, calls).
"""

from __future__ import annotations

import contextvars

REQUEST_TOKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_token", default=None)


def request_token() -> str | None:
    """The name of the API token of the request being served, if any."""
    return REQUEST_TOKEN.get()
