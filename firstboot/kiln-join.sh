#!/bin/sh
# kiln join decision: which k3s cluster this node joins, or whether it starts one.
#
# Sourced by kiln-firstboot.sh; runnable on its own for tests. POSIX sh (dash).
#
# Why this matters: k3s ignores `cluster-init` and `server` once etcd data exists, so a
# reimaged first server that initialises starts a second, separate cluster (split brain).
# The rule: join any live peer; only the designated bootstrap server of an image built to
# create the cluster may initialise, and only after no peer answered within a bounded wait.
#
# Inputs (environment; the image writes them to /etc/kiln/node.env):
#   KILN_NODE, KILN_IP        this node's name and address
#   KILN_ROLE                 server | agent
#   KILN_BOOTSTRAP            1 for the cluster's bootstrap server, else 0
#   KILN_MODE                 init (may create the cluster) | rejoin (never initialises)
#   KILN_PEERS                space-separated addresses of the cluster's other servers
#   KILN_CA                   the cluster's server CA bundle (what k3s serves at /cacerts);
#                             empty for a cluster from before kiln made CAs (bare token)
#   KILN_API_PORT             the port k3s's supervisor/API listens on (6443, k3s's default)
#   KILN_INIT_WAIT            seconds the bootstrap server waits for a peer before init (120)
#   KILN_RETRY_INTERVAL       seconds between probe rounds (5)
#   KILN_PROBE                command that gets an address; exit 0 if its k3s answers with a
#                             certificate that chains to the cluster CA, 2 if something
#                             answers with one that does not, else no answer
#                             (default: kiln_probe, GET https://<ip>:6443/ping)
# Output: one line on stdout, `init` or `join https://<ip>:6443`.

kiln_log() {
    # The journal takes stderr of the service.
    echo "kiln-join: $*" >&2
}

# GET /ping (unauthenticated) from a peer, checking its certificate against the cluster CA
# and its address against the certificate, as k3s checks a server before it sends the token
# (k3s serves a certificate signed by server-ca whose SANs hold the node's IP). A peer that
# answers with another certificate is a foreign host or another cluster: never joined.
kiln_probe() {
    if [ -z "${KILN_CA:-}" ]; then
        curl -fsk --max-time 3 "https://$1:${KILN_API_PORT:-6443}/ping" 2>/dev/null | grep -q pong
        return
    fi
    # `|| rc=$?`: callers may run under `set -e`.
    rc=0
    out=$(curl -fsS --max-time 3 --cacert "$KILN_CA" "https://$1:${KILN_API_PORT:-6443}/ping" 2>&1) || rc=$?
    case $rc in
        0) [ "$out" = pong ] && return 0
           kiln_log "peer $1 answers /ping with something else than pong: not joining it"
           return 1 ;;
        # 60: certificate not trusted (or not for this address); 51: the same on older curl.
        60|51)
            kiln_log "peer $1 refused: its certificate does not chain to the cluster CA or does not name $1 ($(echo "$out" | head -n 1))"
            return 2 ;;
        # 77: our own CA file unreadable; fail loudly rather than look like no answer.
        77) kiln_log "cannot read the cluster CA $KILN_CA: $(echo "$out" | head -n 1)"
            return 1 ;;
    esac
    return 1
}

# Probes every peer: KILN_LIVE gets the first that answers with the cluster's certificate,
# KILN_FOREIGN every peer that answered with another one (no subshell: both are outputs).
kiln_scan() {
    KILN_LIVE=
    KILN_FOREIGN=
    for peer in $KILN_PEERS; do
        rc=0
        ${KILN_PROBE:-kiln_probe} "$peer" || rc=$?
        case $rc in
            0) KILN_LIVE=$peer; return 0 ;;
            2) KILN_FOREIGN="${KILN_FOREIGN:+$KILN_FOREIGN }$peer" ;;
        esac
    done
    return 1
}

kiln_decide() {
    interval=${KILN_RETRY_INTERVAL:-5}
    init_wait=${KILN_INIT_WAIT:-120}
    may_init=0
    if [ "$KILN_ROLE" = server ] && [ "${KILN_BOOTSTRAP:-0}" = 1 ] && [ "${KILN_MODE:-init}" = init ]; then
        may_init=1
    fi
    # A one-server cluster (staging) has nobody to join.
    if [ -z "$(echo $KILN_PEERS)" ]; then
        if [ $may_init = 1 ]; then
            kiln_log "no other servers in the cluster: initialising"
            echo init
            return 0
        fi
        kiln_log "no servers to join and this node may not initialise (role=$KILN_ROLE bootstrap=${KILN_BOOTSTRAP:-0} mode=${KILN_MODE:-init})"
        return 1
    fi
    if [ -z "${KILN_CA:-}" ]; then
        kiln_log "no cluster CA in this image (a bare token from before kiln made CAs): peers are not verified before they get the token"
    fi
    started=$(date +%s)
    round=0
    while :; do
        round=$((round + 1))
        if kiln_scan; then
            kiln_log "peer $KILN_LIVE answers: joining it (round $round)"
            echo "join https://$KILN_LIVE:${KILN_API_PORT:-6443}"
            return 0
        fi
        now=$(date +%s)
        if [ -n "$KILN_FOREIGN" ]; then
            # Something answers at a server's address but is not this cluster: starting a new
            # cluster beside it could split one in two, so neither join nor initialise.
            also=
            [ $may_init = 1 ] && also=" and not initialising while they answer"
            kiln_log "only peers with a foreign certificate answer ($KILN_FOREIGN): not joining them$also (round $round); retrying in ${interval}s"
            sleep "$interval"
            continue
        fi
        # -gt on whole seconds: at least init_wait real seconds have passed.
        if [ $may_init = 1 ] && [ $((now - started)) -gt "$init_wait" ]; then
            kiln_log "no peer answered in ${init_wait}s: initialising a new cluster"
            echo init
            return 0
        fi
        kiln_log "no peer answers yet (round $round, peers: $KILN_PEERS); retrying in ${interval}s"
        sleep "$interval"
    done
}

# Writes the k3s config for a decision ($1: `init` or `join URL`), 0600 from the first byte.
kiln_write_config() {
    decision=$1
    dest=${KILN_ROOT:-}/etc/rancher/k3s/config.yaml
    token_file=${KILN_ROOT:-}/etc/kiln/token
    mkdir -p "$(dirname "$dest")"
    tmp="$dest.tmp.$$"
    (
        umask 077
        {
            echo "# Written by kiln first boot: $decision"
            echo "node-name: $KILN_NODE"
            echo "node-ip: $KILN_IP"
            printf 'token: "%s"\n' "$(cat "$token_file")"
            case $decision in
                init) echo "cluster-init: true" ;;
                join\ *) echo "server: ${decision#join }" ;;
            esac
        } > "$tmp"
    ) || return 1
    mv -f "$tmp" "$dest"
}

if [ "${0##*/}" = kiln-join.sh ]; then
    set -eu
    d=$(kiln_decide)
    if [ "${1:-}" = --write ]; then
        kiln_write_config "$d"
    fi
    echo "$d"
fi
