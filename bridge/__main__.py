"""`python -m bridge` (or `maskbridge`): run the bridge with settings from the environment."""

from __future__ import annotations

import asyncio
import sys

from bridge import app, logs
from bridge.config import ConfigError, Settings
from bridge.nodes import NodeTaken


def main() -> None:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"maskbridge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_level)
    try:
        asyncio.run(app.main(settings))
    except (NodeTaken, app.StartupError) as exc:
        print(f"maskbridge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
