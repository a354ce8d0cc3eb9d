"""`python -m bridge.healthcheck`: the bridge image's health check. Exit status 0 when the
bridge's /healthz answers 2xx (database and Asterisk both answer), 1 otherwise.

It asks the address the API listens on (MB_API_BIND, MB_API_PORT), or loopback when the
API listens on a wildcard address."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping



def healthz_url(env: Mapping[str, str]) -> str:
    host = env.get("MB_API_BIND", "127.0.0.1")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{env.get('MB_API_PORT', '8080')}/healthz"


def main() -> int:
    url = healthz_url(os.environ)
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            print(resp.read().decode(errors="replace"))
        return 0
    except urllib.error.HTTPError as exc:
        print(f"{url}: {exc.code} {exc.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
