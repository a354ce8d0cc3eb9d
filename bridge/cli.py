"""`maskbridge-admin`: the engineers' tool, over the same services as the HTTP API.

It talks to the database directly (MB_DATABASE_URL, MB_NUMBER_KEY and the session
settings from the environment), so it works while the bridge is down. Real numbers are
shown masked, as in the API. `--json` prints what the API would answer.

    maskbridge-admin pool import numbers.csv [--region RU-MOW]
    maskbridge-admin pool list [--region R] [--state active|cooling|retired]
    maskbridge-admin pool retire +74950000001 [...]
    maskbridge-admin pool set-mode +74950000001 direct|order_code
    maskbridge-admin pool usage
    maskbridge-admin session open ORDER COURIER CLIENT [--region R] [--ttl S] [--idle S] [--grace S]
                                  [--mode order_code [--order-code DIGITS]] [--record [yes|no]]
                                  [--calls-per-hour N] [--quiet-hours "22:00-08:00 Europe/Moscow"] ...
                                  (every session term, written as its MB_ setting is)
    maskbridge-admin session show SESSION_ID | --order ORDER
    maskbridge-admin session list [--order ORDER] [--status open|grace|closed]
    maskbridge-admin session extend SESSION_ID [--ttl S] [--idle S]
    maskbridge-admin session reassign SESSION_ID NEW_COURIER
    maskbridge-admin session close SESSION_ID [--grace S]
    maskbridge-admin calls ORDER
    maskbridge-admin housekeeping [--purge] [--older-than DAYS] [--recordings] [--recordings-older-than DAYS]
    maskbridge-admin block add NUMBER [--reason TEXT] [--ttl S] | block list | block remove ENTRY_ID
    maskbridge-admin token add NAME --scope SCOPE [--scope ...] [--expires 90d|2026-12-31] [--rate N]
    maskbridge-admin token list | token revoke NAME
    maskbridge-admin keys status | keys rewrap
    maskbridge-admin migrate

A real number given as "-" is read from standard input (one per line), so that it stays out
of the shell's history and the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

from bridge import logs, webhooks
from bridge.api.http import _default, render_block, render_pool_number, render_session
from bridge.blocklist import Blocklist
from bridge.app import policy_of
from bridge.config import ConfigError, Settings
from bridge.crypto import MasterKeys, NumberVault, VaultError
from bridge.number_keys import NumberKeys
from bridge.errors import InvalidInput, ServiceError, SessionNotFound
from bridge.limits import MAX_PAGE
from bridge.pools import Pools
from bridge.recordings import Recordings
from bridge.requester import REQUEST_TOKEN
from bridge.ari import AriClient
from bridge.requests import OpenSession, parse
from bridge.sessions import Sessions
from bridge.store import Store, connect, migrate, pending
from bridge.store.tokens import TokenRepo, TokenRow
from bridge.store.number_keys import NumberKeyRepo
from bridge.store.webhooks import WebhookRepo
from bridge.terms import Terms
from bridge.tokens import PREFIX, SCOPES, Tokens


class Tool:
    def __init__(
        self, sessions: Sessions, pools: Pools, blocklist: Blocklist, as_json: bool, recordings: Recordings,
        tokens: Tokens, webhook_retention_days: int = 7,
    ) -> None:
        self.tokens = tokens
        self.sessions = sessions
        self.pools = pools
        self.blocklist = blocklist
        self.as_json = as_json
        self.recordings = recordings
        self.webhook_retention_days = webhook_retention_days

    def out(self, data: Any, table: list[dict[str, Any]] | None = None, columns: list[str] | None = None) -> None:
        if self.as_json or table is None:
            print(json.dumps(data, default=_default, indent=2, ensure_ascii=False))
            return
        cols = columns or (list(table[0]) if table else [])
        cells = [[_cell(row.get(c)) for c in cols] for row in table]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        if not table:
            print("(none)")

    async def session_id(self, raw: str | None, order: str | None) -> uuid.UUID:
        if order:
            found = await self.sessions.find(order_id=order, status=None, after=None, limit=1)
            if not found:
                raise SessionNotFound(f"no session for order {order}")
            return found[0].id
        if not raw:
            raise InvalidInput("give a session id (a UUID) or --order")
        return _session_arg(raw)

    def session(self, row: Any) -> None:
        data = render_session(self.sessions, row)
        if self.as_json:
            self.out(data)
            return
        for key in ("id", "order_id", "status", "pool_number", "mode", "order_code", "region", "created_at",
                    "expires_at", "idle_timeout_seconds", "grace_until", "closed_at", "end_reason", "record"):
            print(f"{key:22} {_cell(data[key])}")
        for role, p in data["participants"].items():
            state = "live" if p["left_at"] is None else f"left {_cell(p['left_at'])}"
            print(f"{role:22} {p['number'] or '(purged)'} dials {p['proxy_number']} ({state})")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = _default(value) if not isinstance(value, (str, int, float)) else value
    return str(text)


def admin_actor() -> str:
    """Who the changes of this run are attributed to, where the API would name its token
    (a session's history, the blocklist): "admin:<unix user>"."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # (no name for this uid)
        user = str(os.getuid())
    user = re.sub(r"[^A-Za-z0-9_.-]", "_", user)[:32]
    return f"admin:{user}" if user else "admin"


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    REQUEST_TOKEN.set(admin_actor())
    policy = policy_of(settings)
    pool = await connect(settings.database_url, max_size=2, command_timeout=None)
    try:
        vault = NumberVault(MasterKeys(settings.number_keys), NumberKeyRepo(pool))
        if args.group == "migrate":
            applied = await migrate(pool, vault)
            print("applied: " + ", ".join(applied) if applied else "the database is up to date")
            return 0
        # The tool never changes the schema by itself: a bridge of the old version may be
        # serving this database.
        behind = await pending(pool)
        if behind:
            print(f"maskbridge-admin: the database lacks migrations {', '.join(behind)}; start the new bridge "
                  "(it migrates) or run `maskbridge-admin migrate`", file=sys.stderr)
            return 2
        store = Store(pool, node=settings.node_id)
        keys = NumberKeys(store.number_keys, vault)
        if args.group == "keys":
            await KEY_COMMANDS[args.action](keys, args.json)
            return 0
        await keys.check_versions()
        await vault.start()
        ari = (AriClient(settings.ari_url, settings.ari_user, settings.ari_password, settings.ari_app)
               if settings.ari_url and settings.ari_user and settings.ari_password else None)
        recordings = Recordings(store, ari, "", retention_days=settings.recording_retention_days,
                                node=settings.node_id)
        tool = Tool(Sessions(store, vault, policy), Pools(store, policy), Blocklist(store, vault, policy), args.json,
                    recordings, Tokens(TokenRepo(pool)), settings.webhook_retention_days)
        try:
            await COMMANDS[(args.group, getattr(args, "action", None))](tool, args)
        finally:
            if ari is not None:
                await ari.close()
        return 0
    finally:
        await pool.close()


# --- commands ------------------------------------------------------------------------------


async def pool_import(tool: Tool, a: argparse.Namespace) -> None:
    # (A file read at once, before anything else happens: the admin tool runs one command.)
    text = sys.stdin.read() if a.file == "-" else Path(a.file).read_text(encoding="utf-8")  # noqa: ASYNC240
    tool.out(await tool.pools.import_csv(text, a.region))


async def pool_list(tool: Tool, a: argparse.Namespace) -> None:
    rows, after = [], None
    while True:  # every page
        page = await tool.pools.find(region=a.region, state=a.state, after=after, limit=500)
        rows += [render_pool_number(r) for r in page]
        if len(page) < 500:
            break
        after = page[-1].number
    tool.out(rows, rows, ["number", "region", "state", "live_sessions", "cooling_pairs", "cooling_until"])


async def pool_retire(tool: Tool, a: argparse.Namespace) -> None:
    rows = [render_pool_number(await tool.pools.retire(n)) for n in a.numbers]
    tool.out(rows, rows, ["number", "region", "state", "live_sessions", "cooling_until"])


async def pool_set_mode(tool: Tool, a: argparse.Namespace) -> None:
    row = render_pool_number(await tool.pools.set_mode(a.number, a.mode))
    tool.out(row, [row], ["number", "region", "mode", "state", "live_sessions"])


async def pool_usage(tool: Tool, a: argparse.Namespace) -> None:
    rows = await tool.pools.usage()
    tool.out(rows, rows)


def _number(arg: str) -> str:
    """A real number argument; "-" reads the next line of standard input instead."""
    return sys.stdin.readline().strip() if arg == "-" else arg


def _session_arg(raw: str, what: str = "session") -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidInput(f"{raw[:40]!r} is not a {what} id (a UUID)") from None


def _term_options(a: argparse.Namespace) -> dict[str, Any]:
    """The session terms given as options (each as its MB_ setting is written)."""
    values: dict[str, Any] = {}
    for name in Terms.names():
        raw = getattr(a, name)
        if raw is not None:
            try:
                values[name] = Terms.term(name).parse_env(raw)
            except ValueError as exc:
                raise InvalidInput(f"--{name.replace('_', '-')} {exc}", field=name) from None
    return values


async def session_open(tool: Tool, a: argparse.Namespace) -> None:
    request = parse(OpenSession, {
        "order_id": a.order, "courier_number": _number(a.courier), "client_number": _number(a.client),
        "region": a.region, "ttl_seconds": a.ttl, "idle_timeout_seconds": a.idle, "grace_seconds": a.grace,
        "mode": a.mode, "order_code": a.order_code, **_term_options(a),
    })
    session, created = await tool.sessions.open(request)
    if not tool.as_json:
        print("opened" if created else "already open")
    tool.session(session)


async def session_show(tool: Tool, a: argparse.Namespace) -> None:
    session_id = await tool.session_id(a.session, a.order)
    tool.session(await tool.sessions.get(session_id))
    if not tool.as_json:
        print("events:")
        for e in await tool.sessions.events(session_id):
            print(f"  {_cell(e['at'])}  {e['kind']}  {json.dumps(e['detail'])}")


async def session_list(tool: Tool, a: argparse.Namespace) -> None:
    rows = await tool.sessions.find(order_id=a.order, status=a.status, after=None, limit=a.limit)
    data = [render_session(tool.sessions, s) for s in rows]
    tool.out(data, data, ["id", "order_id", "status", "pool_number", "created_at", "expires_at", "end_reason"])


async def session_extend(tool: Tool, a: argparse.Namespace) -> None:
    tool.session(await tool.sessions.extend(_session_arg(a.session), a.ttl, a.idle))


async def session_reassign(tool: Tool, a: argparse.Namespace) -> None:
    session, _changed = await tool.sessions.reassign_courier(_session_arg(a.session), _number(a.courier))
    tool.session(session)


async def session_close(tool: Tool, a: argparse.Namespace) -> None:
    tool.session(await tool.sessions.close(_session_arg(a.session), a.grace))


async def order_calls(tool: Tool, a: argparse.Namespace) -> None:
    if not await tool.sessions.find(order_id=a.order, status=None, after=None, limit=1):
        raise SessionNotFound(f"no session for order {a.order}")
    calls = await tool.sessions.store.order_calls(a.order, None, 100_000)
    tool.out(calls, calls, ["started_at", "caller_role", "callee_role", "outcome", "hangup_by", "hangup_cause",
                            "duration_seconds"])


async def housekeeping(tool: Tool, a: argparse.Namespace) -> None:
    result = {"swept": await tool.sessions.sweep()}
    if a.purge:
        result["purged"] = await tool.sessions.purge(a.older_than)
        result["webhooks"] = await webhooks.prune(WebhookRepo(tool.sessions.store.pool), tool.webhook_retention_days)
    if a.recordings:
        # The audio is in Asterisk: this one needs ARI (MB_ARI_URL, MB_ARI_USER, MB_ARI_PASSWORD).
        result["recordings"] = await tool.recordings.purge(a.recordings_older_than)
    tool.out(result)


async def block_add(tool: Tool, a: argparse.Namespace) -> None:
    entry, created = await tool.blocklist.add(_number(a.number), a.reason, a.ttl)
    if not tool.as_json:
        print("blocked; calls in progress are being ended" if created else "already blocked")
    tool.out(render_block(tool.blocklist, entry))


async def block_list(tool: Tool, a: argparse.Namespace) -> None:
    rows = [render_block(tool.blocklist, e) for e in await tool.blocklist.find(None, 100_000)]
    tool.out(rows, rows, ["id", "number", "reason", "created_at", "expires_at"])


async def block_remove(tool: Tool, a: argparse.Namespace) -> None:
    tool.out(render_block(tool.blocklist, await tool.blocklist.remove(_session_arg(a.entry, "blocklist entry"))))


def render_token(row: TokenRow) -> dict[str, Any]:
    """A token as the tool shows it: never its secret, nor the secret's hash (`starts` is the
    public beginning of the secret, to tell which one a leaked secret is)."""
    state = "revoked" if row.revoked_at else "expired" if row.expired else "active"
    return {"name": row.name, "state": state, "scopes": row.scopes, "starts": f"{PREFIX}{row.key_id}_",
            "rate_per_second": row.rate_per_second, "created_at": row.created_at, "expires_at": row.expires_at,
            "revoked_at": row.revoked_at, "last_used_at": row.last_used_at}


def _expiry(raw: str | None) -> datetime | None:
    """--expires: a number of days (90d) or an ISO 8601 date or time (UTC unless it says)."""
    if raw is None:
        return None
    now = datetime.now(UTC)
    if raw.endswith("d") and raw[:-1].isdigit():
        when = now + timedelta(days=int(raw[:-1]))
    else:
        try:
            when = datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidInput(f"--expires {raw[:40]!r} is neither a number of days (90d) nor an ISO 8601 date "
                               "or time", field="expires") from None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when <= now:
        raise InvalidInput("--expires must be in the future", field="expires")
    return when


async def token_add(tool: Tool, a: argparse.Namespace) -> None:
    row, secret = await tool.tokens.add(a.name, a.scope, _expiry(a.expires), a.rate)
    data = {**render_token(row), "secret": secret}
    if tool.as_json:
        tool.out(data)
        return
    # The secret goes to standard output only, once: it is never logged, nor kept.
    print(f"token {row.name} added, scopes {', '.join(row.scopes)}"
          + (f", expires {_cell(row.expires_at)}" if row.expires_at else ""))
    print("its secret, shown this once (keep it in your secret store; only its hash is kept here):")
    print(secret)


async def token_list(tool: Tool, a: argparse.Namespace) -> None:
    rows = [render_token(r) for r in await tool.tokens.find()]
    table = [{**r, "scopes": ",".join(r["scopes"])} for r in rows]
    tool.out(rows, table, ["name", "state", "scopes", "starts", "created_at", "expires_at", "revoked_at",
                           "last_used_at"])


async def token_revoke(tool: Tool, a: argparse.Namespace) -> None:
    row = render_token(await tool.tokens.revoke(a.name))
    if not tool.as_json:
        print(f"token {a.name} revoked: every bridge refuses it from its next request")
    tool.out(row, [{**row, "scopes": ",".join(row["scopes"])}], ["name", "state", "scopes", "revoked_at"])


COMMANDS: dict[tuple[str, str | None], Callable[[Tool, argparse.Namespace], Awaitable[None]]] = {
    ("pool", "import"): pool_import,
    ("pool", "list"): pool_list,
    ("pool", "retire"): pool_retire,
    ("pool", "set-mode"): pool_set_mode,
    ("pool", "usage"): pool_usage,
    ("session", "open"): session_open,
    ("session", "show"): session_show,
    ("session", "list"): session_list,
    ("session", "extend"): session_extend,
    ("session", "reassign"): session_reassign,
    ("session", "close"): session_close,
    ("calls", None): order_calls,
    ("housekeeping", None): housekeeping,
    ("block", "add"): block_add,
    ("block", "list"): block_list,
    ("block", "remove"): block_remove,
    ("token", "add"): token_add,
    ("token", "list"): token_list,
    ("token", "revoke"): token_revoke,
}


async def keys_status(keys: NumberKeys, as_json: bool) -> None:
    status = await keys.status()
    if as_json:
        print(json.dumps(status, default=str, indent=2))
        return
    for key, value in status.items():
        print(f"{key:22} {'-' if value is None else value}")


async def keys_rewrap(keys: NumberKeys, as_json: bool) -> None:
    """Every key wrapped anew by the newest master key version configured here, which becomes
    the active one (docs/production.md, "Rotating the master key")."""
    await keys.check_versions()
    done = await keys.rewrap()
    result = {"active_version": done.active_version, "previous_version": done.previous_version,
              "keys_rewrapped": done.keys_rewrapped}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"master key version {done.active_version} is active (was {done.previous_version}); "
              f"{done.keys_rewrapped} keys rewrapped")


KEY_COMMANDS: dict[str, Callable[[NumberKeys, bool], Awaitable[None]]] = {
    "status": keys_status,
    "rewrap": keys_rewrap,
}


def _whole(low: int, high: int, unit: str) -> Callable[[str], int]:
    """An argument that is a whole number from `low` to `high` (argparse refuses anything else
    with exit status 2, before anything runs)."""
    def parse(raw: str) -> int:
        if not raw.isascii() or not raw.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"not a whole number of {unit}: {raw[:40]!r}")
        value = int(raw)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high} {unit}, not {value}")
        return value
    return parse


# A number of days for a retention cut-off: 0 or less would delete everything, today's included.
_days = _whole(1, 3650, "days")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskbridge-admin", description="Pool numbers and order sessions.")
    p.add_argument("--json", action="store_true", help="print JSON, as the HTTP API answers")
    groups = p.add_subparsers(dest="group", required=True)

    pool = groups.add_parser("pool", help="pool numbers").add_subparsers(dest="action", required=True)
    imp = pool.add_parser("import", help="import numbers from a CSV file (number[,region[,language[,mode]]] per "
                          "line; - for stdin)")
    imp.add_argument("file")
    imp.add_argument("--region", help="region for lines that give none")
    lst = pool.add_parser("list", help="pool numbers with their load")
    lst.add_argument("--region")
    lst.add_argument("--state", choices=["active", "cooling", "retired"])
    ret = pool.add_parser("retire", help="stop handing numbers out (they cool, then retire)")
    ret.add_argument("numbers", nargs="+")
    sm = pool.add_parser("set-mode", help="direct (routed by the caller) or order_code (shared, callers key a code)")
    sm.add_argument("number")
    sm.add_argument("mode", choices=["direct", "order_code"])
    pool.add_parser("usage", help="utilisation per region")

    ses = groups.add_parser("session", help="order sessions").add_subparsers(dest="action", required=True)
    op = ses.add_parser("open", help="open (or return) the session of an order")
    op.add_argument("order")
    op.add_argument("courier")
    op.add_argument("client")
    op.add_argument("--region")
    op.add_argument("--ttl", type=int)
    op.add_argument("--idle", type=int)
    op.add_argument("--grace", type=int)
    for name in Terms.names():  # every session term, written as its MB_ setting is
        term, flag = Terms.term(name), bool in get_args(Terms.model_fields[name].annotation)
        op.add_argument(f"--{name.replace('_', '-')}", dest=name, nargs="?" if flag else None,
                        const="yes" if flag else None, metavar="yes|no" if flag else "VALUE",
                        help=f"as {term.env}: {term.summary}")
    op.add_argument("--mode", choices=["direct", "order_code"])
    op.add_argument("--order-code", dest="order_code", help="the order's own code (mode order_code)")
    show = ses.add_parser("show", help="a session, its participants and its history")
    show.add_argument("session", nargs="?")
    show.add_argument("--order", help="the latest session of this order")
    sl = ses.add_parser("list", help="sessions, newest first")
    sl.add_argument("--order")
    sl.add_argument("--status", choices=["open", "grace", "closed"])
    sl.add_argument("--limit", type=_whole(1, MAX_PAGE, "sessions"), default=50)
    ex = ses.add_parser("extend", help="move the expiry (seconds from now) or the inactivity timeout")
    ex.add_argument("session")
    ex.add_argument("--ttl", type=int)
    ex.add_argument("--idle", type=int)
    ra = ses.add_parser("reassign", help="give the order to another courier")
    ra.add_argument("session")
    ra.add_argument("courier")
    cl = ses.add_parser("close", help="close a session (with --grace, the client can reach support a while)")
    cl.add_argument("session")
    cl.add_argument("--grace", type=int)

    calls = groups.add_parser("calls", help="the calls of an order")
    calls.add_argument("order")
    groups.add_parser("migrate", help="apply the database migrations the bridge would apply at start")
    keys = groups.add_parser("keys", help="the keys that seal real numbers").add_subparsers(dest="action",
                                                                                           required=True)
    keys.add_parser("status", help="the active master key version, the data keys and the versions wrapping them")
    keys.add_parser("rewrap", help="make the newest configured master key version active and rewrap every key "
                    "with it (no number is re-sealed; the bridges keep running)")
    blk = groups.add_parser("block", help="the blocklist").add_subparsers(dest="action", required=True)
    ba = blk.add_parser("add", help="block a real number everywhere; its calls in progress end at once")
    ba.add_argument("number", help='the number, or "-" to read it from standard input')
    ba.add_argument("--reason")
    ba.add_argument("--ttl", type=int, help="seconds until the block ends by itself (default: until removed)")
    blk.add_parser("list", help="blocked numbers (masked)")
    br = blk.add_parser("remove", help="unblock")
    br.add_argument("entry", help="the entry's id, from block list")
    tok = groups.add_parser("token", help="API tokens with scopes").add_subparsers(dest="action", required=True)
    ta = tok.add_parser("add", help="add a named token; its secret is printed once")
    ta.add_argument("name", help="a-z, 0-9, '.', '_', '-' (never reused: the audits name tokens by it)")
    ta.add_argument("--scope", action="append", required=True,
                    help=f"repeat, or separate with commas; 'all' for every one: {', '.join(SCOPES)}")
    ta.add_argument("--expires", help="when it stops working: a number of days (90d) or an ISO 8601 date or time")
    ta.add_argument("--rate", type=float, help="its own rate limit, requests a second (default MB_API_RATE)")
    tok.add_parser("list", help="the tokens (never their secrets)")
    tr = tok.add_parser("revoke", help="revoke a token: refused at once by every bridge")
    tr.add_argument("name")
    hk = groups.add_parser("housekeeping", help="expire sessions, end cool-offs; --purge runs the retention job")
    hk.add_argument("--purge", action="store_true")
    hk.add_argument("--older-than", type=_days, dest="older_than",
                    help="days, at least 1 (default MB_RETENTION_DAYS)")
    hk.add_argument("--recordings", action="store_true",
                    help="delete recordings past their retention, through ARI (needs MB_ARI_URL/USER/PASSWORD)")
    hk.add_argument("--recordings-older-than", type=_days, dest="recordings_older_than",
                    help="days, at least 1 (default MB_RECORDING_RETENTION_DAYS)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env(services=False)
    except ConfigError as exc:
        print(f"maskbridge-admin: {exc}", file=sys.stderr)
        return 2
    logs.configure("warning", stream=sys.stderr)
    try:
        return asyncio.run(_run(args, settings))
    except ServiceError as exc:
        print(f"maskbridge-admin: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (OSError, VaultError) as exc:
        print(f"maskbridge-admin: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
