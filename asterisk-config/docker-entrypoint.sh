#!/bin/bash
# Entrypoint of the PBX image (asterisk-config/Dockerfile).
#
# Renders the templates (common/*.conf, then pbx/*.conf, as bridge/devstack/asterisk.py
# does) into ${MB_AST_DIR}/etc, which asterisk.conf names as astetcdir and /etc/asterisk
# links to, then runs Asterisk in the foreground as the `asterisk` user.
#
# The image runs as `asterisk` (USER in the Dockerfile): then the entrypoint only writes into
# the instance directory, which may be the only writable place (docker-compose.yml mounts
# the root file system read-only, with tmpfs and volumes over etc, db, run, cache, log and
# spool). Started as root (--user root), it takes the directories for `asterisk` first and
# Asterisk drops to that user itself (-U/-G), as before.
#
# Only ${MB_...} names are filled in: envsubst gets an explicit list of the MB_ variables
# in the environment, so Asterisk's own ${EXTEN}, ${STASISSTATUS}, ${FILTER(...)} ... are
# left exactly as written.
#
#   docker-entrypoint.sh                 render, then exec asterisk -f
#   docker-entrypoint.sh --render-only   render and exit (to check the templates)
#   docker-entrypoint.sh CMD ARGS...     render, then exec CMD (e.g. bash, for debugging)
set -euo pipefail

TEMPLATES=${ASTERISK_TEMPLATES:-/usr/share/maskbridge/asterisk-templates}
export MB_AST_DIR=${MB_AST_DIR:-/srv/maskbridge/pbx}
etc=$MB_AST_DIR/etc

die() {
    echo "docker-entrypoint: $*" >&2
    exit 2
}

[ -n "${MB_ARI_PASSWORD:-}" ] || die "MB_ARI_PASSWORD is not set; refusing to start ARI without a password"

shopt -s nullglob
templates=("$TEMPLATES"/common/*.conf "$TEMPLATES"/pbx/*.conf)
[ ${#templates[@]} -gt 0 ] || die "no templates in $TEMPLATES"

# Every ${MB_...} the templates use needs a non-empty value (the local stack refuses the
# same way): better no PBX than one bound to ":5060" or trusting an empty address.
missing=()
for name in $(grep -ohE '\$\{MB_[A-Z0-9_]+\}' "${templates[@]}" | sed -E 's/^\$\{(.*)\}$/\1/' | sort -u); do
    [ -n "${!name:-}" ] || missing+=("$name")
done
[ ${#missing[@]} -eq 0 ] || die "not set: ${missing[*]}"
# (the dialplan compares it as a number: anything else would let every call in unlimited)
[[ "${MB_PBX_MAX_CALLS:-}" =~ ^[0-9]+$ ]] || die "MB_PBX_MAX_CALLS must be a whole number of calls (0: no limit)"

# '${MB_A} ${MB_B} ...': the only names envsubst may replace.
shell_format=$(env | grep -oE '^MB_[A-Za-z0-9_]+=' | sed -E 's/^(.*)=$/${\1}/' | sort -u | tr '\n' ' ')

umask 027
mkdir -p "$etc"
rm -f "$etc"/*.conf
for src in "${templates[@]}"; do
    envsubst "$shell_format" <"$src" >"$etc/$(basename "$src")"
done
if leftover=$(grep -lE '\$\{MB_[A-Z0-9_]+\}' "$etc"/*.conf); then
    die "unrendered \${MB_...} names left in: $leftover"
fi

if [ "${1:-}" = "--render-only" ]; then
    echo "rendered ${#templates[@]} files into $etc"
    exit 0
fi

# Asterisk writes under db, spool, run, log and cache; it only reads etc (ari.conf holds
# the ARI password, hence 0640, and only the asterisk group may read it).
for sub in db spool spool/recording run log cache; do
    mkdir -p "$MB_AST_DIR/$sub"
done
# Kept pointing at the rendered files even if MB_AST_DIR was overridden.
if [ "$(readlink /etc/asterisk)" != "$etc" ]; then
    ln -sfn "$etc" /etc/asterisk || die "cannot point /etc/asterisk at $etc (read-only root file system?)"
fi
run_as=()
if [ "$(id -u)" = 0 ]; then
    chown -R asterisk:asterisk "$MB_AST_DIR"
    chown root:asterisk "$etc" "$etc"/*.conf
    run_as=(-U asterisk -G asterisk)
fi
chmod 0750 "$etc"
chmod 0640 "$etc"/*.conf

if [ $# -gt 0 ]; then
    exec "$@"
fi
exec asterisk -f "${run_as[@]}" -C "$etc/asterisk.conf"
