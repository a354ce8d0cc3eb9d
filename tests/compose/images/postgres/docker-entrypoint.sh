#!/bin/bash
# Entrypoint of the test's postgres:15 stand-in (see the Dockerfile next to it): the parts of
# the official image's entrypoint that docker-compose.yml relies on.
#
# First start (no PG_VERSION in PGDATA): initdb with POSTGRES_USER as superuser and
# POSTGRES_PASSWORD as its password, password (scram-sha-256) authentication over TCP,
# then POSTGRES_DB created by a server that listens on its socket only, as the official image
# does, so that a TCP health check only passes once the real server is up. Then, or at once
# on a later start, `postgres` with the arguments given. As root, it drops to `postgres`.
set -euo pipefail

if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "Error: POSTGRES_PASSWORD is not set: the database is uninitialized and superuser password is not specified." >&2
        exit 1
    fi
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
    if [ "$db" != postgres ]; then
        psql -v ON_ERROR_STOP=1 -q --username "$user" --dbname postgres \
            --set db="$db" <<<'CREATE DATABASE :"db";'
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
