"""`python -m bridge.devstack COMMAND`: the local stack behind the Makefile targets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime

import asyncpg

from bridge import logs
from bridge.devstack import asterisk, carrier, demo, kamailio, media_guard, monitoring, ports, postgres, processes
from bridge.devstack.settings import Stack, load
from bridge.phone import InvalidNumber, mask, normalize


CAUSES = {
    16: "normal clearing",
    17: "user busy",
    18: "no user responding",
    19: "no answer",
    21: "call rejected",
    34: "no circuit available",
}


def start_services(stack: Stack) -> str:
    """Postgres, the PBX (or, with MB_NODES above 1, Kamailio and every node's PBX) and the
    simulated carrier, migrated and with demo data."""
    ports.reserve(stack.env)  # before anything listens: see bridge/devstack/ports.py
    asterisk.ensure_rootfs(stack)
    postgres.start(stack)
    pool_number = asyncio.run(demo.load(stack.database_url, stack.env["MB_NUMBER_KEY"]))
    _record_size(stack)
    media_guard.apply(stack)  # before the PBX has a port open
    for node in stack.nodes:
        asterisk.start(node, "pbx")
    if stack.size > 1:
        kamailio.start(stack)
    asterisk.start(stack, "carrier")
    return pool_number


def start_bridges(stack: Stack) -> None:
    for node in stack.nodes:
        processes.start_bridge(node)


def _record_size(stack: Stack) -> None:
    """How many nodes were started: `make stop` stops them all, whatever MB_NODES says then."""
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    (stack.run_dir / "nodes").write_text(str(max(stack.size, _recorded_size(stack))))


def _recorded_size(stack: Stack) -> int:
    try:
        return int((stack.run_dir / "nodes").read_text())
    except (FileNotFoundError, ValueError):
        return 1


def stop_all(stack: Stack) -> None:
    size = max(stack.size, _recorded_size(stack))
    nodes = [stack] if size <= 1 else [stack.node(i) for i in range(1, size + 1)]
    for node in nodes:
        processes.stop_bridge(node)
    kamailio.stop(stack)
    for node in nodes:
        asterisk.stop(node, "pbx")
    if size > 1:
        processes.stop_bridge(stack)
        asterisk.stop(stack, "pbx")  # (a one-node stack's, had one run before)
    asterisk.stop(stack, "carrier")
    # (The media guard stays: another checkout's PBX may use the same range.)
    postgres.stop(stack)
    monitoring.stop_prometheus(stack.dir / "prometheus")  # (a `make monitor` whose command was killed)
    (stack.run_dir / "nodes").unlink(missing_ok=True)


def status(stack: Stack) -> None:
    print(f"postgres: {'up' if postgres.is_running(stack) else 'down'}")
    if stack.size > 1:
        seen = kamailio.node_states(stack)
        print(f"kamailio: {'up' if kamailio.is_running(stack) else 'down'} "
              f"({stack.env['MB_PBX_SIP_BIND']}:{stack.env['MB_PBX_SIP_PORT']}, the carrier's peer)")
        for node in stack.nodes:
            uri = f"sip:{node.env['MB_PBX_SIP_BIND']}:{node.env['MB_PBX_SIP_PORT']}"
            print(f"{node.env['MB_NODE_ID']}: asterisk {'up' if asterisk.is_running(node, 'pbx') else 'down'} "
                  f"({uri}), bridge {processes.health(node) or 'down'}, kamailio sees it {seen.get(uri, 'unknown')}")
    else:
        print(f"asterisk pbx: {'up' if asterisk.is_running(stack, 'pbx') else 'down'}")
        print(f"bridge: {processes.health(stack) or 'down'}")
    print(f"asterisk carrier: {'up' if asterisk.is_running(stack, 'carrier') else 'down'}")


def hint(stack: Stack, pool_number: str) -> str:
    api = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}"
    return f"""
The stack is up.
  Demo order {demo.DEMO_ORDER}: courier {demo.DEMO_COURIER}, client {demo.DEMO_CLIENT}, pool number {pool_number}
  Try a masked call (the client's phone is shown only the pool number):
      make call FROM={demo.DEMO_COURIER} TO={pool_number}
      make call FROM={demo.DEMO_CLIENT} TO={pool_number}
      make call FROM=+79990000000 TO={pool_number}      # unknown caller: announcement
  The HTTP API ({api}), token in {stack.dir / 'secrets.env'} (MB_API_TOKEN):
      curl -H "Authorization: Bearer $MB_API_TOKEN" \\
           -d '{{"order_id":"42","courier_number":"+79161112233","client_number":"89163334455"}}' {api}/v1/sessions
  Sessions and pool numbers: make admin ARGS="session show --order {demo.DEMO_ORDER}"    make admin ARGS="pool usage"
  Logs: make logs    Asterisk console: make cli    Database: make psql    Stop: make stop
"""


@contextlib.contextmanager
def only_one(stack: Stack, what: str) -> Iterator[None]:
    """One `make run` or `make start` of a stack at a time: a second one, started while the
    first is starting or running, stops at once (exit 2) and touches nothing of the first."""
    stack.dir.mkdir(parents=True, exist_ok=True)
    with open(stack.dir / "stack.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            print(f"make {what}: another `make run` or `make start` of this stack ({stack.dir}) is starting or "
                  f"running (pid {holder}); `make stop` stops it", file=sys.stderr)
            raise SystemExit(2) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


class Stopped(Exception):
    """SIGTERM or SIGHUP reached `make run`: stop as Ctrl-C does."""


def _stop_on_signals() -> None:
    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    # make, which ran us, does not pass a SIGTERM on to its recipe: when make dies, Linux
    # sends us SIGTERM (PR_SET_PDEATHSIG), and the stack stops all the same.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not glibc Linux: SIGTERM must reach this process itself
    if os.getppid() == 1:
        raise Stopped("the parent process is gone")  # it died before prctl took effect


def run_foreground(stack: Stack) -> None:
    """The stack with the bridge in the foreground, until Ctrl-C, SIGTERM or SIGHUP (or the
    death of the `make` that ran it): then everything stops, the bridge first."""
    _stop_on_signals()
    proc: subprocess.Popen[bytes] | None = None
    try:
        pool_number = start_services(stack)
        first, *others = stack.nodes
        processes.stop_bridge(first)  # a background bridge from `make start` would hold the port
        for node in others:
            processes.start_bridge(node)  # (their logs: .stack/nodes/<node>/log/bridge.log)
        print(hint(stack, pool_number), flush=True)
        # (Its pid file, so that `make stop` finds it whatever happens to this process.)
        proc = subprocess.Popen(processes.bridge_command(), env={**os.environ, **first.bridge_env()})
        processes.record_bridge(first, proc.pid)
        proc.wait()
    except (KeyboardInterrupt, Stopped) as exc:
        print(f"\n{exc or 'interrupted'}", flush=True)
    finally:
        # No second signal may cut the stopping short.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        print("stopping the stack ...", flush=True)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_all(stack)


async def _node_of_call(stack: Stack, since: datetime, from_number: str, to_number: str) -> str | None:
    """The node that took the latest call from `from_number` to `to_number` since `since`."""
    region = stack.env["MB_DEFAULT_REGION"]
    try:
        caller, pool = normalize(from_number, region), normalize(to_number, region)
    except InvalidNumber:
        return None
    conn = await asyncpg.connect(stack.database_url)
    try:
        node: str | None = await conn.fetchval(
            """SELECT node FROM calls WHERE pool_number = $1 AND caller_masked = $2 AND started_at >= $3
               ORDER BY started_at DESC LIMIT 1""",
            pool, mask(caller), since,
        )
        return node
    finally:
        await conn.close()


async def _database_now(stack: Stack) -> datetime:
    conn = await asyncpg.connect(stack.database_url)
    try:
        now: datetime = await conn.fetchval("SELECT now()")
        return now
    finally:
        await conn.close()


async def place_call(stack: Stack, from_number: str, to_number: str, hangup_after: float, timeout: float) -> int:
    since = await _database_now(stack)
    async with carrier.Carrier(stack) as net:
        leg = await net.call(from_number, to_number, hangup_after=hangup_after)
        try:
            callee = await asyncio.wait_for(net.incoming.get(), timeout)
        except asyncio.TimeoutError:
            callee = None
        await asyncio.wait_for(leg.ended.wait(), timeout + hangup_after + 10)
        if callee is not None:
            await asyncio.wait_for(callee.ended.wait(), 10)
        print(f"caller {from_number} dialed {to_number}")
        if callee is None:
            print("  no phone rang: the PBX answered the caller itself (announcement)")
        else:
            name = f' (name "{callee.shown_name}")' if callee.shown_name else ""
            print(f"  rang phone:        {callee.number}")
            print(f"  caller ID shown:   {callee.shown_number}{name}")
            print(f"  answered:          {'yes' if callee.answered_at else 'no'}")
            if callee.duration is not None:
                print(f"  call lasted:       {callee.duration:.1f} s")
        hung_up_by = "caller" if leg.hung_up_itself else "callee" if callee and callee.hung_up_itself else "network"
        print(f"  hung up by:        {hung_up_by}")
        other = callee if hung_up_by == "caller" and callee else leg
        cause = other.cause
        print(f"  hangup cause:      {cause} ({CAUSES.get(cause or 0, 'other')}), as the {other.role} saw it")
    # (the line `node: <id>` says which node took the call)
    print(f"node: {await _node_of_call(stack, since, from_number, to_number) or 'none (no call row)'}")
    return 0


def monitor(stack: Stack) -> int:
    """Prometheus on the running stack (data under .stack/prometheus), in the foreground."""
    listen = f"{stack.env['MB_PROMETHEUS_BIND']}:{stack.env['MB_PROMETHEUS_PORT']}"
    running = monitoring.prometheus_of(stack.dir / "prometheus")
    if running:
        print(f"a Prometheus of this stack runs already (pid {min(running)}), on http://{listen}: "
              "`make stop` stops it with the stack", file=sys.stderr)
        return 2
    proc = monitoring.start_prometheus(stack, stack.dir / "prometheus")
    print(f"Prometheus on http://{listen} (alerts: http://{listen}/alerts), scraping the bridge and the PBX "
          f"every {stack.env['MB_SCRAPE_INTERVAL']}; its log: {stack.dir / 'prometheus' / 'prometheus.log'}\n"
          "Dashboard for Grafana: monitoring/grafana/maskbridge.json. Ctrl-C stops it.", flush=True)
    _stop_on_signals()
    try:
        return proc.wait()
    except (KeyboardInterrupt, Stopped):
        proc.terminate()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start the whole stack in the background")
    sub.add_parser("stop", help="stop everything")
    sub.add_parser("run", help="start the stack with the bridge in the foreground; Ctrl-C stops all")
    sub.add_parser("services", help="start Postgres and both Asterisks only (no bridge)")
    sub.add_parser("rootfs", help="build the Asterisk root file system if missing")
    sub.add_parser("status", help="what is running")
    sub.add_parser("env", help="print the bridge's environment (shell syntax)")
    call = sub.add_parser("call", help="place a call from the simulated carrier")
    call.add_argument("from_number")
    call.add_argument("to_number")
    call.add_argument("--hangup-after", type=float, default=6.0)
    call.add_argument("--timeout", type=float, default=20.0)
    sub.add_parser("cli", help="the PBX's Asterisk console")
    sub.add_parser("carrier-cli", help="the simulated carrier's Asterisk console")
    sub.add_parser("psql", help="psql on the bridge's database")
    sub.add_parser("logs", help="follow the bridge's log (every node's), in MB_STACK_DIR")
    sub.add_parser("monitor", help="Prometheus scraping the running stack, with the alert rules; Ctrl-C stops it")
    sub.add_parser("admin", help="maskbridge-admin against the local stack: admin <its arguments>")
    argv = sys.argv[1:] if argv is None else argv
    # Everything after `admin` is maskbridge-admin's, options included.
    args = parser.parse_args(argv[:1] if argv[:1] == ["admin"] else argv)
    admin_args = argv[1:]
    logs.configure("warning")
    stack = load()

    if args.command == "rootfs":
        asterisk.ensure_rootfs(stack)
    elif args.command == "services":
        with only_one(stack, "services"):
            start_services(stack)
    elif args.command == "start":
        with only_one(stack, "start"):
            pool_number = start_services(stack)
            start_bridges(stack)
        print(hint(stack, pool_number))
    elif args.command == "stop":
        stop_all(stack)
    elif args.command == "run":
        with only_one(stack, "run"):
            run_foreground(stack)
    elif args.command == "status":
        status(stack)
    elif args.command == "env":
        for k, v in stack.nodes[0].bridge_env().items():
            print(f"export {k}='{v}'")
    elif args.command == "call":
        return asyncio.run(place_call(stack, args.from_number, args.to_number, args.hangup_after, args.timeout))
    elif args.command == "logs":
        os.execvp("tail", ["tail", "-n", "50", "-F", *map(str, processes.bridge_logs(stack))])
    elif args.command in ("cli", "carrier-cli"):
        instance = "pbx" if args.command == "cli" else "carrier"
        # (with several nodes: NODE=<i> picks the node, node 1 by default)
        owner = stack.node(int(os.environ.get("MB_NODE", "1"))) if instance == "pbx" and stack.size > 1 else stack
        conf = f"{owner.ast_dir(instance)}/etc/asterisk.conf"
        os.execvp("chroot", ["chroot", str(stack.rootfs), "asterisk", "-C", conf, "-rvvv"])
    elif args.command == "admin":
        if not postgres.is_running(stack):
            postgres.start(stack)
        os.environ.update(stack.nodes[0].bridge_env())
        from bridge import cli

        return cli.main(admin_args)
    elif args.command == "monitor":
        return monitor(stack)
    elif args.command == "psql":
        os.execvp(postgres.psql_command(stack)[0], postgres.psql_command(stack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
