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
#   KILN_INIT_WAIT            seconds the bootstrap server waits for a peer before init (120)
#   KILN_RETRY_INTERVAL       seconds between probe rounds (5)
#   KILN_PROBE                command that gets an address and succeeds if its k3s answers
#                             (default: kiln_probe, GET https://<ip>:6443/ping)
# Output: one line on stdout, `init` or `join https://<ip>:6443`.

kiln_log() {
    # The journal takes stderr of the service.
    echo "kiln-join: $*" >&2
}

kiln_probe() {
    # /ping is unauthenticated; -k because the cluster CA is not on the node before it joins.
    curl -fsk --max-time 3 "https://$1:6443/ping" 2>/dev/null | grep -q pong
}

# Prints the first peer that answers, or nothing.
kiln_first_live_peer() {
    for peer in $KILN_PEERS; do
        if ${KILN_PROBE:-kiln_probe} "$peer"; then
            echo "$peer"
            return 0
        fi
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
    started=$(date +%s)
    round=0
    while :; do
        round=$((round + 1))
        if peer=$(kiln_first_live_peer); then
            kiln_log "peer $peer answers: joining it (round $round)"
            echo "join https://$peer:6443"
            return 0
        fi
        now=$(date +%s)
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
