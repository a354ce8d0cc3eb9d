# The bridge image: `python -m bridge` with settings from the environment (see
# docker-compose.yml and docs/production.md). Build context: the repository root.
#
# BASE_IMAGE is python:3.11-slim; the compose test (tests/compose) gives a local stand-in,
# since no registry is reachable on our machines.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the bridge needs is copied, named one by one: the build context also holds
# .stack/ (the local stack's generated secrets and data), .venv/ and .git/, none of which
# may end up in the image.
WORKDIR /app
COPY pyproject.toml /app/
COPY bridge /app/bridge
COPY sql /app/sql

# Editable install, on purpose. bridge/store/db.py finds its migrations at
# Path(__file__).resolve().parents[2] / "sql", i.e. next to the `bridge` package in the
# source tree. A regular `pip install /app` would copy the package into site-packages,
# where that path becomes /usr/local/lib/python3.11/sql and does not exist (sql/ is not
# package data). With `pip install -e /app` the package is imported from /app/bridge, so
# the path is /app/sql, copied above. The last line checks it at build time.
RUN pip install --no-cache-dir -e /app \
    && find /app -name '__pycache__' -prune -exec rm -rf {} + \
    && python -c 'from bridge.store.db import SQL_DIR; assert sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql")), SQL_DIR; print("migrations in", SQL_DIR)'

RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin maskbridge
USER maskbridge

# /healthz needs no token; it answers 503 unless the database answers and Asterisk does
# (its ARI event stream connected, a ping answered), each within 2 s. bridge/healthcheck.py asks the address the API listens on (MB_API_BIND,
# loopback for a wildcard) and exits 0 only on a 2xx answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "bridge.healthcheck"]

CMD ["python", "-m", "bridge"]
