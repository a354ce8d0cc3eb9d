"""The local Postgres cluster: initdb once, start and stop with pg_ctl as the postgres user."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bridge.devstack.settings import Stack


def _bin(name: str) -> str:
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"Postgres binary {name} not found: run `make deps` (apt-get install postgresql)")


def _as_postgres(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, check=check)


def _sql(stack: Stack, sql: str) -> str:
    out = _as_postgres(
        _bin("psql"), "-h", str(stack.pg_dir), "-p", stack.env["MB_PG_PORT"], "-U", "postgres",
        "-d", "postgres", "-tAc", sql,
    )
    return out.stdout.strip()


def is_running(stack: Stack) -> bool:
    if not (stack.pg_dir / "PG_VERSION").exists():
        return False
    return _as_postgres(_bin("pg_ctl"), "-D", str(stack.pg_dir), "status", check=False).returncode == 0


def start(stack: Stack) -> None:
    """Create the cluster if needed, start it, and make sure the role and database exist."""
    pg = stack.pg_dir
    if not (pg / "PG_VERSION").exists():
        pg.mkdir(parents=True, exist_ok=True)
        shutil.chown(pg, "postgres", "postgres")
        pg.chmod(0o700)
        _as_postgres(
            _bin("initdb"), "-D", str(pg), "-U", "postgres", "--auth-local=peer",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
        )
    if not is_running(stack):
        log = pg / "server.log"
        _as_postgres(
            _bin("pg_ctl"), "-D", str(pg), "-l", str(log), "-w", "-t", "60",
            "-o", f"-p {stack.env['MB_PG_PORT']} -c listen_addresses=127.0.0.1 -k {pg}",
            "start",
        )
    password = stack.env["MB_DB_PASSWORD"].replace("'", "''")
    if _sql(stack, "SELECT 1 FROM pg_roles WHERE rolname = 'maskbridge'") != "1":
        _sql(stack, f"CREATE ROLE maskbridge LOGIN PASSWORD '{password}'")
    else:
        _sql(stack, f"ALTER ROLE maskbridge PASSWORD '{password}'")
    if _sql(stack, "SELECT 1 FROM pg_database WHERE datname = 'maskbridge'") != "1":
        _sql(stack, "CREATE DATABASE maskbridge OWNER maskbridge")


def fresh_database(stack: Stack, name: str) -> str:
    """An empty database `name` owned by the bridge's role (dropped first if it exists), for a
    second bridge process that must not share the main one's data; its URL."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a plain database name: {name!r}")
    drop_database(stack, name)
    _sql(stack, f"CREATE DATABASE {name} OWNER maskbridge")
    return stack.database_url.rsplit("/", 1)[0] + "/" + name


def drop_database(stack: Stack, name: str) -> None:
    _sql(stack, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def stop(stack: Stack) -> None:
    if is_running(stack):
        _as_postgres(_bin("pg_ctl"), "-D", str(stack.pg_dir), "-m", "fast", "-w", "stop")


def psql_command(stack: Stack) -> list[str]:
    return [_bin("psql"), stack.database_url]


def dump_command(stack: Stack, schema: str | None = None) -> list[str]:
    """pg_dump of the bridge's database (or of one schema of it), data and schema, as plain
    SQL on stdout."""
    return [_bin("pg_dump"), "--no-owner", *([f"--schema={schema}"] if schema else []), stack.database_url]


def restore_command(database_url: str) -> list[str]:
    """psql replaying a plain-SQL dump (dump_command's) from stdin into `database_url`,
    stopping at the first error."""
    return [_bin("psql"), "--quiet", "--no-psqlrc", "-v", "ON_ERROR_STOP=1", database_url]
