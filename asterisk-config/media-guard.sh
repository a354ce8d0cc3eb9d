#!/bin/sh
# The PBX's media guard: its RTP port range (MB_RTP_START..MB_RTP_END, and MB_RTP_END + 1
# when it is even: the RTCP port of a call on it) takes UDP only from the carrier's media networks
# (MB_TRUNK_MEDIA; default MB_TRUNK_HOST), in the host's firewall (iptables, nf_tables or
# legacy), for IPv4 and IPv6.
#
# Why: Asterisk takes a call leg's media from whoever sends it while the leg has no stream
# of its own yet (strict RTP's learning: a silent phone, a caller before the answer), and
# then locks the real phone out; and it answers a STUN request on an RTP port by sending the
# leg's audio to the requester when the leg has no destination (a call on hold). No setting
# of Asterisk's turns either off. Without this guard, anyone who can reach the RTP ports
# could speak into a call, press keys in it (the block keys, an order code), or hear a held
# party's voice (docs/production.md, "Media").
#
#   media-guard.sh apply    the rules, made again from the settings, their jump first in
#                           INPUT (safe to run twice)
#   media-guard.sh check    exit 0 when the rules in place are the settings' exactly, nothing
#                           but other guards' jumps comes before their jump, and no other
#                           guard covers any of the same ports
#   media-guard.sh remove   this range's rules, gone (another range's are left alone)
#   media-guard.sh hold     apply, then check every 2 s and apply again when the rules
#                           drifted, until SIGTERM or SIGINT (the compose stack's media-guard
#                           service). The rules stay when it stops: a stopped or crashed guard
#                           must not open the ports of a PBX that may still run.
#
# Needs CAP_NET_ADMIN in the PBX's network namespace (root on the host; in docker-compose.yml
# the media-guard service). The chain is MB-MEDIA-<start>-<end>-<carrier> (<carrier>: 7 hex
# digits of the carrier networks' checksum), jumped to from INPUT for the range's UDP.
set -eu
set -f  # no globbing: a setting such as '*' is refused, not matched against file names

action=${1:-}
start=${MB_RTP_START:-}
end=${MB_RTP_END:-}
nets=$(printf '%s' "${MB_TRUNK_MEDIA:-${MB_TRUNK_HOST:-}}" | tr ',' ' ')

fail() { echo "media-guard: $*" >&2; exit 2; }

case "$action" in apply|check|remove|hold) ;; *) fail "usage: media-guard.sh apply|check|remove|hold";; esac

# The range as Asterisk takes it (res_rtp_asterisk.c): an odd start is rounded up, and a start
# not below the end makes it use 5000-31000 instead, which this guard would not cover: refused.
case "$start" in ""|*[!0-9]*|0*) fail "MB_RTP_START must be a port number, not '$start'";; esac
case "$end" in ""|*[!0-9]*|0*) fail "MB_RTP_END must be a port number, not '$end'";; esac
[ ${#start} -le 5 ] && [ ${#end} -le 5 ] || fail "MB_RTP_START and MB_RTP_END must be port numbers"
start=$((start + 0)); end=$((end + 0))
[ "$start" -ge 1024 ] || fail "MB_RTP_START ($start) is below 1024 (Asterisk would use 1024)"
[ "$end" -le 65534 ] || fail "MB_RTP_END ($end) is above 65534 (its RTCP port would be past 65535)"
[ $(((start + 1) / 2 * 2)) -lt "$end" ] ||
    fail "MB_RTP_START ($start) is not below MB_RTP_END ($end): Asterisk would use 5000-31000"
# RTP ports are even, each with its RTCP on the next: an even end's RTCP is end + 1.
last=$((end | 1))

# The carrier's networks, in the form iptables prints them back (check compares the two).
# IPv4: a dotted quad, with a prefix of 16 to 32 bits and no host bits set. IPv6: hex and
# colons, with a prefix of 32 to 128 bits, in the form ip6tables prints (apply says so if not).
[ -n "$nets" ] || fail "set MB_TRUNK_MEDIA (or MB_TRUNK_HOST): the carrier's media addresses"
v4="" v6=""
for net in $nets; do
    address=${net%%/*}
    case "$net" in */*) prefix=${net#*/};; *) prefix="";; esac
    case "$address" in
        *:*)
            case "$address" in *[!0-9a-f:]*|*:::*) fail "'$net' in MB_TRUNK_MEDIA: write IPv6 in lower case, shortest form";; esac
            case "$prefix" in "") prefix=128;; *[!0-9]*|0?*) fail "'$net' in MB_TRUNK_MEDIA has no valid prefix";; esac
            [ "$prefix" -ge 32 ] && [ "$prefix" -le 128 ] ||
                fail "'$net' in MB_TRUNK_MEDIA: a prefix of 32 to 128 bits (a wider one is no carrier's media network)"
            v6="$v6 $address/$((prefix + 0))";;
        *)
            value=0 octets=0
            rest="$address."
            while [ -n "$rest" ]; do
                octet=${rest%%.*}; rest=${rest#*.}
                case "$octet" in ""|*[!0-9]*|0?*) fail "'$net' in MB_TRUNK_MEDIA is not an IPv4 address (a.b.c.d) or network";; esac
                [ ${#octet} -le 3 ] && [ "$octet" -le 255 ] || fail "'$net' in MB_TRUNK_MEDIA is not an IPv4 address"
                value=$((value * 256 + octet)); octets=$((octets + 1))
            done
            [ "$octets" -eq 4 ] || fail "'$net' in MB_TRUNK_MEDIA is not an IPv4 address (a.b.c.d) or network"
            case "$prefix" in "") prefix=32;; *[!0-9]*|0?*) fail "'$net' in MB_TRUNK_MEDIA has no valid prefix";; esac
            [ "$prefix" -ge 16 ] && [ "$prefix" -le 32 ] ||
                fail "'$net' in MB_TRUNK_MEDIA: a prefix of 16 to 32 bits (a wider one is no carrier's media network)"
            host_bits=$((value % (1 << (32 - prefix))))
            [ "$host_bits" -eq 0 ] || fail "'$net' in MB_TRUNK_MEDIA has host bits set (the network, e.g. x.x.x.0/24)"
            v4="$v4 $address/$((prefix + 0))";;
    esac
done
[ -n "$v4$v6" ] || fail "set MB_TRUNK_MEDIA (or MB_TRUNK_HOST): the carrier's media addresses"
# A chain per range and carrier: another guard of the same range for another carrier (a second
# stack, a mistake) is a chain of its own, which check reports as overlapping, instead of taking
# this one's over. (28 characters at most: iptables' limit.)
carrier=$(printf '%s' "$v4$v6" | cksum | cut -d ' ' -f 1)
chain=$(printf 'MB-MEDIA-%s-%s-%07x' "$start" "$end" $((carrier % 268435456)))

# What the chain must hold, as `iptables -S` prints it.
wanted() {
    echo "-N $chain"
    for net in $1; do echo "-A $chain -s $net -j RETURN"; done
    echo "-A $chain -j DROP"
}

jump="-p udp -m udp --dport $start:$last -j $chain"

apply() {
    # One transaction: the chain (emptied and filled again) and its jump, first in INPUT. Whether
    # the jump is there is asked before: with legacy iptables, iptables-restore holds the lock
    # while it reads, and an iptables run inside its input would wait for it for ever. Another
    # apply between the two (a jump gone meanwhile) fails the transaction: tried again.
    for attempt in 1 2 3; do
        # shellcheck disable=SC2086
        if "$1" -w -C INPUT $jump 2>/dev/null; then present=1; else present=""; fi
        if {
            echo "*filter"
            echo ":$chain - [0:0]"
            echo "-F $chain"
            wanted "$2" | sed 1d
            [ -z "$present" ] || echo "-D INPUT $jump"
            echo "-I INPUT 1 $jump"
            echo "COMMIT"
        } | "$1-restore" -w --noflush; then
            break
        fi
        [ "$attempt" -lt 3 ] || return 1
    done
    # iptables reads each network its own way (an IPv6 address in another form than it prints,
    # host bits set): what it holds now must be what check will compare with.
    have=$("$1" -w -S "$chain")
    if [ "$have" != "$(wanted "$2")" ]; then
        echo "media-guard: $1 reads MB_TRUNK_MEDIA as other networks than written; write them as it prints them:" >&2
        echo "$have" | sed -n 's/^-A [^ ]* -s \([^ ]*\) -j RETURN$/  \1/p' >&2
        exit 2
    fi
}

check() {
    rules=$("$1" -w -S INPUT)
    # Before the jump, nothing but other guards' jumps, exactly as apply writes them (their
    # ports do not meet this range's, or the overlap test below fails): any other rule could
    # let the range's UDP in (`! -p tcp -j ACCEPT`, a jump to a chain of any name). apply puts
    # the jump first again, and hold within 2 s.
    before=$(echo "$rules" | awk -v rule="-A INPUT $jump" '$0 == rule { found = 1; exit }
        /^-A INPUT / && $0 !~ /^-A INPUT -p udp -m udp --dport [0-9]+:[0-9]+ -j MB-MEDIA-[0-9]+-[0-9]+-[0-9a-f]+$/ { print }
        END { if (!found) print "(no jump)" }')
    if [ -n "$before" ]; then
        echo "media-guard: $1: INPUT does not send the range's UDP to $chain first:" >&2
        echo "$before" >&2
        return 1
    fi
    # Another range's guard over some of these ports (one left from an earlier range, or
    # another stack's) would drop this one's carrier there if its carrier differs.
    overlapping=$(echo "$rules" | awk -v own="$chain" -v first="$start" -v last="$last" '
        /^-A INPUT .* --dport [0-9]+:[0-9]+ -j MB-MEDIA-[0-9]+-[0-9]+-[0-9a-f]+$/ {
            n = split($0, words, " "); range = ""; target = ""
            for (i = 1; i < n; i++) {
                if (words[i] == "--dport") range = words[i + 1]
                if (words[i] == "-j") target = words[i + 1]
            }
            split(range, ends, ":")
            if (target != own && ends[1] + 0 <= last + 0 && ends[2] + 0 >= first + 0) print target " (" range ")"
        }')
    if [ -n "$overlapping" ]; then
        echo "media-guard: $1: other guards cover some of ports $start-$last (remove each with its own settings):" >&2
        echo "$overlapping" >&2
        return 1
    fi
    have=$("$1" -w -S "$chain" 2>/dev/null) || { echo "media-guard: $1: no chain $chain" >&2; return 1; }
    if [ "$have" != "$(wanted "$2")" ]; then
        echo "media-guard: $1: $chain holds other rules than the settings':" >&2
        echo "$have" >&2
        return 1
    fi
}

remove() {
    # shellcheck disable=SC2086
    while "$1" -w -D INPUT $jump 2>/dev/null; do :; done
    "$1" -w -F "$chain" 2>/dev/null || true
    "$1" -w -X "$chain" 2>/dev/null || true
}

command -v iptables-restore >/dev/null 2>&1 || { echo "media-guard: iptables is not installed (apt install iptables)" >&2; exit 1; }
# IPv6: where the host has it. A host with no IPv6 address but loopback's cannot be reached
# over it; one with IPv6 where ip6tables does not work is refused (the range would be open).
families="4"
if command -v ip6tables >/dev/null 2>&1 && ip6tables -w -S INPUT >/dev/null 2>&1; then
    families="4 6"
elif [ -n "$v6" ] || { [ -r /proc/net/if_inet6 ] && awk '$6 != "lo" { found = 1 } END { exit !found }' /proc/net/if_inet6; }; then
    echo "media-guard: this host has IPv6 but ip6tables does not work here: the range would be open over it" >&2
    exit 1
fi

each() {
    for family in $families; do
        if [ "$family" = 6 ]; then "$1" ip6tables "$v6" || return 1; else "$1" iptables "$v4" || return 1; fi
    done
}

# Ports of the range in the kernel's ephemeral range (ip_local_port_range) may be given to any
# program's socket as its own; the guard then drops that socket's answers (a DNS reply, the
# bridge's SIP probe of its PBX). Said, not refused: reserve them (ip_local_reserved_ports; the
# local stack does) or move the range below the ephemeral one.
ephemeral_overlap() {
    # (In one read: the kernel gives a /proc/sys value to the first read only, and sh's `read`
    # reads a byte at a time.)
    ephemeral=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null) || return 0
    # shellcheck disable=SC2086
    set -- $ephemeral
    [ $# -eq 2 ] || return 0
    low=$1 high=$2
    if [ "$start" -le "$high" ] && [ "$last" -ge "$low" ]; then
        echo "media-guard: warning: ports $start-$last overlap the ephemeral range $low-$high: reserve them" \
            "(sysctl net.ipv4.ip_local_reserved_ports) or another program's socket given one loses its answers" >&2
    fi
}

case "$action" in
    apply) ephemeral_overlap; each apply || { echo "media-guard: the rules could not be applied" >&2; exit 1; };;
    check) each check || exit 1;;
    remove) each remove;;
    hold)
        ephemeral_overlap
        each apply || { echo "media-guard: the rules could not be applied" >&2; exit 1; }
        trap 'kill $! 2>/dev/null; exit 0' TERM INT
        echo "media-guard: UDP to ports $start-$last only from:$v4$v6"
        while :; do
            # A child to wait on: a trap runs as soon as `wait` is interrupted (not after a sleep).
            sleep 2 & wait $! || true
            if ! each check 2>/dev/null; then
                echo "media-guard: the rules had changed; applied again" >&2
                each apply || echo "media-guard: the rules could not be applied" >&2
            fi
        done;;
esac
