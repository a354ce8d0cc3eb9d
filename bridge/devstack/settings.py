"""Every setting of the local stack, from the environment with defaults, plus generated secrets."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bridge.terms import Terms

PROJECT_DIR = Path(__file__).resolve().parents[2]

# name -> (default, meaning). The README's settings table is generated from this list.
DEFAULTS: dict[str, tuple[str, str]] = {
    "MB_ROOTFS": ("/var/lib/maskbridge/rootfs", "Debian forky root file system holding Asterisk 22 (shared by clones)"),
    "MB_STACK_DIR": (str(PROJECT_DIR / ".stack"), "where the local stack keeps its state, logs and secrets"),
    "MB_PBX_SIP_BIND": ("127.0.0.1", "address of the PBX (SIP and RTP)"),
    "MB_PBX_SIP_PORT": ("5060", "SIP port of the PBX"),
    "MB_PBX_SIP_DEBUG": ("no", "log every SIP message in the PBX (yes/no)"),
    "MB_PBX_MAX_CALLS": ("600", "calls from the trunk a PBX holds at once; beyond, a new one is refused with SIP 503 "
                         "before anything is played (behind Kamailio: tried on the next node; 0: no limit)"),
    "MB_ARI_BIND": ("127.0.0.1", "address of the PBX's ARI/HTTP server"),
    "MB_ARI_PORT": ("8088", "port of the PBX's ARI/HTTP server"),
    "MB_ARI_APP": ("maskbridge", "name of the bridge's Stasis application"),
    "MB_ARI_USER": ("maskbridge", "ARI user of the bridge"),
    "MB_RTP_START": ("20000", "first RTP port of the PBX"),
    "MB_RTP_END": ("24999", "last RTP port of the PBX"),
    "MB_TRUNK_HOST": ("127.0.0.2", "the carrier trunk's address (the simulated carrier binds it)"),
    "MB_TRUNK_MEDIA": ("", "the carrier's media addresses or networks (comma-separated; empty: MB_TRUNK_HOST): the "
                       "only sources the PBX's RTP ports take UDP from (asterisk-config/media-guard.sh)"),
    "MB_TRUNK_PORT": ("5060", "the carrier trunk's SIP port"),
    "MB_TRUNK_SEND_PAI": ("no", "trunk endpoint send_pai"),
    "MB_TRUNK_SEND_RPID": ("no", "trunk endpoint send_rpid"),
    "MB_TRUNK_TRUST_ID_OUTBOUND": ("no", "trunk endpoint trust_id_outbound"),
    "MB_TRUNK_SEND_CONNECTED_LINE": ("yes", "trunk endpoint send_connected_line"),
    "MB_RELAY_PORT": ("5070", "port of the tests' hostile network relay, on MB_TRUNK_HOST (facing the PBX) and "
                      "MB_PBX_SIP_BIND (facing the carrier)"),
    "MB_BENCH_SIP_PORT": ("5080", "port of the benchmark's SIPp phones on MB_TRUNK_HOST: the called side (the PBX's "
                          "trunk points there while make bench runs), the calling side on the next port"),
    "MB_BENCH_RTP_PORT": ("40000", "first media port of the benchmark's SIPp phones on MB_TRUNK_HOST (the caller "
                          "uses it and the next three, the callee the four from the tenth on)"),
    "MB_CARRIER_ARI_PORT": ("8088", "port of the simulated carrier's ARI (on MB_TRUNK_HOST)"),
    "MB_CARRIER_APP": ("phones", "Stasis application of the simulated carrier"),
    "MB_CARRIER_RTP_START": ("25000", "first RTP port of the simulated carrier"),
    "MB_CARRIER_RTP_END": ("29999", "last RTP port of the simulated carrier"),
    "MB_PG_PORT": ("55432", "port of the local Postgres (on 127.0.0.1)"),
    "MB_API_BIND": ("127.0.0.1", "address of the bridge's HTTP API"),
    "MB_API_PORT": ("8080", "port of the bridge's HTTP API"),
    "MB_PROMETHEUS_BIND": ("127.0.0.1", "address of Prometheus (make monitor; docker compose --profile monitoring)"),
    "MB_PROMETHEUS_PORT": ("9090", "port of Prometheus"),
    "MB_SCRAPE_INTERVAL": ("15s", "how often Prometheus scrapes the bridge and the PBX"),
    "MB_DEFAULT_REGION": ("RU", "region for national-form numbers"),
    "MB_RING_TIMEOUT": ("30", "seconds the other phone may ring before the caller hears no answer"),
    "MB_LOG_LEVEL": ("info", "bridge log level"),
    "MB_SESSION_TTL": ("86400", "seconds a session lives when the order system gives no ttl_seconds"),
    "MB_GRACE_PERIOD": ("0", "default grace period (seconds) after close, when the client can still reach support"),
    "MB_SUPPORT_NUMBER": ("+74951230000", "support's number, reached by clients during a grace period"),
    "MB_ALLOWED_DESTINATIONS": ("mobile,geographic", "the number ranges the bridge may dial: participants' numbers and "
                                "the support number (E.164 prefixes, or kinds of a region: RU:mobile)"),
    "MB_PAIR_COOLOFF": ("86400", "seconds a (real number, pool number) pair stays reserved after its session"),
    "MB_NUMBER_COOLING": ("604800", "seconds a retired pool number cools before it is retired for good"),
    "MB_RETENTION_DAYS": ("30", "days after which the real numbers of ended sessions are deleted"),
    "MB_SWEEP_INTERVAL": ("30", "seconds between two runs of session housekeeping"),
    "MB_CALL_WARNING": ("30", "seconds before the maximum duration at which both parties hear a warning tone"),
    "MB_CONFIRM_TIMEOUT": ("6", "seconds the called phone has to press 1 after each prompt (confirm_answer)"),
    "MB_DEFAULT_LANGUAGE": ("en", "language of announcements for pool numbers without one (en, ru)"),
    "MB_WEBHOOK_URL": ("", "where the order system receives signed call webhooks (empty: none)"),
    "MB_BLOCK_KEYS": ("*9", "keys the client presses during a call (or while calling back) to block the other party "
                      "for the order"),
    "MB_RECORDING_RETENTION_DAYS": ("30", "days after a call's end at which its recording is deleted (1 to 3650)"),
    "MB_WEBHOOK_RETENTION_DAYS": ("7", "days after which delivered and given-up webhook events are deleted "
                                  "(1 to 3650)"),
    "MB_ORDER_CODE_LENGTH": ("6", "digits of an order code (4 to 12)"),
    "MB_ORDER_CODE_ATTEMPTS": ("3", "wrong order codes per call, and per caller and number within "
                               "MB_ORDER_CODE_LOCKOUT, before a lockout"),
    "MB_ORDER_CODE_LOCKOUT": ("900", "seconds a caller's wrong order codes on a number count towards the lockout"),
    "MB_API_RATE": ("1000", "requests a second each API token may make per bridge process, after MB_API_BURST "
                    "(0: no limit)"),
    "MB_API_BURST": ("500", "requests an API token may make at once before MB_API_RATE applies"),
    "MB_UNKNOWN_CALLER_LIMIT": ("10", "unknown callers announced per pool number per minute; beyond, they are hung "
                                "up unanswered (SIP 403; 0: no limit)"),
    "MB_UNKNOWN_CALLER_TOTAL": ("100", "unknown callers announced per minute in all, per bridge process; beyond, as "
                                "above (0: no limit)"),
    "MB_API_CONFLICT_RATE": ("10", "conflicts a minute each API token may cause per bridge process, after "
                             "MB_API_CONFLICT_BURST (0: no limit)"),
    "MB_API_CONFLICT_BURST": ("20", "conflicts an API token may cause at once before MB_API_CONFLICT_RATE applies"),
    "MB_API_ADDRESS_RATE": ("20", "requests a second each remote address may make without a valid token, per bridge "
                            "process, after MB_API_ADDRESS_BURST (0: no limit)"),
    "MB_API_ADDRESS_BURST": ("40", "requests without a valid token a remote address may make at once"),
    "MB_API_DB_CONNECTIONS": ("2", "database connections of the HTTP API, per bridge process (calls have their own)"),
    "MB_NODES": ("1", "nodes of the local stack (make run NODES=2): above 1, Kamailio takes the carrier's calls on "
                 "MB_PBX_SIP_BIND and spreads them over that many PBX nodes, each with its bridge"),
    "MB_NODE_NET": ("127.0.1", "with MB_NODES above 1, node i's PBX, ARI (and bridge API, but node 1's) are on "
                    "<MB_NODE_NET>.i"),
    "MB_NODE_ID": ("node-1", "the node id of the stack's bridge (every call row names it)"),
    "MB_NODE_TIMEOUT": ("15", "seconds of silence after which the other nodes give a node up (its calls: node_lost)"),
}

# The session terms' defaults (bridge/terms.py defines each, with its setting).
DEFAULTS.update({Terms.term(n).env: (Terms.term(n).env_default, Terms.term(n).summary) for n in Terms.names()})

SECRET_NAMES = (
    "MB_ARI_PASSWORD", "MB_CARRIER_ARI_PASSWORD", "MB_API_TOKEN", "MB_DB_PASSWORD", "MB_NUMBER_KEY",
    "MB_WEBHOOK_SECRET", "MB_RECORDING_TOKEN",
)


SESSION_SETTINGS = (
    "MB_SESSION_TTL", "MB_GRACE_PERIOD", "MB_SUPPORT_NUMBER", "MB_ALLOWED_DESTINATIONS", "MB_PAIR_COOLOFF",
    "MB_NUMBER_COOLING",
    "MB_RETENTION_DAYS", "MB_SWEEP_INTERVAL", "MB_CALL_WARNING", "MB_CONFIRM_TIMEOUT", "MB_BLOCK_KEYS",
    "MB_WEBHOOK_URL", "MB_WEBHOOK_SECRET",
    "MB_DEFAULT_LANGUAGE", "MB_RECORDING_TOKEN", "MB_RECORDING_RETENTION_DAYS", "MB_WEBHOOK_RETENTION_DAYS",
    "MB_ORDER_CODE_LENGTH", "MB_ORDER_CODE_ATTEMPTS", "MB_ORDER_CODE_LOCKOUT",
    "MB_UNKNOWN_CALLER_LIMIT", "MB_UNKNOWN_CALLER_TOTAL",
    *(Terms.term(n).env for n in Terms.names()),
)


@dataclass(frozen=True)
class Stack:
    """Resolved settings and paths of one local stack."""

    env: dict[str, str]

    @property
    def size(self) -> int:
        """How many nodes (an Asterisk and its bridge each) the stack runs."""
        return int(self.env["MB_NODES"])

    @property
    def nodes(self) -> list["Stack"]:
        """The stack of each node: this one itself when it has one node; with more, each
        node's PBX, ARI and bridge on addresses of its own (MB_NODE_NET.i), its own RTP
        ports (a share of MB_RTP_START-MB_RTP_END) and its own state, behind Kamailio (on
        this stack's MB_PBX_SIP_BIND, which the carrier calls) and sharing its Postgres."""
        if self.size <= 1:
            return [self]
        return [self.node(i) for i in range(1, self.size + 1)]

    def node(self, i: int) -> "Stack":
        e = self.env
        address = f"{e['MB_NODE_NET']}.{i}"
        first, last = int(e["MB_RTP_START"]), int(e["MB_RTP_END"])
        share = (last - first + 1) // self.size
        return Stack(env={
            **e,
            "MB_STACK_DIR": str(self.dir / "nodes" / f"node-{i}"),
            "MB_NODE_ID": f"node-{i}",
            "MB_NODES": "1",
            "MB_PBX_SIP_BIND": address,
            "MB_ARI_BIND": address,
            # (node 1's API stays where the single-node stack has it: make call, make admin)
            "MB_API_BIND": e["MB_API_BIND"] if i == 1 else address,
            "MB_RTP_START": str(first + (i - 1) * share),
            "MB_RTP_END": str(first + i * share - 1),
            # Each node's trunk is Kamailio: calls come in from it, and go out through it.
            "MB_TRUNK_HOST": e["MB_PBX_SIP_BIND"],
            "MB_TRUNK_PORT": e["MB_PBX_SIP_PORT"],
            "MB_SYSTEMNAME": f"node-{i}",
            "MB_ENTITYID": f"02:00:00:00:00:{i:02x}",
        })

    @property
    def rootfs(self) -> Path:
        return Path(self.env["MB_ROOTFS"])

    @property
    def dir(self) -> Path:
        return Path(self.env["MB_STACK_DIR"])

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def pg_dir(self) -> Path:
        return Path(self.env["MB_PG_DIR"])

    @property
    def database_url(self) -> str:
        return self.env["MB_DATABASE_URL"]

    def ast_dir(self, instance: str) -> str:
        """Directory of an Asterisk instance, as seen inside the root file system."""
        return f"/srv/maskbridge/{self.instance_tag}/{instance}"

    @property
    def instance_tag(self) -> str:
        return _tag(self.dir)

    def bridge_env(self) -> dict[str, str]:
        """The environment the bridge process runs with."""
        e = self.env
        return {
            "MB_DATABASE_URL": e["MB_DATABASE_URL"],
            "MB_ARI_URL": f"http://{e['MB_ARI_BIND']}:{e['MB_ARI_PORT']}",
            "MB_ARI_USER": e["MB_ARI_USER"],
            "MB_ARI_PASSWORD": e["MB_ARI_PASSWORD"],
            "MB_ARI_APP": e["MB_ARI_APP"],
            "MB_API_BIND": e["MB_API_BIND"],
            "MB_API_PORT": e["MB_API_PORT"],
            "MB_API_TOKEN": e["MB_API_TOKEN"],
            "MB_API_RATE": e["MB_API_RATE"],
            "MB_API_BURST": e["MB_API_BURST"],
            "MB_API_CONFLICT_RATE": e["MB_API_CONFLICT_RATE"],
            "MB_API_CONFLICT_BURST": e["MB_API_CONFLICT_BURST"],
            "MB_API_ADDRESS_RATE": e["MB_API_ADDRESS_RATE"],
            "MB_API_ADDRESS_BURST": e["MB_API_ADDRESS_BURST"],
            "MB_API_DB_CONNECTIONS": e["MB_API_DB_CONNECTIONS"],
            "MB_DEFAULT_REGION": e["MB_DEFAULT_REGION"],
            "MB_RING_TIMEOUT": e["MB_RING_TIMEOUT"],
            "MB_LOG_LEVEL": e["MB_LOG_LEVEL"],
            "MB_NUMBER_KEY": e["MB_NUMBER_KEY"],
            "MB_NODE_ID": e["MB_NODE_ID"],
            "MB_NODE_TIMEOUT": e["MB_NODE_TIMEOUT"],
            "MB_NODE_SIP_ADDRESS": f"{e['MB_PBX_SIP_BIND']}:{e['MB_PBX_SIP_PORT']}",
            "MB_NODE_API_URL": f"http://{e['MB_API_BIND']}:{e['MB_API_PORT']}",
            **{name: e[name] for name in SESSION_SETTINGS},
        }


def _tag(stack_dir: Path) -> str:
    """A short name for one checkout's stack, for what it keeps outside the checkout."""
    return hashlib.sha1(str(stack_dir).encode()).hexdigest()[:8]


def _pg_dir(stack_dir: Path) -> Path:
    """Postgres refuses to run as root, and its own user must reach the data directory.

    The cluster lives in the project's stack directory when the postgres user can reach
    it; a checkout under a private home directory (e.g. /root) falls back to a directory
    of its own under /var/lib/maskbridge.
    """
    local = stack_dir / "pg"
    probe = subprocess.run(
        ["runuser", "-u", "postgres", "--", "test", "-x", str(stack_dir.parent)],
        capture_output=True,
    )
    if probe.returncode == 0:
        return local
    return Path("/var/lib/maskbridge/pg") / _tag(stack_dir)


def _load_secrets(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                values[k.strip()] = v.strip()
    missing = [n for n in SECRET_NAMES if n not in values]
    if missing:
        for name in missing:
            values[name] = secrets.token_urlsafe(24)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "# Generated by bridge/devstack at setup; never commit.\n"
            + "".join(f"{k}={values[k]}\n" for k in SECRET_NAMES)
        )
        path.chmod(0o600)
    return values


def load(environ: Mapping[str, str] | None = None) -> Stack:
    """Settings from the environment (or `environ`) over the defaults, plus the stack's
    generated secrets."""
    source = os.environ if environ is None else environ
    env = {name: source.get(name, default) for name, (default, _) in DEFAULTS.items()}
    stack_dir = Path(env["MB_STACK_DIR"])
    env.update(_load_secrets(stack_dir / "secrets.env"))
    for name in SECRET_NAMES:
        if source.get(name):
            env[name] = source[name]
    env["MB_PG_DIR"] = source.get("MB_PG_DIR") or str(_pg_dir(stack_dir))
    env["MB_SYSTEMNAME"] = env["MB_NODE_ID"]
    env["MB_ENTITYID"] = "02:00:00:00:00:01"
    if not env["MB_PBX_MAX_CALLS"].isascii() or not env["MB_PBX_MAX_CALLS"].isdigit():
        raise ValueError("MB_PBX_MAX_CALLS must be a whole number of calls (0: no limit)")
    if not env["MB_NODES"].isdigit() or not 1 <= int(env["MB_NODES"]) <= 9:
        raise ValueError("MB_NODES (make NODES=...) must be a number of nodes from 1 to 9")
    env["MB_DATABASE_URL"] = source.get("MB_DATABASE_URL") or (
        f"postgresql://maskbridge:{env['MB_DB_PASSWORD']}@127.0.0.1:{env['MB_PG_PORT']}/maskbridge"
    )
    return Stack(env=env)
