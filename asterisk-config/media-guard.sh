#!/bin/sh
# The PBX's media guard: its RTP port range (MB_RTP_START..MB_RTP_END, RTCP included) takes
# UDP only from the carrier's media networks (MB_TRUNK_MEDIA; default MB_TRUNK_HOST), in the
# host's firewall (iptables, nf_tables or legacy), for IPv4 and IPv6.
#
# Why: Asterisk takes a call leg's media from whoever sends it while the leg has no stream
# of its own yet (strict RTP's learning: a silent phone, a caller before the answer), and
# then locks the real phone out; and it answers a STUN request on an RTP port by sending the
# leg's audio to the requester when the leg has no destination (a call on hold). No setting
# of Asterisk's turns either off. Without this guard, anyone who can reach the RTP ports
# could speak into a call, press keys in it (the block keys, an order code), or hear a held
# party's voice (docs/production.md, "Media").
#
#   media-guard.sh apply    the rules, made again from the settings (safe to run twice)
#   media-guard.sh check    exit 0 when the rules in place are the settings' exactly
#   media-guard.sh remove   the rules, gone
#   media-guard.sh hold     apply, then stay until SIGTERM or SIGINT (the compose stack's
#                           media-guard service, whose health check is `check`). The rules
#                           stay when it stops: a stopped or crashed guard must not open the
#                           ports of a PBX that may still run. `remove` takes them away.
#
# Needs CAP_NET_ADMIN in the PBX's network namespace (root on the host; in docker-compose.yml
# the media-guard service). The chain is MB-MEDIA-<MB_RTP_START>, jumped to from INPUT for
# the range's UDP.
set -eu

action=${1:-}
start=${MB_RTP_START:?set MB_RTP_START}
end=${MB_RTP_END:?set MB_RTP_END}
nets=$(printf '%s' "${MB_TRUNK_MEDIA:-${MB_TRUNK_HOST:-}}" | tr ',' ' ')
chain="MB-MEDIA-$start"

case "$start$end" in *[!0-9]*) echo "media-guard: MB_RTP_START and MB_RTP_END must be port numbers" >&2; exit 2;; esac
[ "$start" -le "$end" ] || { echo "media-guard: MB_RTP_START ($start) is above MB_RTP_END ($end)" >&2; exit 2; }
[ -n "$nets" ] || { echo "media-guard: set MB_TRUNK_MEDIA (or MB_TRUNK_HOST): the carrier's media addresses" >&2; exit 2; }
for net in $nets; do
    case "$net" in
        *[!0-9a-fA-F.:/]*|"") echo "media-guard: '$net' in MB_TRUNK_MEDIA is not an address or network" >&2; exit 2;;
    esac
done

# The networks of one family (4: with dots, 6: with colons).
family_nets() {
    for net in $nets; do
        case "$net" in *:*) [ "$1" = 6 ] && echo "$net";; *) [ "$1" = 4 ] && echo "$net";; esac
    done
    return 0
}

# What the chain must hold, as `iptables -S` prints it.
wanted() {
    echo "-N $chain"
    for net in $(family_nets "$1"); do
        case "$net" in */*) ;; *:*) net="$net/128";; *) net="$net/32";; esac
        echo "-A $chain -s $net -j RETURN"
    done
    echo "-A $chain -j DROP"
}

apply() {
    tool=$1
    # One transaction: the chain (emptied and filled again) and the jump, or nothing.
    {
        echo "*filter"
        echo ":$chain - [0:0]"
        echo "-F $chain"
        wanted "$2" | sed 1d
        "$tool" -w -C INPUT -p udp --dport "$start:$end" -j "$chain" 2>/dev/null \
            || echo "-I INPUT 1 -p udp -m udp --dport $start:$end -j $chain"
        echo "COMMIT"
    } | "$tool-restore" -w --noflush
}

check() {
    "$1" -w -C INPUT -p udp --dport "$start:$end" -j "$chain" 2>/dev/null || {
        echo "media-guard: $1: INPUT does not send the RTP range's UDP to $chain" >&2; return 1; }
    have=$("$1" -w -S "$chain" 2>/dev/null) || { echo "media-guard: $1: no chain $chain" >&2; return 1; }
    # iptables prints networks in their canonical form; compare what it prints with what we want.
    if [ "$have" != "$(wanted "$2")" ]; then
        echo "media-guard: $1: $chain holds other rules than the settings':" >&2
        echo "$have" >&2
        return 1
    fi
}

remove() {
    while "$1" -w -D INPUT -p udp --dport "$start:$end" -j "$chain" 2>/dev/null; do :; done
    "$1" -w -F "$chain" 2>/dev/null || true
    "$1" -w -X "$chain" 2>/dev/null || true
}

# IPv6: where the host has it (a host without IPv6 cannot be reached over it either).
families="4"
if command -v ip6tables >/dev/null 2>&1 && ip6tables -w -S INPUT >/dev/null 2>&1; then
    families="4 6"
elif [ -n "$(family_nets 6)" ]; then
    echo "media-guard: MB_TRUNK_MEDIA has IPv6 networks but ip6tables does not work here" >&2; exit 1
fi
command -v iptables >/dev/null 2>&1 || { echo "media-guard: iptables is not installed (apt install iptables)" >&2; exit 1; }

if [ "$action" = hold ]; then
    sh "$0" apply
    trap 'kill $! 2>/dev/null; exit 0' TERM INT
    echo "media-guard: UDP to ports $start-$end only from: $nets"
    # A child to wait on: a trap runs as soon as `wait` is interrupted (not after a sleep).
    while :; do sleep 3600 & wait $! || true; done
fi

status=0
for family in $families; do
    tool=iptables; [ "$family" = 6 ] && tool=ip6tables
    case "$action" in
        apply) apply "$tool" "$family" || { echo "media-guard: $tool could not apply the rules" >&2; exit 1; };;
        check) check "$tool" "$family" || status=1;;
        remove) remove "$tool";;
        *) echo "usage: media-guard.sh apply|check|remove|hold" >&2; exit 2;;
    esac
done
exit $status
