#!/bin/bash
# Renders kamailio.cfg from its template (MB_KAM_* settings) and the dispatcher list of the
# nodes, then runs Kamailio in the foreground, logging to stderr (docker's log).
#   MB_KAM_ADDRESS, MB_KAM_PORT          where Kamailio listens (the carrier's peer)
#   MB_KAM_CARRIER_IP, MB_KAM_CARRIER_PORT  the carrier: the only source of calls in
#   MB_KAM_NODES                          the nodes: "node-1=10.0.0.11:5060 node-2=10.0.0.12:5060"
set -euo pipefail

die() {
    echo "docker-entrypoint: $*" >&2
    exit 2
}

run=/run/kamailio
export MB_KAM_RUN_DIR=$run
export MB_KAM_DISPATCHER_LIST=$run/dispatcher.list
export MB_KAM_FR_TIMER=${MB_KAM_FR_TIMER:-2000}
export MB_KAM_PING_INTERVAL=${MB_KAM_PING_INTERVAL:-2}
export MB_KAM_DEBUG=${MB_KAM_DEBUG:-2}
export MB_KAM_CHILDREN=${MB_KAM_CHILDREN:-8}
export MB_KAM_PORT=${MB_KAM_PORT:-5060}
export MB_KAM_CARRIER_PORT=${MB_KAM_CARRIER_PORT:-5060}
for name in MB_KAM_ADDRESS MB_KAM_CARRIER_IP MB_KAM_NODES; do
    [ -n "${!name:-}" ] || die "$name is not set"
done

: >"$MB_KAM_DISPATCHER_LIST"
for node in $MB_KAM_NODES; do
    id=${node%%=*}
    address=${node#*=}
    [[ "$id" =~ ^[A-Za-z0-9_-]+$ && "$address" =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] \
        || die "MB_KAM_NODES: \"$node\" is not <node id>=<host>:<port>"
    echo "1 sip:$address 0 0 node=$id" >>"$MB_KAM_DISPATCHER_LIST"
done

shell_format=$(env | grep -oE '^MB_KAM_[A-Z0-9_]+=' | sed -E 's/^(.*)=$/${\1}/' | tr '\n' ' ')
envsubst "$shell_format" </usr/share/maskbridge/kamailio.cfg.template >"$run/kamailio.cfg"
if grep -qE '\$\{MB_[A-Z0-9_]+\}' "$run/kamailio.cfg"; then
    die "unrendered \${MB_...} names left in kamailio.cfg"
fi
exec kamailio -DD -E -f "$run/kamailio.cfg"
